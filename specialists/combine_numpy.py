"""The generalist + specialists combination in plain numpy, for exported models.

`specialists export` copies this file into the export folder beside the models and
`export.json`; it imports nothing but numpy and the standard library, so the folder
runs wherever numpy and a runtime for the models (onnxruntime, torch) do:

    import numpy as np, onnxruntime as ort
    import combine_numpy                                      # from the export folder
    combiner = combine_numpy.load("export/")
    sessions = [ort.InferenceSession(f) for f in combiner.model_files]
    models = [lambda *x, s=s: s.run(None, dict(zip(combiner.input_names, x)))[0] for s in sessions]
    proba = combiner.run(inputs, models)                      # (N, C), as load(run).predict_proba

`inputs` are the models' encoded inputs as numpy arrays: (x,) for feature and image
models, (ids, offsets) for text (export.json's "input" says how texts are hashed; in
Python, `specialists.models.hash_ngrams` with those settings). Where specialists hash
other n-grams than the generalist, input.encodings lists each hashing and each model's
"encoding" indexes it: `inputs` is then a list with one (ids, offsets) per encoding.

What it computes, as `specialists.ensemble.SpecialistsModel` does (section 5.4 of
Hinton, Vinyals & Dean, 2015):
1. the generalist's probabilities g = softmax(logits) over the C classes (with G full
   models, the generalist and peer members, the mean of their softmaxes);
2. the active specialists of each row: those whose classes meet g's top_n classes;
3. each active specialist's probabilities softmax(logits + c e_dustbin) over its k
   classes and dustbin, c its dustbin correction (export.json);
4. q minimising KL(g || q) + w sum_m KL(p_m || A_m q), A_m folding q onto specialist
   m's classes plus a dustbin holding the rest: the dual of `combine.solve`, with its
   closed form for one active specialist and its damped Newton iteration for more.
Rows are solved one at a time (a reference and for moderate volumes; the package's
torch solver batches them). A class with probability exactly 0 under every model
keeps q = 0 here, where `combine.solve` gives it a floor of 1e-10 of the row's mass.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["Combiner", "load", "softmax", "solve_row", "take_rows"]

EXPORT_FILE = "export.json"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def take_rows(inputs: tuple, rows: np.ndarray, kind: str) -> tuple:
    """The encoded inputs of `rows` only: x[rows], or for text the (ids, offsets) of those rows' bags."""
    if kind != "text":
        return (inputs[0][rows],)
    ids, offsets = (np.asarray(a) for a in inputs)
    ends = np.append(offsets[1:], len(ids))
    parts = [ids[offsets[r]:ends[r]] for r in rows]
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    new_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(parts) else \
        np.zeros(0, np.int64)
    new_ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return new_ids, new_offsets


class Combiner:
    """The combination settings of an export (export.json), and the models' files.

    model_files: the full models' (the generalist, then any peer members), then the
    specialists'; `run` takes one callable per file, in this order.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        spec = json.loads((self.folder / EXPORT_FILE).read_text(encoding="utf-8"))
        self.spec = spec
        self.classes = list(spec["classes"])
        self.input_kind = spec["input"]["kind"]
        self.input_names = list(spec["input"]["names"])
        self.top_n = int(spec["combine"]["top_n"])
        self.specialist_weight = float(spec["combine"]["specialist_weight"])
        self.n_full = len(spec["full_models"])
        self.n_encodings = len(spec["input"].get("encodings") or [None])
        self.model_encodings = [int(f.get("encoding", 0)) for f in spec["full_models"] + spec["specialists"]]
        self.specialist_classes = [np.asarray(s["classes"], dtype=np.int64) for s in spec["specialists"]]
        self.corrections = [float(s["dustbin_correction"]) for s in spec["specialists"]]
        self.model_files = [self.folder / f["file"] for f in spec["full_models"]] + \
                           [self.folder / s["file"] for s in spec["specialists"]]

    def general_probs(self, full_logits: list) -> np.ndarray:
        """(N, C) mean of the full models' softmax: their KL terms, of weight 1/G each, act as one on it."""
        return np.mean([softmax(z) for z in full_logits], axis=0)

    def active(self, general: np.ndarray) -> np.ndarray:
        """(N, M) bool: specialist m is active on row i when its classes meet the row's top_n classes
        of `general` ((N, C) probabilities, or the logits of a single full model: same order)."""
        n_classes = len(self.classes)
        top = np.argsort(-np.asarray(general, dtype=np.float64), axis=1, kind="stable")[:, :self.top_n]
        member = np.zeros((len(self.specialist_classes), n_classes), dtype=bool)
        for m, classes in enumerate(self.specialist_classes):
            member[m, classes] = True
        return member[:, top].any(axis=2).T

    def predict_proba(self, full_logits: list, specialist_logits: list) -> np.ndarray:
        """(N, C) combined probabilities.

        full_logits: one (N, C) array per full model (the generalist first).
        specialist_logits[m]: (N_m, k_m + 1) logits of specialist m (uncorrected, as the model
        gives them) on the rows where it is active, in row order
        (`np.flatnonzero(self.active(self.general_probs(full_logits))[:, m])`); None where N_m = 0.
        """
        g = self.general_probs(full_logits)
        active = self.active(g)
        probs = []
        for m, logits in enumerate(specialist_logits):
            rows = np.flatnonzero(active[:, m])
            if len(rows) == 0:
                probs.append(None)
                continue
            z = np.array(logits, dtype=np.float64)
            if z.shape != (len(rows), len(self.specialist_classes[m]) + 1):
                raise ValueError(f"specialist {m}: logits of shape {z.shape}, expected ({len(rows)}, "
                                 f"{len(self.specialist_classes[m]) + 1}) for its active rows")
            z[:, -1] += self.corrections[m]
            probs.append(softmax(z))
        position = np.cumsum(active, axis=0) - 1  # (N, M): row i's index among specialist m's active rows
        q = np.empty_like(g)
        for i in range(len(g)):
            on = np.flatnonzero(active[i])
            q[i] = solve_row(g[i], [probs[m][position[i, m]] for m in on],
                             [self.specialist_classes[m] for m in on], self.specialist_weight)
        return q

    def run(self, inputs: tuple, models: list) -> np.ndarray:
        """(N, C) probabilities of encoded `inputs`; `models`: one callable per entry of
        model_files, from encoded arrays to (rows, outputs) logits."""
        encoded = self.per_encoding(inputs)
        reads = [encoded[e] for e in self.model_encodings]
        full = [np.asarray(model(*x)) for model, x in zip(models[:self.n_full], reads)]
        active = self.active(self.general_probs(full))
        specialist_logits = []
        for m, (model, x) in enumerate(zip(models[self.n_full:], reads[self.n_full:])):
            rows = np.flatnonzero(active[:, m])
            specialist_logits.append(np.asarray(model(*take_rows(x, rows, self.input_kind))) if len(rows)
                                     else None)
        return self.predict_proba(full, specialist_logits)

    def per_encoding(self, inputs) -> list[tuple]:
        """`inputs` as one tuple of arrays per encoding (a list of them where there are several)."""
        if self.n_encodings == 1:
            return [tuple(np.asarray(a) for a in inputs)]
        if not isinstance(inputs, list) or len(inputs) != self.n_encodings:
            raise ValueError(f"this export's models read {self.n_encodings} encodings of the inputs (export.json: "
                             f"input.encodings): pass a list of {self.n_encodings} input tuples, one per encoding")
        return [tuple(np.asarray(a) for a in x) for x in inputs]


def load(folder: str | Path) -> Combiner:
    """The combiner of an export folder (its export.json)."""
    return Combiner(folder)


# ---------------------------------------------------------------------------- the solver


def solve_row(general: np.ndarray, specialist_probs: list, specialist_classes: list, weight: float = 1.0,
              tol: float = 1e-12, max_iter: int = 50) -> np.ndarray:
    """(C,) q minimising KL(general || q) + weight * sum_m KL(p_m || A_m q) for one row.

    general: (C,) probabilities. specialist_probs[m]: (k_m + 1,) probabilities over
    specialist_classes[m] (k_m distinct class indices) then the dustbin.

    With b_c = g_c + w sum_{m: c in S_m} p_mc, a_m = w d_m (d_m the dustbin) and W = sum b + sum a,
    q_c = b_c / y_c where y_c = y_out + sum_{m: c in S_m} r_m and y_out = W - sum_m r_m; r minimises
    the convex dual -sum_c b_c log y_c - sum_m a_m log r_m, where r_m D_m = a_m (D_m = q mass outside S_m).
    """
    b = np.array(general, dtype=np.float64)
    a, sets = [], []
    for p, classes in zip(specialist_probs, specialist_classes):
        b[classes] += weight * p[:-1]
        if weight * p[-1] > 0:
            a.append(weight * p[-1])
            sets.append(np.asarray(classes))
    total = b.sum() + sum(a)
    if not a:
        return b / b.sum()
    union = np.unique(np.concatenate(sets))
    union = union[b[union] > 0]  # a class with b = 0 keeps q = 0
    outside = np.ones(len(b), dtype=bool)
    outside[np.concatenate(sets)] = False
    b_in, b_out = b[union], float(b[outside].sum())
    member = np.stack([np.isin(union, s) for s in sets], axis=1).astype(np.float64)  # (E, K)
    a = np.array(a)
    if len(a) == 1:  # closed form: D = (B + a) / W, classes outside S get y = W B / (B + a)
        mass_out = b_out + float(b_in[member[:, 0] == 0].sum())
        y_out = total * mass_out / (mass_out + a[0])
        y = np.where(member[:, 0] > 0, total, y_out)
    else:
        r, y_out = _newton(b_in, member, b_out, total, a, tol, max_iter)
        y = y_out + member @ r
    q = np.zeros(len(b))
    q[union] = b_in / y
    q[outside] = b[outside] / y_out if y_out > 0 else 0.0
    return q / q.sum()


def _newton(b, member, b_out, total, a, tol, max_iter):
    """Damped Newton on the dual over r (K,), carrying y_out = W - sum r separately (it can be
    orders below W, and W - sum r would leave it few correct digits). As combine._newton."""
    eps = np.finfo(np.float64).eps
    not_in = 1.0 - member  # (E, K)
    has_b = b > 0

    def value(r, y, y_out):
        out = b_out * math.log(y_out) if b_out > 0 else 0.0
        return -(np.sum(b * np.log(y)) + out + np.sum(a * np.log(r)))

    def max_step(r, d, d_out, y, y_out):
        fall = -d_out - member @ d
        alpha = np.min(np.where(has_b & (fall > 0), y / np.where(fall > 0, fall, 1.0), np.inf), initial=np.inf)
        if b_out > 0 and d_out < 0:
            alpha = min(alpha, -y_out / d_out)
        return min(alpha, np.min(np.where(d < 0, -r / np.where(d < 0, d, -1.0), np.inf)))

    # start at r = a, moved toward each specialist's own closed form a W / (B_m + a)
    r = a.copy()
    y_out = b_out + b.sum()
    target = a * total / (b_out + not_in.T @ b + a)
    d = target - r
    alpha = min(1.0, 0.99 * max_step(r, d, -d.sum(), y_out + member @ r, y_out))
    r, y_out = r + alpha * d, y_out - alpha * d.sum()
    for _ in range(max_iter):
        y = y_out + member @ r
        q = b / y
        q_out = b_out / y_out if b_out > 0 else 0.0
        grad = q_out + not_in.T @ q - a / r  # D_m - a_m / r_m
        if np.max(np.abs(grad * r) / a) <= tol:
            break
        # Hessian M + v_out 1 1^T with M = sum_c (q_c / y_c) u_c u_c^T + diag(a / r^2): solve with
        # the Jacobi-scaled M and add the rank-one term by Sherman-Morrison
        v, v_out = q / y, q_out / y_out
        m = (not_in.T * v) @ not_in + np.diag(a / r**2)
        s = 1 / np.sqrt(np.diag(m))
        x = s[:, None] * np.linalg.lstsq(m * s[:, None] * s[None, :], np.stack([s * grad, s], axis=1),
                                         rcond=None)[0]
        x_grad, x_ones = x[:, 0], x[:, 1]
        along = x_grad.sum()
        shrink = 1 / (1 + v_out * x_ones.sum())
        step = -(x_grad - v_out * shrink * along * x_ones)
        step_out = shrink * along
        decrease = -(grad @ step)
        f0 = value(r, y, y_out)
        slack = 16 * eps * (abs(f0) + 1)
        alpha = min(1.0, 0.99 * max_step(r, step, step_out, y, y_out))
        for _ in range(60):
            r_try, y_out_try = r + alpha * step, y_out + alpha * step_out
            if value(r_try, y_out_try + member @ r_try, y_out_try) <= f0 - 1e-4 * alpha * decrease + slack:
                break
            alpha /= 2
        else:
            break  # no step decreases f in float64: as close as it gets
        tiny = (np.all(np.abs(alpha * step) <= 4 * eps * r) and abs(alpha * step_out) <= 4 * eps * y_out)
        r, y_out = r_try, y_out_try
        if tiny:
            break
    return r, y_out

"""The loaded model of a run: `specialists.load(run_dir).predict_proba(inputs)`.

With specialists in the run directory, the prediction for each input is the
combination of section 5.4: the generalist's top-n classes pick the active
specialists, each runs only on the inputs where it is active, and
`combine.solve_rows` finds the q minimising KL(generalist || q) plus the
specialists' KL terms on their classes + dustbin. Inputs with no active
specialist get the generalist's distribution unchanged.

With `generalists=G` > 1 (the paper's "one or more full models and many
specialist models"), G full models take the generalist's place: the run's
generalist and peer members 1..G-1 (`peers/<k>/`). Each full model's KL term
gets weight 1/G, so their terms together act as one term of weight 1 on
their mean distribution, and that mean's top-n classes pick the active
specialists; G=1 is the combination above exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping, Set
from pathlib import Path

import numpy as np
import torch

from .choices import DUSTBIN_MODES
from .combination_choice import read_choice
from .combine import active_specialists, full_model_terms, solve_rows
from .config import CombineConfig, load_config
from .models import encoding_key, load_checkpoint, resolve_device, torch_threads
from .rundir import RunDir, RunDirError
from .dustbin import dustbin_corrected
from .specialist import SPECIALIST_FILE, file_sha256, load_specialist



class Encodings:
    """Raw inputs encoded once for each way the run's models read them (`models.encoding_key`): the
    generalist's, and another for specialists that hash other n-grams (`specialists.ngrams` / `char_ngrams`)."""

    def __init__(self, inputs, generalist: torch.nn.Module):
        self.inputs, self.generalist, self.encoded = inputs, generalist, {}
        self.of(generalist)  # bad inputs are refused here, before any batch

    def of(self, model: torch.nn.Module):
        key = encoding_key(model)
        if key is None:  # encodes as its generalist does
            key, model = encoding_key(self.generalist), self.generalist
        if key not in self.encoded:
            self.encoded[key] = model.encode(self.inputs)
        return self.encoded[key]

    def batch(self, model: torch.nn.Module, index: np.ndarray, device: torch.device) -> tuple:
        """The arguments of `model`'s forward for rows `index`."""
        return self.of(model).batch(index, device)

    def __len__(self) -> int:
        return len(self.of(self.generalist))


class SpecialistsModel:
    """A run's generalist and its finished specialists behind one predictor.

    Inputs are raw texts (a list of strings) for text runs and arrays or tensors
    of shape (N, *input_shape) for feature and image runs; any other iterable
    (a generator, a pandas Series) is read once into a list first. An empty
    list gives (0, C) for every kind of run; a dict or a set (no row order)
    raises TypeError.

    Options left as None take the run's choice on its validation split
    (combination.json, see combination_choice.py) where its evaluate stage
    made one for this many full models, else its `combine` config section,
    else the defaults of `CombineConfig`:
    top_n: how many of the generalist's top classes activate specialists (paper: 1).
    dustbin: which dustbin-logit correction to apply to specialist outputs:
        "active" (the prior of the examples a specialist sees when gated by the
        generalist's top-1 class; the default, see the README's ablation), "natural" (the
        training split's prior), or "none".
    specialist_weight: weight of each active specialist's KL term; the full models' together is 1.
    generalists: how many full models (the generalist, then peer members 1, 2, ...) the combination uses.
    use_specialists: False gives the full models (their mean) alone; a run whose specialists did not
        clearly beat its full models alone on validation chose False (combination_choice.py).
    """

    def __init__(self, run_dir: str | Path, device: str | torch.device = "auto", top_n: int | None = None,
                 dustbin: str | None = None, specialist_weight: float | None = None,
                 use_specialists: bool | None = None, generalists: int | None = None):
        self.run = RunDir(run_dir)
        # a `specialists distill` output: one model (student/), served as a run without specialists
        self.student_of = _student_teacher(self.run.root)
        model_dir = self.run.root / "student" if self.student_of is not None else self.run.generalist
        self.run.require(self.run.classes, model_dir / "model.json", what="generalist")
        saved = (load_config(self.run.config).combine if self.run.config.is_file() and self.student_of is None
                 else CombineConfig())
        generalists = saved.generalists if generalists is None else generalists
        if isinstance(generalists, bool) or not isinstance(generalists, int) or generalists < 1:
            raise ValueError(f"generalists={generalists!r} must be an integer >= 1 (1 = the generalist alone)")
        self.classes = self.run.read_classes()
        chosen = read_choice(self.run, generalists, len(self.classes)) if self.student_of is None else None
        if chosen:
            saved = dataclasses.replace(saved, top_n=chosen["top_n"], specialist_weight=chosen["specialist_weight"])
        top_n_given = top_n is not None
        top_n = saved.top_n if top_n is None else top_n
        dustbin = saved.dustbin if dustbin is None else dustbin
        specialist_weight = saved.specialist_weight if specialist_weight is None else specialist_weight
        if use_specialists is None:
            use_specialists = chosen["use_specialists"] if chosen else True
        if dustbin not in DUSTBIN_MODES:
            raise ValueError(f"dustbin={dustbin!r} must be one of {DUSTBIN_MODES}")
        if not specialist_weight > 0:
            raise ValueError(f"specialist_weight={specialist_weight} must be > 0")
        self.device = resolve_device(device) if isinstance(device, str) else device
        if not top_n_given:  # the run's setting (or the default) may exceed a data set's few classes
            top_n = min(top_n, len(self.classes))
        if not 1 <= top_n <= len(self.classes):
            raise ValueError(f"top_n={top_n} must be between 1 and the number of classes ({len(self.classes)})")
        self.top_n, self.dustbin, self.specialist_weight = top_n, dustbin, float(specialist_weight)
        self.generalist = load_checkpoint(model_dir, self.device)
        if self.student_of is not None and generalists != 1:
            raise RunDirError(f"generalists={generalists}: {self.run.root} is one distilled model (student/), "
                              "not a run with peer members")
        if self.generalist.head.out_features != len(self.classes):
            raise RunDirError(f"{model_dir} predicts {self.generalist.head.out_features} classes but "
                              f"{self.run.classes} lists {len(self.classes)}")
        self.full_models = [self.generalist] + [self._peer_member(k, generalists) for k in range(1, generalists)]
        self.use_specialists = use_specialists
        self.specialists: list[tuple[torch.nn.Module, dict]] = []
        if use_specialists and self.student_of is None and self.run.specialists.is_dir():
            folders = sorted((f for f in self.run.specialists.iterdir() if (f / SPECIALIST_FILE).is_file()),
                             key=lambda f: (0, int(f.name), "") if f.name.isdigit() else (1, 0, f.name))
            sha = file_sha256(self.run.generalist / "model.safetensors")
            self.specialists = [load_specialist(f, self.device, n_classes=len(self.classes), generalist_sha256=sha)
                                for f in folders]
        self._classes_t = [torch.tensor(info["classes"], dtype=torch.long, device=self.device)
                           for _, info in self.specialists]

    @property
    def input_kind(self) -> str:
        return self.generalist.input_kind

    def _peer_member(self, k: int, generalists: int) -> torch.nn.Module:
        """Full model k >= 1: peer member k of the run (`peers/<k>/`, finished: its member.json written)."""
        folder = self.run.peers / str(k)
        if not (folder / "member.json").is_file():
            have = 1 + sum(1 for f in self.run.peers.glob("*/member.json")) if self.run.peers.is_dir() else 1
            raise RunDirError(f"generalists={generalists}: {self.run.root} has {have} full model(s) (the generalist "
                              f"and {have - 1} finished peer member(s) in peers/); train more with the peer stage "
                              "(peer.enabled=true, combine.generalists=G) or ask for fewer")
        model = load_checkpoint(folder, self.device)
        if model.head.out_features != len(self.classes):
            raise RunDirError(f"{folder} predicts {model.head.out_features} classes but the run has {len(self.classes)}")
        return model

    @property
    def specialist_classes(self) -> list[torch.Tensor]:
        """Per specialist, (k_m,) the classes of its outputs 0..k_m - 1 (output k_m is its dustbin)."""
        return self._classes_t

    @property
    def generalists(self) -> int:
        return len(self.full_models)

    @property
    def mode(self) -> str:
        if self.student_of is not None:
            return f"single model: one network distilled from {self.student_of} (no specialists, no combination)"
        full = ("generalist" if self.generalists == 1 else
                f"{self.generalists} full models (generalist + {self.generalists - 1} peer member"
                f"{'s' if self.generalists > 2 else ''})")
        if not self.use_specialists:
            return f"{full} alone (use_specialists=False)"
        if not self.specialists:
            return f"{full} alone (no finished specialists in the run directory)"
        return (f"{full} + {len(self.specialists)} specialists (top_n={self.top_n}, dustbin={self.dustbin}, "
                f"specialist_weight={self.specialist_weight:g})")

    def __repr__(self) -> str:
        return f"SpecialistsModel({str(self.run.root)!r}: {self.mode})"

    def _as_batch(self, inputs):
        """A list, array or tensor of inputs; other iterables (generators, pandas Series) are read once here."""
        if isinstance(inputs, (str, bytes)):
            raise TypeError(f"pass a list of {'texts' if self.input_kind == 'text' else 'examples'}, not one "
                            f"{type(inputs).__name__}: predict_proba([x])")
        if isinstance(inputs, (Mapping, Set)):
            raise TypeError(f"inputs are a {type(inputs).__name__}, which has no row order; pass a list or an array")
        if isinstance(inputs, (list, tuple, np.ndarray, torch.Tensor)):
            return inputs
        if hasattr(inputs, "__array__"):  # a pandas DataFrame or Series: its rows, not its column names
            return np.asarray(inputs)
        if not isinstance(inputs, Iterable):
            raise TypeError(f"inputs must be a list, an array or an iterable of examples, not {type(inputs).__name__}")
        return list(inputs)

    def _encode(self, inputs) -> Encodings:
        if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "USO" and self.input_kind == "text":
            inputs = inputs.tolist()
        return Encodings(inputs, self.generalist)

    def _correction(self, info: dict) -> float:
        if self.dustbin == "none":
            return 0.0
        key = "dustbin_correction_active_top1" if self.dustbin == "active" else "dustbin_correction"
        return float(info.get(key, 0.0))

    def dustbin_corrections(self) -> list[float]:
        """What this model adds to each specialist's dustbin logit (per `dustbin`), in specialist order."""
        return [self._correction(info) for _, info in self.specialists]

    @torch.no_grad()
    def _combine_batch(self, encoded, index: np.ndarray) -> tuple[torch.Tensor, dict]:
        """(B, C) combined probabilities for rows `index` of `encoded`, and what went into them."""
        full = torch.stack([torch.softmax(model(*encoded.batch(model, index, self.device)).double(), dim=1)
                            for model in self.full_models])  # (G, B, C)
        for g in range(len(full)):
            if not torch.isfinite(full[g]).all():
                raise ValueError(f"{'the generalist' if g == 0 else f'peer member {g}'} produced NaN/inf "
                                 "probabilities; check the inputs and checkpoint")
        general = full[0]  # (B, C) the run's generalist
        general_in, general_weights = full_model_terms(full)
        mean = general if len(full) == 1 else full.mean(0)  # (B, C)
        parts = {"generalist": general, "full_models_mean": mean, "active": None, "specialist_probs": [],
                 "specialist_rows": []}
        if not self.specialists:
            return mean, parts
        active = active_specialists(general_in, self._classes_t, self.top_n, general_weights)  # (B, M)
        parts["active"] = active
        with torch_threads(1 if self.device.type == "cpu" else torch.get_num_threads()):  # many small forwards
            for m, (model, info) in enumerate(self.specialists):
                rows = torch.nonzero(active[:, m]).flatten()
                probs = torch.zeros(0, len(info["classes"]) + 1, dtype=torch.float64, device=self.device)
                if len(rows):
                    logits = model(*encoded.batch(model, index[rows.cpu().numpy()], self.device)).double()
                    probs = torch.softmax(dustbin_corrected(logits, self._correction(info)), dim=1)
                    if not torch.isfinite(probs).all():
                        raise ValueError(f"specialist {info.get('id', m)} produced NaN/inf probabilities")
                parts["specialist_probs"].append(probs)
                parts["specialist_rows"].append(rows)
        weights = torch.full((len(self.specialists),), self.specialist_weight, dtype=torch.float64, device=self.device)
        q = solve_rows(general_in, parts["specialist_probs"], self._classes_t, parts["specialist_rows"],
                       general_weights=general_weights, specialist_weights=weights)
        return q, parts

    def predict_proba(self, inputs, batch_size: int = 1024) -> np.ndarray:
        """(N, C) class probabilities, columns in the order of `classes`."""
        out = [combined for _, combined in self.iter_proba(inputs, batch_size)]
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(out)

    def iter_proba(self, inputs, batch_size: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(generalist, combined) per batch of `inputs`, in order: (B, C) float32 probabilities of the
        generalist alone and of the combination. Memory O(batch_size x C) however many inputs there are."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        inputs = self._as_batch(inputs)
        if len(inputs) == 0 and (self.input_kind == "text" or not hasattr(inputs, "shape")):
            return iter(())  # an empty list, for every kind of run
        encoded = self._encode(inputs)

        def batches():
            for start in range(0, len(encoded), batch_size):
                q, parts = self._combine_batch(encoded, np.arange(start, min(start + batch_size, len(encoded))))
                yield parts["generalist"].float().cpu().numpy(), q.float().cpu().numpy()

        return batches()

    def outputs(self, inputs, batch_size: int = 1024) -> tuple[np.ndarray, list[np.ndarray]]:
        """Every model on every input: (G, N, C) float32 probabilities of the full models and, per
        specialist, (N, k + 1) float32 dustbin-corrected ones (as the combination reads them). With
        `combine.combine_outputs` they give `predict_proba` for any top_n / specialist_weight."""
        full: list[np.ndarray] = []
        special: list[list[np.ndarray]] = [[] for _ in self.specialists]
        for batch_full, batch_special in self.iter_outputs(inputs, batch_size):
            full.append(batch_full.float().cpu().numpy())
            for out, probs in zip(special, batch_special):
                out.append(probs.float().cpu().numpy())
        width = [len(info["classes"]) + 1 for _, info in self.specialists]
        full_probs = (np.concatenate(full, axis=1) if full
                      else np.zeros((len(self.full_models), 0, len(self.classes)), np.float32))
        return full_probs, [np.concatenate(o) if o else np.zeros((0, w), np.float32) for o, w in zip(special, width)]

    @torch.no_grad()
    def iter_outputs(self, inputs, batch_size: int = 1024) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """`outputs` a batch at a time, in float64 as the combination computes: (G, B, C) and, per
        specialist, (B, k + 1) on every row of the batch, active or not."""
        inputs = self._as_batch(inputs)
        encoded = self._encode(inputs)
        for start in range(0, len(encoded), batch_size):
            index = np.arange(start, min(start + batch_size, len(encoded)))
            full = torch.stack([torch.softmax(model(*encoded.batch(model, index, self.device)).double(), dim=1)
                                for model in self.full_models])
            special = [torch.softmax(dustbin_corrected(model(*encoded.batch(model, index, self.device)).double(),
                                                       self._correction(info)), dim=1)
                       for model, info in self.specialists]
            yield full, special

    def predict(self, inputs, batch_size: int = 1024) -> np.ndarray:
        """(N,) class names."""
        index = self.predict_proba(inputs, batch_size).argmax(1)
        return np.array(self.classes, dtype=object)[index]

    @property
    def classes_(self) -> np.ndarray:
        """(C,) class names (object array), the columns of predict_proba: scikit-learn's name for them."""
        return np.array(self.classes, dtype=object)

    def __call__(self, inputs, top_k: int = 1, batch_size: int = 1024) -> list:
        """Labels and scores, as Hugging Face pipelines return them.

        inputs: a batch, as for predict_proba (a list of texts, an (N, ...) array).
        top_k=1: a list of N dicts {"label": class name, "score": probability};
        top_k > 1: a list of N lists of top_k such dicts, best first. Scores are the
        combined probabilities; ties keep the class order (so label == predict()).
        """
        index, scores = top_classes(self.predict_proba(inputs, batch_size), top_k)
        ranked = [[{"label": self.classes[i], "score": float(s)} for i, s in zip(row_i, row_s)]
                  for row_i, row_s in zip(index.tolist(), scores.tolist())]
        return [row[0] for row in ranked] if top_k == 1 else ranked

    def explain(self, example, top: int = 5) -> dict:
        """What the combination did for one input: the generalist's top classes (with G > 1
        full models also their mean's, which picks the specialists), the active specialists
        with their outputs, and the combined top classes."""
        encoded = self._encode([example] if self.input_kind == "text" else np.asarray(example)[None])
        q, parts = self._combine_batch(encoded, np.arange(1))

        def ranked(probs: torch.Tensor, names: list[str]) -> list[tuple[str, float]]:
            values, order = probs.topk(min(top, len(names)))
            return [(names[int(i)], round(float(v), 6)) for v, i in zip(values, order)]

        active = []
        for m, (_, info) in enumerate(self.specialists):
            if parts["active"] is not None and bool(parts["active"][0, m]):
                probs = parts["specialist_probs"][m][0]
                names = [self.classes[c] for c in info["classes"]] + ["<dustbin>"]
                active.append({"id": info.get("id", m), "classes": len(info["classes"]),
                               "top": ranked(probs, names), "dustbin": round(float(probs[-1]), 6)})
        if self.student_of is not None:  # one network: its own top classes are the answer
            return {"mode": self.mode, "single_model": True, "top": ranked(q[0], self.classes),
                    "combined_top": ranked(q[0], self.classes), "active_specialists": []}
        out = {"mode": self.mode, "generalist_top": ranked(parts["generalist"][0], self.classes)}
        if self.generalists > 1:
            out["full_models_top"] = ranked(parts["full_models_mean"][0], self.classes)
        return {**out, "active_specialists": active, "combined_top": ranked(q[0], self.classes)}


def _student_teacher(root: Path) -> str | None:
    """For a `specialists distill` output (student/model.json, no generalist/), what its student was
    distilled from, in words; None for a run directory."""
    if not (root / "student" / "model.json").is_file() or (root / "generalist" / "model.json").is_file():
        return None
    try:
        teacher = json.loads((root / "metrics.json").read_text()).get("teacher", {})
    except (OSError, ValueError):
        teacher = {}
    runs = ", ".join(teacher.get("runs", [])) or "a teacher trained with it"
    what = {"combined": "the generalist + specialists", "generalist": "the generalist", "peers": "the peer ensemble",
            "hybrid": "the full models + specialists"}.get(teacher.get("source"), "the teacher")
    return f"{what} of {runs}"


def top_classes(proba: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) class indices and (N, k) probabilities of each row's k most probable classes,
    best first; equal probabilities in class order, so column 0 is proba.argmax(1)."""
    n_classes = proba.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_classes:
        raise ValueError(f"top_k={k!r} must be an integer in [1, {n_classes}] (the number of classes)")
    index = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return index, np.take_along_axis(proba, index, axis=1)


def load(run_dir: str | Path, device: str | torch.device = "auto", trust_factory: str | None = None,
         **options) -> SpecialistsModel:
    """Load a run directory for prediction; options: top_n, dustbin, specialist_weight, use_specialists,
    generalists (full models: the generalist and peer members 1..generalists-1); see SpecialistsModel.

    trust_factory: a run of a model you brought (model.name=torch) is rebuilt by
    calling its factory, code its model.json names; pass that "module:callable"
    to consent (models.trust_factory), else such a run is refused.
    """
    if trust_factory:
        from .models import trust_factory as trust

        trust(trust_factory)
    return SpecialistsModel(run_dir, device, **options)

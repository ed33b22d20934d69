"""The combine settings a run serves, chosen on its validation split.

With `combine.choose=true` (the default) the evaluate stage scores, on the
validation split, every top_n in CHOOSE_TOP_N with every specialist_weight in
CHOOSE_SPECIALIST_WEIGHTS (and the config's own pair), and the full models
alone beside them. The fewest validation errors win, the config's pair on a
tie. The specialists are served only where that setting fixes more of the full
models' validation errors than it breaks, by a one-sided sign test at level
`combine.significance` (1: any net gain), so that a run whose specialists do
not clearly help on its validation split serves what does: on a hundred
validation rows a gain of a few errors is noise.
The choice lands in `RUN_DIR/combination.json`, one entry per number of full
models; `SpecialistsModel` takes from it every option it is not given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import binomtest

from .combine import combine_outputs
from .config import CombineConfig
from .rundir import RunDir, RunDirError, read_json, write_json

CHOICE_FILE = "combination.json"
CHOOSE_TOP_N = (1, 2, 3)
CHOOSE_SPECIALIST_WEIGHTS = (1.0, 2.0, 4.0, 8.0)


def candidate_settings(combine: CombineConfig, n_classes: int) -> list[tuple[int, float]]:
    """(top_n, specialist_weight) pairs to score, the config's own first (it wins ties)."""
    pairs = [(min(combine.top_n, n_classes), float(combine.specialist_weight))]
    pairs += [(n, w) for n in CHOOSE_TOP_N for w in CHOOSE_SPECIALIST_WEIGHTS if n <= n_classes]
    return list(dict.fromkeys(pairs))


def choose_combination(model, inputs, labels: np.ndarray, settings: Sequence[tuple[int, float]],
                       batch_size: int, significance: float) -> dict:
    """Validation errors of each (top_n, specialist_weight) in `settings` and of the full models alone,
    a batch at a time (memory O(batch x C)), and the choice: the fewest errors, the earliest setting on a
    tie; the specialists used only when that setting fixes more of the full models' errors than it breaks,
    with a one-sided sign test's p-value under `significance` (1: any net gain).

    model: a `SpecialistsModel` with specialists; labels: (N,) class indices of `inputs`.
    """
    fixed = np.zeros(len(settings), dtype=np.int64)  # right where the full models alone are wrong
    broken = np.zeros(len(settings), dtype=np.int64)  # wrong where they are right
    alone = 0
    start = 0
    for full, special in model.iter_outputs(inputs, batch_size):  # (G, B, C), [(B, k_m + 1)]
        truth = torch.from_numpy(np.asarray(labels[start:start + full.shape[1]])).to(full.device)
        start += full.shape[1]
        alone_right = full.mean(0).argmax(1) == truth
        alone += int((~alone_right).sum())
        for i, (top_n, weight) in enumerate(settings):
            right = combine_outputs(full, special, model.specialist_classes, top_n, weight).argmax(1) == truth
            fixed[i] += int((right & ~alone_right).sum())
            broken[i] += int((~right & alone_right).sum())
    if start != len(labels):
        raise ValueError(f"{len(labels)} labels for {start} inputs")
    errors = alone - fixed + broken
    best = int(np.argmin(errors))  # the first of the fewest
    use, p_value = serve_specialists(int(fixed[best]), int(broken[best]), significance)
    top_n, weight = settings[best]
    return {"top_n": int(top_n), "specialist_weight": float(weight), "use_specialists": use,
            "val_errors": int(errors[best]) if use else alone, "full_models_val_errors": alone,
            "fixed": int(fixed[best]), "broken": int(broken[best]), "p_value": p_value,
            "significance": float(significance), "val_examples": int(start),
            "candidates": [{"top_n": int(n), "specialist_weight": float(w), "val_errors": int(e)}
                           for (n, w), e in zip(settings, errors)]}


def serve_specialists(fixed: int, broken: int, significance: float) -> tuple[bool, float]:
    """Whether a combination that fixes `fixed` of the full models' validation errors and breaks `broken`
    of their right answers is served, and the one-sided sign test's p-value of it being no better."""
    changed = fixed + broken
    p_value = float(binomtest(fixed, changed, 0.5, alternative="greater").pvalue) if changed else 1.0
    return fixed > broken and (p_value < significance or significance >= 1), p_value


def write_choice(run: RunDir, generalists: int, choice: dict) -> None:
    """Record `choice` for `generalists` full models in combination.json, keeping the other entries."""
    path = run.root / CHOICE_FILE
    entries = read_json(path) if path.is_file() else {}
    entries[str(generalists)] = choice
    write_json(path, entries)


def clear_choices(run: RunDir) -> None:
    """Forget every choice (combine.choose=false: the config's settings are served as they are)."""
    (run.root / CHOICE_FILE).unlink(missing_ok=True)


def read_choice(run: RunDir, generalists: int, n_classes: int) -> dict | None:
    """The choice recorded for `generalists` full models: top_n, specialist_weight, use_specialists; None
    where none was made. A damaged entry raises RunDirError naming the file and the key."""
    path = run.root / CHOICE_FILE
    if not path.is_file():
        return None
    entries = read_json(path)
    if not isinstance(entries, dict):
        raise RunDirError(f"{path}: must hold an object keyed by the number of full models")
    entry = entries.get(str(generalists))
    if entry is None:
        return None
    top_n, weight, use = (entry.get(k) if isinstance(entry, dict) else None
                          for k in ("top_n", "specialist_weight", "use_specialists"))
    where = f"{path}: [{str(generalists)!r}]"
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= n_classes:
        raise RunDirError(f"{where}.top_n={top_n!r} must be an integer in [1, {n_classes}]")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise RunDirError(f"{where}.specialist_weight={weight!r} must be a number > 0")
    if not isinstance(use, bool):
        raise RunDirError(f"{where}.use_specialists={use!r} must be true or false")
    return {"top_n": top_n, "specialist_weight": float(weight), "use_specialists": use}

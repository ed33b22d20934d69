"""Issue 11's accuracy-compute frontier: peers vs specialists vs hybrids at equal extra compute.

    python -m jobs.frontier [--config FILE] --budgets 0.25 0.5 1 2 --seeds 0 1 2 [--out DIR]
                            [--variants generalist scratch ...]

Compute is counted as training examples processed (forward + backward
passes), relative to E, the generalist's own `examples_seen`. At each extra
budget B, three ways to spend B x E more examples than the generalist:

* (a) peer: the equal-compute peer ensemble, generalists with seeds s+1,
  s+2, ... trained on the generalist's schedule, each capped by what is left
  of (1 + B) x E (`peer.member_epochs`, as the run's peer stage does); the
  members' mean, or the mean of their tempered probabilities (one temperature
  per member, fitted on validation), whichever has fewer validation errors;
* (b) specialists: generalist + specialists with `specialists.budget=B`;
* (c) hybrid: the peer members that (a) trains at a smaller budget B - b and
  specialists with budget b, for each b < B in --budgets, combined with
  `combine.generalists` = members + 1.

Every setting is chosen on the validation split: for (b) and (c) the
specialists' training variant (--variants, see VARIANTS), combine.top_n,
combine.specialist_weight and whether the full models are tempered; the test
split is only reported. The verdict at each B compares (a) with (b) or (c),
whichever made fewer validation errors on each seed; the lower of the (b) and
(c) test means is printed beside it, but choosing by it would be choosing on
test. Per seed everything lives under DIR/seed<s>/: the
generalist and its clusters (`base/`), each peer member (`members/<k>-e<epochs>/`,
reused by every budget that trains the same member), each specialists run
(`spec-b<B>-<variant>/`, forked from base by `stages.fork_run`), with the
models' validation and test probabilities stored beside them, so a rerun
trains only what is missing; a seed whose DIR/seed<s>/frontier.json was scored with the same config,
budgets and variants is not scored again (--rescore to score it again). Printed and written to DIR: a Markdown table
(test errors per seed and their mean, examples processed, CPU-seconds of
training), with several --variants a table of each variant's (b) alone (validation and test errors, the
specialists' CPU-seconds), and a PNG of mean test errors against B.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from specialists.cli import exit_status
from specialists.config import load_config
from specialists.combination_choice import (CHOOSE_SPECIALIST_WEIGHTS, CHOOSE_TOP_N, candidate_settings,
                                            serve_specialists)
from specialists.combine import combine_outputs
from specialists.ensemble import SpecialistsModel
from specialists.evaluation import fit_temperature, temper
from specialists.generalist import fit_generalist
from specialists.models import load_checkpoint, save_checkpoint
from specialists.parallel import train_specialists
from specialists.peer import member_epochs
from specialists.report.document import Doc, Heading, Para, Table, render_md
from specialists.report.plots import frontier_png
from specialists.rundir import RunDir, atomic_write, read_json, write_bytes, write_json, write_text
from specialists.runtime import dataset_for_run, setup_torch, timed_stage
from specialists.stages import fork_run, run_pipeline
from specialists.train import predict_proba

# specialists.* overrides of each training variant; the config's own settings are "default"
# Each variant sets every key it relies on: a frontier run forks a base run whose config.yaml holds the resolved
# defaults (specialists.init=auto made concrete: character grams, 100,000 buckets). WORDS: the generalist's hashing.
WORDS = ["specialists.ngrams=0", "specialists.char_ngrams=-1", "specialists.char_ngrams_min=0", "specialists.buckets=0"]
VARIANTS = {
    "default": [],
    "generalist": ["specialists.init=generalist", *WORDS],  # the paper's start: the generalist's weights
    "lr0.02": ["specialists.lr=0.02"],
    "soft0": ["specialists.soft_weight=0"],
    "soft0.5": ["specialists.soft_weight=0.5"],
    "linear": ["specialists.schedule=linear", "specialists.lr=0.02"],
    "widen2": ["specialists.widen=2"],  # specialists that differ more from the generalist: twice its hidden units
    "scratch": ["specialists.init=scratch", *WORDS],  # independent of the generalist: its network, fresh weights
    # nor pulled towards its outputs
    "scratch_soft0": ["specialists.init=scratch", *WORDS, "specialists.soft_weight=0"],
    # fasttext: specialists that read character 1..3-grams beside the generalist's words, so they err differently
    "scratch_chars3": ["specialists.init=scratch", "specialists.char_ngrams=3", "specialists.char_ngrams_min=1",
                       "specialists.buckets=0"],
    # the same with half the embedding: cheaper a step, weaker an example (README, the frontier)
    "scratch_chars3_d64": ["specialists.init=scratch", "specialists.char_ngrams=3", "specialists.char_ngrams_min=1",
                           "specialists.buckets=0", "specialists.embed_dim=64"],
    # ... with half the hash buckets (README, the frontier)
    "scratch_chars3_b100k": ["specialists.init=scratch", "specialists.char_ngrams=3", "specialists.char_ngrams_min=1",
                             "specialists.buckets=100000"],
    # ... without single characters (2..3-grams): what `specialists.init=auto` trains (README, the frontier)
    "scratch_chars23_b100k": ["specialists.init=scratch", "specialists.char_ngrams=3", "specialists.char_ngrams_min=2",
                              "specialists.buckets=100000"],
}
SPLITS = ("val", "test")


def default_variants(cfg) -> list[str]:
    """The paper's start and a fresh one; for fasttext also fresh specialists on character grams."""
    return ["generalist", "scratch"] + (["scratch_chars3"] if cfg.model.name == "fasttext" else [])


def quiet(_: str) -> None:
    pass


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz written whole or not at all (a killed job leaves no truncated file to trust)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


# ---------------------------------------------------------------------------
# the models of one seed, trained once and stored with their outputs


class Seed:
    """Everything one seed trains, cached under `folder`: the generalist, peer members, specialists runs."""

    def __init__(self, config: str | None, seed: int, folder: Path):
        self.config, self.seed, self.folder = config, seed, folder
        self.base = RunDir(folder / "base")
        if not (self.base.metrics.is_file() and "ensemble" in self.base.read_metrics()):
            cfg = load_config(config, [f"seed={seed}", "specialists.enabled=false", "peer.enabled=false"])
            run_pipeline(cfg, self.base.root, resume=self.base.config.is_file(), log=quiet, progress=False)
        self.cfg, self.dataset = dataset_for_run(self.base)
        self.device = setup_torch(self.cfg)
        generalist = self.base.read_metrics()["generalist"]
        self.examples = int(generalist["examples_seen"])  # E
        self.cpu_seconds = float(generalist.get("cpu_seconds", 0.0))
        self.labels = {split: getattr(self.dataset, split).labels for split in SPLITS}
        self.general = self._outputs(self.base.generalist, lambda: load_checkpoint(self.base.generalist, self.device))

    def _outputs(self, folder: Path, model) -> dict[str, np.ndarray]:
        """(N, C) float32 validation and test probabilities of a full model, stored as outputs.npz."""
        path = folder / "outputs.npz"
        if not path.is_file():
            m = model()
            probs = {split: predict_proba(m, m.encode(getattr(self.dataset, split).inputs),
                                          self.cfg.train.eval_batch_size, self.device) for split in SPLITS}
            save_arrays(path, probs)
        with np.load(path) as stored:
            return {split: stored[split] for split in SPLITS}

    def member(self, k: int, epochs: int) -> dict:
        """Peer member k (seed s + k) trained for at most `epochs`: its record and outputs."""
        folder = self.folder / "members" / f"{k}-e{epochs}"
        record = folder / "member.json"
        if not record.is_file():
            model, result = fit_generalist(self.cfg, self.dataset, self.device, seed=self.seed + k, epochs=epochs,
                                           desc=f"peer {k}", progress=False)
            save_checkpoint(model, folder)
            self._outputs(folder, lambda: model)
            write_json(record, {"member": k, "epochs_allowed": epochs, "epochs_run": result.epochs_run,
                                "examples_seen": result.examples_seen, "seconds": round(result.seconds, 3),
                                "cpu_seconds": round(result.cpu_seconds, 3)})
        return {**read_json(record), "outputs": self._outputs(folder, None)}

    def peers(self, budget: float) -> list[dict]:
        """The members of the peer ensemble at extra budget `budget` (the generalist not included)."""
        total, used, members = round((1 + budget) * self.examples), self.examples, []
        while len(members) + 1 < self.cfg.peer.max_members:
            epochs = member_epochs(total, used, len(self.dataset.train), self.cfg.train.epochs)
            if epochs < 1:
                break
            members.append(self.member(len(members) + 1, epochs))
            used += members[-1]["examples_seen"]
        return members

    def specialists(self, budget: float, variant: str) -> dict:
        """Generalist + specialists trained with specialists.budget=budget and the variant's overrides."""
        run = RunDir(self.folder / f"spec-b{budget:g}-{variant}")
        path = run.root / "outputs.npz"
        if not path.is_file():
            if not (run.metrics.is_file() and "specialists" in run.read_metrics()):
                if run.root.exists():  # an unfinished fork: start it again
                    shutil.rmtree(run.root)
                fork_run(self.base, run.root, ["specialists.enabled=true", f"specialists.budget={budget}",
                                               "peer.enabled=false", *VARIANTS[variant]])
                cfg = load_config(run.config)
                timed_stage(run, "specialists", lambda: train_specialists(cfg, self.dataset, run, self.device,
                                                                            log=quiet, progress=False),
                            "specialists")
            model = SpecialistsModel(run.root, self.device, generalists=1, use_specialists=True)
            arrays = {}
            for split in SPLITS:
                _, special = model.outputs(getattr(self.dataset, split).inputs, self.cfg.train.eval_batch_size)
                arrays.update({f"{split}_{m}": probs for m, probs in enumerate(special)})
            write_json(run.root / "outputs.json", [info["classes"] for _, info in model.specialists])
            save_arrays(path, arrays)
        section = run.read_metrics()["specialists"]
        classes = read_json(run.root / "outputs.json")
        with np.load(path) as stored:
            outputs = {split: [stored[f"{split}_{m}"] for m in range(len(classes))] for split in SPLITS}
        return {"variant": variant, "budget": budget, "classes": classes, "outputs": outputs,
                "examples_seen": int(section["examples_seen"]), "cpu_seconds": float(section.get("cpu_seconds", 0)),
                "wall_seconds": run.read_metrics()["timings"]["specialists"]}


# ---------------------------------------------------------------------------
# choosing on validation


def errors(probs: np.ndarray | torch.Tensor, labels: np.ndarray) -> int:
    return int((np.asarray(probs).argmax(1) != labels).sum())


def full_models(seed: Seed, members: list[dict], tempered: bool) -> dict[str, torch.Tensor]:
    """(G, N, C) float64 probabilities of the generalist and `members` per split; tempered: each model's
    probabilities at the temperature that fits its validation labels best."""
    models = [seed.general] + [m["outputs"] for m in members]
    temperatures = [fit_temperature(outputs["val"], seed.labels["val"]) if tempered else 1.0 for outputs in models]
    return {split: torch.from_numpy(np.stack([temper(outputs[split].astype(np.float64), t) if tempered
                                              else outputs[split].astype(np.float64)
                                              for outputs, t in zip(models, temperatures)]))
            for split in SPLITS}


def best_combination(seed: Seed, members: list[dict], specialists: list[dict], as_run: bool = False) -> dict:
    """The setting with the fewest validation errors among: tempered or not, each specialists run
    (training variant), top_n and specialist_weight; its validation and test errors. as_run: what
    `specialists run` serves (combination_choice.py): untempered, its candidate settings, and the full
    models alone unless the best of them passes the run's sign test on validation."""
    candidates = []
    for tempered in (False,) if as_run else (False, True):
        full = full_models(seed, members, tempered)
        for spec in specialists or [None]:
            if spec is None:
                settings = [(None, None)]
            elif as_run:
                settings = candidate_settings(seed.cfg.combine, seed.dataset.n_classes)
            else:
                settings = [(n, w) for n in CHOOSE_TOP_N for w in CHOOSE_SPECIALIST_WEIGHTS
                            if n <= seed.dataset.n_classes]
            classes = [torch.tensor(c) for c in spec["classes"]] if spec else []
            for top_n, weight in settings:
                def combined(split, full=full, spec=spec, classes=classes, top_n=top_n, weight=weight):
                    probs = [torch.from_numpy(p.astype(np.float64)) for p in spec["outputs"][split]] if spec else []
                    return combine_outputs(full[split], probs, classes, top_n or 1, weight or 1.0).numpy()

                candidates.append(((errors(combined("val"), seed.labels["val"]), len(candidates)), combined,
                                   {"tempered": tempered, "variant": spec["variant"] if spec else None,
                                    "top_n": top_n, "specialist_weight": weight}, spec))
    (val_errors, _), combined, setting, spec = min(candidates, key=lambda c: c[0])
    if as_run and spec is not None:
        full = full_models(seed, members, False)
        alone = full["val"].mean(0).numpy().argmax(1) == seed.labels["val"]
        right = combined("val").argmax(1) == seed.labels["val"]
        use, _ = serve_specialists(int((right & ~alone).sum()), int((~right & alone).sum()),
                                   seed.cfg.combine.significance)
        if not use:
            val_errors, spec = int((~alone).sum()), None
            setting = {"tempered": False, "variant": None, "top_n": None, "specialist_weight": None}

            def combined(split, full=full):
                return full[split].mean(0).numpy()
    examples = seed.examples + sum(m["examples_seen"] for m in members) + (spec["examples_seen"] if spec else 0)
    cpu = seed.cpu_seconds + sum(m["cpu_seconds"] for m in members) + (spec["cpu_seconds"] if spec else 0)
    return {**setting, "full_models": 1 + len(members), "val_errors": val_errors,
            "test_errors": errors(combined("test"), seed.labels["test"]), "examples_seen": examples,
            "examples_x": examples / seed.examples, "cpu_seconds": round(cpu, 1)}


def frontier_seed(seed: Seed, budgets: list[float], variants: list[str], log=print) -> dict:
    """(a), (b), (c) at each budget for one seed."""
    general = {"val_errors": errors(seed.general["val"], seed.labels["val"]),
               "test_errors": errors(seed.general["test"], seed.labels["test"]), "examples_seen": seed.examples,
               "cpu_seconds": seed.cpu_seconds}
    out = {"generalist": general, "budgets": {}}
    for budget in budgets:
        row = {"peer": best_combination(seed, seed.peers(budget), [])}
        row["specialists"] = best_combination(seed, [], [seed.specialists(budget, v) for v in variants])
        row["specialists_fixed"] = best_combination(seed, [], [seed.specialists(budget, "default")], as_run=True)
        if len(variants) > 1:  # each variant's (b) alone, for the table that compares them
            row["variants"] = {v: {**best_combination(seed, [], [seed.specialists(budget, v)]),
                                   "specialists_cpu_seconds": seed.specialists(budget, v)["cpu_seconds"]}
                               for v in variants}
        hybrids = []
        for spec_budget in (b for b in budgets if b < budget):
            members = seed.peers(budget - spec_budget)
            if members:
                hybrids.append(best_combination(seed, members, [seed.specialists(spec_budget, v) for v in variants]))
                hybrids[-1]["specialists_budget"] = spec_budget
        if hybrids:
            row["hybrid"] = min(hybrids, key=lambda h: h["val_errors"])
        out["budgets"][str(budget)] = row
        log(f"seed {seed.seed} B={budget:g}: generalist {general['test_errors']}, "
            + ", ".join(f"{name} {r['test_errors']} (val {r['val_errors']}, {r['examples_x']:.2f}x)"
                        for name, r in row.items() if name != "variants"))
    return out


# ---------------------------------------------------------------------------
# the table and the plot


METHODS = (("peer", "(a) peer ensemble"), ("specialists", "(b) generalist + specialists"),
           ("hybrid", "(c) hybrid"),
           ("specialists_fixed", "(b) as `specialists run` serves it: the config's training, combine settings "
                                 "chosen on validation"))


METHOD_NAMES = {"specialists": "(b)", "hybrid": "(c)"}


def chosen_method(row: dict) -> str:
    """(b) or (c), whichever made fewer validation errors; (b), the one with fewer full models, on a tie."""
    return min((m for m in METHOD_NAMES if m in row), key=lambda m: row[m]["val_errors"])


def setting_text(r: dict) -> str:
    parts = [f"{r['full_models']} full model{'s' if r['full_models'] > 1 else ''}"]
    if r.get("variant"):
        parts.append(f"specialists {r['variant']}" + (f" b={r['specialists_budget']:g}" if "specialists_budget" in r
                                                      else ""))
        parts.append(f"top_n {r['top_n']}, weight {r['specialist_weight']:g}")
    if r["tempered"]:
        parts.append("tempered")
    return "; ".join(parts)


def summarise(results: dict[int, dict], budgets: list[float], title: str) -> tuple[Doc, dict]:
    seeds = sorted(results)
    general = [results[s]["generalist"]["test_errors"] for s in seeds]
    doc = Doc(title)
    doc.add(Para(f"Seeds {seeds}; generalist test errors {general} (mean {np.mean(general):.1f}). Test errors per "
                 "seed (mean); examples processed in training as a multiple of the generalist's, and CPU-seconds "
                 "of training, both means over seeds. Every setting chosen on validation errors."))
    rows, means = [], {}
    for budget in budgets:
        key = str(budget)
        for method, label in METHODS:
            found = [results[s]["budgets"][key].get(method) for s in seeds]
            if not all(found):
                continue
            test = [r["test_errors"] for r in found]
            means.setdefault(method, {})[budget] = float(np.mean(test))
            rows.append([f"{budget:g}", label, " ".join(map(str, test)) + f" ({np.mean(test):.1f})",
                         f"{np.mean([r['examples_x'] for r in found]):.2f}",
                         f"{np.mean([r['cpu_seconds'] for r in found]):.0f}",
                         " | ".join(setting_text(r) for r in found)])
        worse = [(s, m) for s in seeds for m in ("specialists", "hybrid")
                 if m in results[s]["budgets"][key]
                 and results[s]["budgets"][key][m]["test_errors"] > results[s]["generalist"]["test_errors"]]
        if worse:
            rows.append([f"{budget:g}", "worse than the generalist", "", "", "",
                         ", ".join(f"seed {s} {m}" for s, m in worse)])
        if budget not in means.get("peer", {}):
            continue
        best = min(("specialists", "hybrid"), key=lambda m: means.get(m, {}).get(budget, float("inf")))
        if budget in means.get(best, {}):
            rows.append([f"{budget:g}", "lower of the (b), (c) means vs (a) (a choice made on test)",
                         f"{means[best][budget] - means['peer'][budget]:+.1f}", "", "", ""])
        chosen = [chosen_method(results[s]["budgets"][key]) for s in seeds]
        test = [results[s]["budgets"][key][m]["test_errors"] for s, m in zip(seeds, chosen)]
        means.setdefault("chosen", {})[budget] = float(np.mean(test))
        gap = means["chosen"][budget] - means["peer"][budget]
        rows.append([f"{budget:g}", "(b) or (c), chosen per seed on validation, vs (a)",
                     " ".join(map(str, test)) + f" ({np.mean(test):.1f}): {gap:+.1f}", "", "",
                     ("won" if gap < 0 else "NOT won") + ": " + ", ".join(METHOD_NAMES[m] for m in chosen)])
    doc.add(Table(["B", "method", "test errors per seed (mean)", "examples (x E)", "CPU-s", "settings per seed"],
                  rows))
    variant_rows = variant_table(results, budgets)
    if variant_rows:
        doc.add(Para("Each training variant alone: (b) with only its specialists, its setting chosen on "
                     "validation; the specialists' own CPU-seconds (their Ray tasks), means over seeds."))
        doc.add(Table(["B", "variant", "validation errors per seed (mean)", "test errors per seed (mean)",
                       "specialists CPU-s"], variant_rows))
    return doc, {"generalist": float(np.mean(general)), "means": means}


def variant_table(results: dict[int, dict], budgets: list[float]) -> list[list[str]]:
    """Rows of (b) per training variant, for the variants every seed scored at that budget."""
    rows, seeds = [], sorted(results)
    for budget in budgets:
        scored = [results[s]["budgets"][str(budget)].get("variants", {}) for s in seeds]
        for variant in sorted(set.intersection(*(set(v) for v in scored))) if scored else []:
            found = [v[variant] for v in scored]
            val, test = [r["val_errors"] for r in found], [r["test_errors"] for r in found]
            rows.append([f"{budget:g}", variant, " ".join(map(str, val)) + f" ({np.mean(val):.1f})",
                         " ".join(map(str, test)) + f" ({np.mean(test):.1f})",
                         f"{np.mean([r['specialists_cpu_seconds'] for r in found]):.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: the built-in Banking77 defaults)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        help="specialists training variants to choose among on validation (default: generalist "
                             "scratch, and scratch_chars3 for fasttext, as the README's tables)")
    parser.add_argument("--out", help="where the runs and results go (default runs/frontier-<config name>)")
    parser.add_argument("--rescore", action="store_true",
                        help="score every seed again, even one whose frontier.json matches this request")
    args = parser.parse_args()
    name = Path(args.config).stem if args.config else "banking77"
    out = Path(args.out or f"runs/frontier-{name}")
    budgets = sorted(args.budgets)
    for s, budget in itertools.product(args.seeds, budgets):  # every setting checked before anything trains
        load_config(args.config, [f"seed={s}", f"specialists.budget={budget}"])
    out.mkdir(parents=True, exist_ok=True)
    args.variants = args.variants or default_variants(load_config(args.config))

    results = {}
    request = {"config": args.config, "budgets": budgets, "variants": sorted(args.variants)}
    for s in args.seeds:
        scored = out / f"seed{s}" / "frontier.json"
        if not args.rescore and scored.is_file() and read_json(scored).get("request") == request:
            results[s] = read_json(scored)
            print(f"seed {s}: scored before with the same request, reused ({scored})")
            continue
        started = time.perf_counter()
        results[s] = frontier_seed(Seed(args.config, s, out / f"seed{s}"), budgets, args.variants)
        results[s]["seconds"] = round(time.perf_counter() - started, 1)
        results[s]["request"] = request
        write_json(scored, results[s])
    doc, means = summarise(results, budgets, f"Accuracy-compute frontier: {name}")
    doc.add(Heading(2, "Plot"), Para("frontier.png: mean test errors against the extra budget B."))
    text = render_md(doc)
    print(text)
    write_text(out / "frontier.md", text)
    write_json(out / "frontier.json", {"config": args.config, "budgets": budgets, "seeds": args.seeds,
                                        "variants": args.variants, "results": results, **means})
    plotted = {k: v for k, v in means["means"].items() if k in ("peer", "specialists", "hybrid")}
    write_bytes(out / "frontier.png", frontier_png(budgets, plotted, means["generalist"], name))
    print(f"written: {out / 'frontier.md'}, {out / 'frontier.png'}")


if __name__ == "__main__":
    sys.exit(exit_status(main))

"""Issue 5's accuracy goals: `specialists run` on several seeds, and an ablation of what helps.

    python -m jobs.accuracy --config configs/banking77.yaml [--seeds 0 1 2] [--ablation] [--out DIR]

For each seed, one full `specialists run` (generalist, clusters, specialists,
the equal-compute peer ensemble, evaluation) into `DIR/seed<s>`; an existing
finished run there is reused (`--resume`). Printed per seed: test errors of the
generalist, of generalist + specialists and of the peer ensemble, and the
paper's Table 4 (gain by the number of specialists covering the true class).

`--ablation` then varies one part at a time on each seed's own generalist and
clusters, and prints validation and test errors of the combination:

* combination only (same specialists): the paper's recipe (top_n=1, equal
  weights), top_n 1 / 2 / 3 (one of them is the config's), specialist_weight
  1 / 2, dustbin correction off or for the natural prior;
* specialists retrained (into `DIR/seed<s>-<variant>`, forked from the seed's
  run by `stages.fork_run`, which keeps its generalist, and its clusters unless
  a cluster.* setting changes): no soft-target regularisation (soft_weight=0;
  or, where the config has none, soft_weight=0.5), no dustbin prior shift in
  training (dustbin_correction=none), the generalist's learning rate and
  patience (specialists.lr=0, patience=-1), each class in up to 3 clusters
  (cluster.overlap=3).

The defaults were chosen on validation errors; test errors are printed beside
them for the record, not for choosing. The tables are printed as Markdown by
the report's renderer.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
from pathlib import Path

import numpy as np

from specialists.cli import exit_status
from specialists.config import load_config
from specialists.ensemble import SpecialistsModel
from specialists.evaluation import sum_by_covering
from specialists.report.document import Doc, Heading, Table, render_md
from specialists.report.tables import covering_table
from specialists.rundir import RunDir, write_json
from specialists.runtime import dataset_for_run
from specialists.stages import fork_run, run_pipeline

COMBINE_VARIANTS = {  # name: SpecialistsModel options
    "default": {},
    "paper recipe (top_n=1, weight 1)": {"top_n": 1, "specialist_weight": 1.0},
    "top_n=1": {"top_n": 1},
    "top_n=2": {"top_n": 2},
    "top_n=3": {"top_n": 3},
    "specialist_weight=1": {"specialist_weight": 1.0},
    "specialist_weight=2": {"specialist_weight": 2.0},
    "dustbin correction off": {"dustbin": "none"},
    "dustbin correction for the natural prior": {"dustbin": "natural"},
    "generalist alone": {"use_specialists": False},
}
TRAIN_VARIANTS = {  # name: (folder suffix, config overrides)
    "no soft targets (soft_weight=0)": ("nosoft", ["specialists.soft_weight=0"]),
    "no dustbin prior shift in training": ("noprior", ["specialists.dustbin_correction=none"]),
    "generalist's lr and patience": ("genlr", ["specialists.lr=0", "specialists.patience=-1"]),
    "overlap: each class in up to 3 clusters": ("overlap", ["cluster.overlap=3"]),
}


def train_overrides(suffix: str, overrides: list[str], overlap_ratio: float) -> list[str]:
    """A training variant's overrides; the overlap variant's clusters reach `overlap_ratio` farther."""
    return [*overrides, f"cluster.overlap_ratio={overlap_ratio}"] if suffix == "overlap" else overrides


def seed_run(config: str | None, seed: int, out: Path) -> RunDir:
    folder = out / f"seed{seed}"
    resume = (folder / "config.yaml").is_file()
    cfg = None if resume else load_config(config, [f"seed={seed}"])
    return run_pipeline(cfg, folder, resume=resume, log=lambda s: None, progress=False)


def variant_run(base: RunDir, suffix: str, overrides: list[str]) -> RunDir:
    """`base` with `overrides` and no peer ensemble: the stages they change retrained, the rest kept."""
    run = RunDir(Path(f"{base.root}-{suffix}"))
    if run.metrics.is_file() and "ensemble" in run.read_metrics():
        return run
    if not run.config.is_file():  # config.yaml is a fork's last file: without it, fork again
        shutil.rmtree(run.root, ignore_errors=True)
        fork_run(base, run.root, [*overrides, "peer.enabled=false"])
    return run_pipeline(None, run.root, resume=True, log=lambda s: None, progress=False)


def errors(run: RunDir, **options) -> tuple[int, int]:
    """(val errors, test errors) of the combination with `options`."""
    _, dataset = dataset_for_run(run)
    model = SpecialistsModel(run.root, "cpu", **options)
    return tuple(int((model.predict_proba(split.inputs).argmax(1) != split.labels).sum())
                 for split in (dataset.val, dataset.test))


def seconds(metrics: dict) -> float:
    """The run's stages together (timings.total is only the last, possibly resumed, invocation's)."""
    return sum(v for k, v in metrics["timings"].items() if k not in ("total", "report"))


def table(header: tuple, rows: list[tuple]) -> Table:
    return Table([str(h) for h in header], [[str(c) for c in row] for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: the built-in Banking77 defaults)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablation", action="store_true", help="also vary one part at a time")
    parser.add_argument("--out", default="runs/accuracy", help="where the runs go (reused when finished)")
    parser.add_argument("--overlap-ratio", type=float, default=1.5,
                        help="cluster.overlap_ratio of the overlap variant (how much farther a second cluster may be)")
    args = parser.parse_args()
    checked = [train_overrides(*v, args.overlap_ratio) for v in TRAIN_VARIANTS.values()] if args.ablation else []
    for seed, overrides in itertools.product(args.seeds, [[], *checked]):  # checked before anything trains
        load_config(args.config, [f"seed={seed}", *overrides])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results: dict = {"config": args.config, "seeds": {}}
    rows = []
    for seed in args.seeds:
        run = seed_run(args.config, seed, out)
        m = run.read_metrics()
        e, p = m["ensemble"], m.get("peer_ensemble", {})
        results["seeds"][seed] = {"generalist_test_errors": e["generalist_test_errors"],
                                  "ensemble_test_errors": e["test_errors"], "error_reduction": e["error_reduction"],
                                  "relative_accuracy_gain": e["relative_accuracy_gain"],
                                  "peer_test_errors": p.get("test_errors"), "peer_members": p.get("members"),
                                  "by_covering": e["by_covering"], "seconds": seconds(m)}
        general = e["generalist_test_errors"]
        peer = f"{p['test_errors']} ({p['members']} members, {(general - p['test_errors']) / general:+.1%})" if p else "-"
        rows.append((seed, f"{e['generalist_test_accuracy']:.4f}", general, f"{e['test_accuracy']:.4f}",
                     e["test_errors"], f"{e['error_reduction']:.1%}", f"{e['relative_accuracy_gain']:+.1%}", peer,
                     f"{seconds(m):.0f}"))
    doc = Doc(f"{args.config or 'default (Banking77)'}: seeds {args.seeds}")
    doc.add(table(("seed", "generalist acc", "errors", "ensemble acc", "errors", "fewer errors", "rel. gain",
                   "peer ensemble errors", "run s"), rows),
            Heading(2, "By number of specialists covering the true class (the paper's Table 4), summed over seeds"),
            covering_table(sum_by_covering(r["by_covering"] for r in results["seeds"].values())))

    if args.ablation:
        ablation: dict = {}
        for seed in args.seeds:
            base = RunDir(out / f"seed{seed}")
            for name, options in COMBINE_VARIANTS.items():
                ablation.setdefault(name, []).append(errors(base, **options))
            variants = dict(TRAIN_VARIANTS)
            if load_config(base.config).specialists.soft_weight == 0:  # the config has none: try them instead
                del variants["no soft targets (soft_weight=0)"]
                variants = {"soft targets (soft_weight=0.5)": ("soft", ["specialists.soft_weight=0.5"]), **variants}
            for name, (suffix, overrides) in variants.items():
                variant = variant_run(base, suffix, train_overrides(suffix, overrides, args.overlap_ratio))
                ablation.setdefault(name, []).append(errors(variant))
                if suffix == "overlap":  # Table 4 of the overlapping clusters
                    results.setdefault("overlap_by_covering", {})[seed] = variant.read_metrics()["ensemble"]["by_covering"]
        results["ablation"] = {k: [list(v) for v in vals] for k, vals in ablation.items()}
        general = ablation["generalist alone"]
        doc.add(Heading(2, f"Ablation: validation / test errors (seeds {args.seeds}; mean change in test errors "
                           "vs the generalist)"),
                table(("variant", "val/test errors per seed", "test"),
                      [(name, " ".join(f"{v}/{t}" for v, t in vals),
                        f"{np.mean([(g[1] - t) / g[1] for (_, t), g in zip(vals, general)]):+.1%} fewer")
                       for name, vals in ablation.items()]),
                Heading(2, "Table 4 with overlapping clusters (the overlap variant), summed over seeds"),
                covering_table(sum_by_covering(results["overlap_by_covering"].values())))
    print(render_md(doc))
    write_json(out / "accuracy.json", results)
    print(f"written: {out / 'accuracy.json'}")


if __name__ == "__main__":
    sys.exit(exit_status(main))

"""Generalist + specialist classifiers over large label sets (Hinton, Vinyals & Dean, 2015).

    import specialists
    model = specialists.load("runs/banking77-...")
    model.predict(["I still have not received my card"])
"""

__version__ = "0.1.0"


def load(run_dir, device="auto", **options):
    """Load a run directory for prediction (options: top_n, dustbin, use_specialists);
    see `specialists.ensemble.SpecialistsModel`."""
    from .ensemble import load as _load  # keep `import specialists` light: torch loads on first use

    return _load(run_dir, device, **options)

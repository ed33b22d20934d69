"""Generalist + specialist classifiers over large label sets (Hinton, Vinyals & Dean, 2015).

    import specialists
    model = specialists.load("runs/banking77-...")
    model.predict(["I still have not received my card"])
"""

__version__ = "0.1.0"


def load(run_dir, device="auto", **options):
    """Load a run directory for prediction (options: top_n, dustbin, specialist_weight, use_specialists,
    generalists, trust_factory; those not given are the run's choice on validation, combination.json); see
    `specialists.ensemble.load`."""
    from .ensemble import load as _load  # keep `import specialists` light: torch loads on first use

    return _load(run_dir, device, **options)


def trust_factory(path):
    """Let checkpoints whose model.json names factory `path` ("module:callable", model.name=torch) load in this
    process; see `specialists.models.trust_factory`."""
    from .models import trust_factory as _trust

    _trust(path)


def inspect(probs=None, logits=None, labels=None, classes=None, out=None, **settings):
    """The clustering report from any model's (N, C) probs or logits (files or arrays), with
    optional labels and class names; see `specialists.inspection.inspect`."""
    from .inspection import inspect as _inspect  # the module is not named inspect: it would shadow this function

    return _inspect(probs=probs, logits=logits, labels=labels, classes=classes, out=out, **settings)

"""The allowed values of every setting that names a choice: the one list of each.

config.py validates settings against these tuples, and the code that acts on a
choice uses the same tuple (the model registry asserts that its keys are
`MODEL_NAMES`). This module imports nothing, so config.py stays free of torch
and faiss and every other module may import it.
"""

DATA_KINDS = ("csv_text", "npz", "mnist", "synthetic")  # data.load_dataset
MODEL_NAMES = ("fasttext", "mlp", "cnn", "torch", "hf", "timm")  # the keys of models.MODELS
USER_MODELS = ("torch", "hf", "timm")  # generalists a user brings (adapters.py): model.weights, no widen
DEVICES = ("auto", "cpu", "cuda")  # models.resolve_device
OPTIMIZERS = ("adam", "sgd")  # train.train_model
SCHEDULES = ("constant", "linear")  # train.train_model: the learning rate, constant or decaying linearly to 0
NORMALIZATIONS = ("covariance", "correlation", "l2")  # cluster.ConfusionClusterer(normalize=...)
ENSEMBLE_MEANS = ("arithmetic", "geometric")  # distill.ensemble_probs and combine.solve (mean=...)
DUSTBIN_CORRECTIONS = ("prior", "paper", "none")  # how a specialist trains and stores b (specialist.py)
DUSTBIN_MODES = ("active", "natural", "none")  # which stored correction a combiner applies (ensemble.py)
TEACHER_SOURCES = ("combined", "generalist")  # what a teacher run gives a distilled student (distill_run.py)
CLUSTER_SIGNALS = ("probs", "tempered", "train_tempered", "out_of_fold", "head", "confusion")  # signals.confusability
LABELLED_SIGNALS = ("out_of_fold", "confusion")  # the signals that read labels: never an unlabeled cluster.split file

"""The allowed values of every setting that names a choice: the one list of each.

config.py and distill_config.py validate settings against these tuples, and the code that acts on a
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
DUSTBIN_CORRECTIONS = ("prior", "paper", "none")  # how a specialist trains and stores b (dustbin.py)
SPECIALIST_INITS = ("generalist", "scratch")  # a specialist's starting weights (specialist.py)
AUTO = "auto"  # specialists.init: the model's default start, made concrete when the config loads
DUSTBIN_MODES = ("active", "natural", "none")  # which stored correction a combiner applies (ensemble.py)
# what a teacher run gives a distilled student (distill_run.py): generalist + specialists, the generalist alone,
# the peer ensemble (generalist + peers/<k>/, section 4), or the hybrid (all full models + specialists)
TEACHER_SOURCES = ("combined", "generalist", "peers", "hybrid")
# distill_run: auto = the generalist when the architectures match; both = each, the better on validation kept
STUDENT_INITS = ("auto", "scratch", "generalist", "both")
TEXT_AUGMENTATIONS = ("token_dropout", "span_mask", "swap")  # transfer.py: copies of training texts
ARRAY_AUGMENTATIONS = ("noise", "jitter", "mixup")  # transfer.py: copies of training vectors / images
CLUSTER_SIGNALS = ("probs", "tempered", "train_tempered", "out_of_fold", "head", "confusion")  # signals.confusability
LABELLED_SIGNALS = ("out_of_fold", "confusion")  # the signals that read labels: never an unlabeled cluster.split file

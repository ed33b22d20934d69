"""The model registry, input encoding, dustbin heads and safe checkpoints.

Every model ends in a linear layer called `head` (one row per class) so a
specialist can swap it for its own classes plus a dustbin. Each model turns
raw user inputs into tensors itself (`encode`), so a checkpoint alone is
enough to predict: the text hashing settings and the feature normalisation
are part of the model.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError
from .rundir import atomic_write, write_json


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match the model it claims to be."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device=auto or cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------
# encoded inputs: what a training loop or predictor slices into batches


class EncodedTexts:
    """Hashed n-gram ids per text; batches are (flat ids, offsets) for EmbeddingBag."""

    def __init__(self, ids: list[np.ndarray]):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
        parts = [self.ids[i] for i in index]
        lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(parts) else np.zeros(0, np.int64)
        flat = np.concatenate(parts) if len(parts) else np.zeros(0, np.int64)
        return torch.from_numpy(flat).to(device), torch.from_numpy(offsets).to(device)


class EncodedArrays:
    """A float or uint8 tensor of examples; batches are (x,)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
        return (self.x[torch.from_numpy(np.asarray(index))].to(device).float(),)


_WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def hash_ngrams(text: str, buckets: int, ngrams: int) -> np.ndarray:
    """Word 1..n-grams of lower-cased `text`, hashed (CRC32: stable across runs) into [0, buckets)."""
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i:i + n]) for n in range(1, ngrams + 1) for i in range(len(words) - n + 1)]
    return np.array([zlib.crc32(g.encode()) % buckets for g in grams], dtype=np.int64)


# ---------------------------------------------------------------------------
# building blocks


def _mlp(width: int, hidden: list[int], dropout: float) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    return nn.Sequential(*layers), width


def _random_shift(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """Translate each (N, H, W) image by up to `pixels` in each direction (zero fill)."""
    n, h, w = x.shape
    padded = nn.functional.pad(x, (pixels, pixels, pixels, pixels))
    dy = torch.randint(0, 2 * pixels + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * pixels + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None], rows, cols]


class FastText(nn.Module):
    """fastText-style classifier: mean of hashed word n-gram embeddings, then an MLP."""

    input_kind = "text"

    def __init__(self, n_classes: int, buckets: int = 200_000, embed_dim: int = 128, ngrams: int = 2,
                 hidden: list[int] = (256,), dropout: float = 0.2):
        super().__init__()
        self.buckets, self.ngrams = buckets, ngrams
        self.embedding = nn.EmbeddingBag(buckets, embed_dim, mode="mean", sparse=True)
        self.body, width = _mlp(embed_dim, list(hidden), dropout)
        self.head = nn.Linear(width, n_classes)

    def encode(self, texts) -> EncodedTexts:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("this model reads texts: pass a list of strings")
        return EncodedTexts([hash_ngrams(t, self.buckets, self.ngrams) for t in texts])

    def features(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.body(self.embedding(ids, offsets))

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids, offsets))


class _ArrayModel(nn.Module):
    """Shared input handling for models of arrays: shape check, normalisation, jitter."""

    def __init__(self, input_shape: list[int], jitter: int = 0):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.jitter = jitter
        self.register_buffer("input_mean", torch.zeros(self.input_shape))
        self.register_buffer("input_std", torch.ones(self.input_shape))

    @property
    def input_kind(self) -> str:
        return "image" if len(self.input_shape) == 2 else "features"

    def fit_normalizer(self, x: np.ndarray) -> None:
        """Per-feature standardisation from training inputs (N, *input_shape)."""
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        self.input_mean.copy_(x.mean(0))
        std = x.std(0)
        self.input_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def encode(self, inputs) -> EncodedArrays:
        if isinstance(inputs, (str, bytes)) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], str)):
            raise TypeError(f"this model reads arrays of shape (N, {', '.join(map(str, self.input_shape))}), not texts")
        x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
        if tuple(x.shape[1:]) != self.input_shape:
            if x.ndim == 1 and tuple(x.shape) == self.input_shape:
                raise ValueError(f"pass a batch: shape (N, {', '.join(map(str, self.input_shape))}), got one example {tuple(x.shape)}")
            raise ValueError(f"inputs have shape {tuple(x.shape)}; this model expects (N, {', '.join(map(str, self.input_shape))})")
        if not (x.dtype.is_floating_point or x.dtype in (torch.uint8, torch.int64, torch.int32)):
            raise TypeError(f"inputs must be numbers, got dtype {x.dtype}")
        if x.dtype.is_floating_point:
            if not torch.isfinite(x).all():
                raise ValueError("inputs contain NaN or inf")
            x = x.float()
        return EncodedArrays(x.cpu())

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter and x.ndim == 3:
            x = _random_shift(x, self.jitter)
        return (x - self.input_mean) / self.input_std


class FeatureMLP(_ArrayModel):
    """MLP over flat features or images (the paper's MNIST nets: 2x800, 2x1200)."""

    def __init__(self, n_classes: int, input_shape: list[int], hidden: list[int] = (256,), dropout: float = 0.2,
                 input_dropout: float = 0.0, jitter: int = 0):
        super().__init__(input_shape, jitter)
        self.input_dropout = nn.Dropout(input_dropout)
        self.body, width = _mlp(int(np.prod(self.input_shape)), list(hidden), dropout)
        self.head = nn.Linear(width, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.input_dropout(self.normalise(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCNN(_ArrayModel):
    """Two conv blocks and an MLP, for (H, W) images such as MNIST."""

    def __init__(self, n_classes: int, input_shape: list[int], hidden: list[int] = (256,), dropout: float = 0.2,
                 jitter: int = 0):
        super().__init__(input_shape, jitter)
        if len(self.input_shape) != 2:
            raise ValueError(f"cnn needs (H, W) images, got input shape {self.input_shape}")
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        h, w = self.input_shape
        self.body, width = _mlp(64 * (h // 4) * (w // 4), list(hidden), dropout)
        self.head = nn.Linear(width, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv(self.normalise(x).unsqueeze(1)).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODELS = {"fasttext": FastText, "mlp": FeatureMLP, "cnn": SmallCNN}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; `model.spec` records how, for checkpoints."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not registered; known: {sorted(MODELS)}")
    model = MODELS[name](**kwargs)
    model.spec = {"name": name, "kwargs": kwargs}
    return model


def model_kwargs(cfg, input_kind: str, input_shape: tuple[int, ...], n_classes: int) -> dict:
    """Constructor arguments for `cfg` (a ModelConfig) on data of this kind and shape."""
    if cfg.name == "fasttext":
        if input_kind != "text":
            raise ConfigError(f"model.name=fasttext reads texts, but the data are {input_kind}; use mlp or cnn")
        return dict(n_classes=n_classes, buckets=cfg.buckets, embed_dim=cfg.embed_dim, ngrams=cfg.ngrams,
                    hidden=list(cfg.hidden), dropout=cfg.dropout)
    if input_kind == "text":
        raise ConfigError(f"model.name={cfg.name} reads arrays, but the data are texts; use fasttext")
    kwargs = dict(n_classes=n_classes, input_shape=list(input_shape), hidden=list(cfg.hidden), dropout=cfg.dropout,
                  jitter=cfg.jitter)
    if cfg.name == "mlp":
        kwargs["input_dropout"] = cfg.input_dropout
    elif len(input_shape) != 2:
        raise ConfigError(f"model.name=cnn needs images, but the inputs have shape {input_shape}; use mlp")
    return kwargs


# ---------------------------------------------------------------------------
# checkpoints: safetensors weights + a JSON spec; nothing in them is executed


def save_checkpoint(model: nn.Module, folder: str | Path, extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp))
    write_json(folder / "model.json", {**model.spec, **({"extra": extra} if extra else {})})
    return folder


def load_checkpoint(folder: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    folder = Path(folder)
    spec_path, weights_path = folder / "model.json", folder / "model.safetensors"
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} has no {path.name}")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{spec_path} is not valid JSON: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict) or spec.get("name") not in MODELS:
        raise CheckpointError(f"{spec_path} must hold {{'name': one of {sorted(MODELS)}, 'kwargs': {{...}}}}")
    try:
        model = create_model(spec["name"], **spec["kwargs"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{spec_path}: cannot build {spec['name']!r} from its kwargs: {err}") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path} is corrupt or not a safetensors file: {err}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_path} does not match the model in {spec_path.name}: {err}") from None
    return model.to(device).eval()


def read_checkpoint_extra(folder: str | Path) -> dict:
    spec = json.loads((Path(folder) / "model.json").read_text())
    return spec.get("extra", {})


# ---------------------------------------------------------------------------
# specialists: the generalist's network with a head over some classes plus a dustbin


def with_dustbin_head(generalist: nn.Module, classes, widen: float = 1.0) -> nn.Module:
    """A new model of the generalist's kind whose head covers `classes` plus one dustbin.

    classes: (k,) distinct class ids of the generalist's head. The returned
    head has k + 1 rows: row j < k is the generalist's row `classes[j]`
    (weights and bias copied), row k, the dustbin, stands for the C - k other
    classes: the mean of their rows, with log(C - k) added to the bias, so its
    logit is the mean of theirs plus log(C - k), the log-sum-exp of their
    logits when those are equal (and a lower bound on it otherwise).

    Every other weight is copied from the generalist. `widen` > 1 multiplies the
    hidden widths; each added unit gets fresh (seeded by the caller's torch
    seed) incoming weights and zero outgoing weights, so the widened network
    starts out computing exactly what the narrow one does.
    """
    spec = getattr(generalist, "spec", None)
    if spec is None:
        raise ValueError("generalist has no .spec: build it with create_model or load_checkpoint")
    n_classes = generalist.head.out_features
    cls = [int(c) for c in classes]
    if not cls or len(set(cls)) != len(cls) or min(cls) < 0 or max(cls) >= n_classes:
        raise ValueError(f"classes={cls[:10]} must be distinct ids in [0, {n_classes})")
    if len(cls) >= n_classes:
        raise ValueError(f"classes cover all {n_classes} classes: a dustbin needs at least one class outside them")
    if widen < 1:
        raise ValueError(f"widen={widen} must be >= 1")
    kwargs = dict(spec["kwargs"], n_classes=len(cls) + 1)
    if "hidden" in kwargs:
        kwargs["hidden"] = [max(1, int(round(h * widen))) for h in kwargs["hidden"]]
    model = create_model(spec["name"], **kwargs)

    old = generalist.state_dict()
    index = torch.tensor(cls)
    other = torch.ones(n_classes, dtype=torch.bool)
    other[index] = False
    head_w = torch.cat([old["head.weight"][index], old["head.weight"][other].mean(0, keepdim=True)])  # (k+1, width)
    head_b = torch.cat([old["head.bias"][index],
                        old["head.bias"][other].mean(0, keepdim=True) + float(np.log(int(other.sum())))])
    old = {**old, "head.weight": head_w, "head.bias": head_b}
    new = model.state_dict()
    with torch.no_grad():
        for name, target in new.items():
            source = old[name].to(target.dtype)
            if source.shape == target.shape:
                target.copy_(source)
                continue
            # widened: the generalist's block in the leading corner, and the extra
            # inputs of a Linear (the added units of the layer below) get zero weight
            block = tuple(slice(0, s) for s in source.shape)
            target[block] = source
            if target.ndim == 2 and target.shape[1] > source.shape[1]:
                target[:, source.shape[1]:] = 0
    model.load_state_dict(new)
    return model

"""The model registry, input encoding, dustbin heads and safe checkpoints.

Every model ends in a linear layer called `head` (one row per class) so a
specialist can swap it for its own classes plus a dustbin. Each model turns
raw user inputs into tensors itself (`encode`), so a checkpoint alone is
enough to predict: the text hashing settings and the feature normalisation
are part of the model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import json
import os
import re
import unicodedata
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from .choices import MODEL_NAMES, USER_MODELS
from .config import ConfigError
from .rundir import atomic_write, write_json


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match the model it claims to be."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device; use device=auto or cpu")
    return torch.device(name)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` for the block, then restored.

    For loops of many small ops (a specialist on the few rows where it is
    active): starting and joining threads costs more than they save there,
    and far more on a busy machine. For training beside other processes
    (the generalist while Ray's workers start): threads beyond the free cores
    spin waiting for each other. The values computed do not change.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


# ---------------------------------------------------------------------------
# text: words and their hashed n-grams

TOKENIZERS = ("unicode", "ascii")  # "ascii": what fasttext checkpoints of spec version 1 read

_ASCII_WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")
_WORD_NO_MARKS = re.compile(r"[\w']+|\S", re.UNICODE)  # the same words as _unicode_word() on ASCII text, faster


@functools.cache
def _unicode_word() -> re.Pattern:
    # Combining marks (categories M*) are not \w, yet Devanagari or Thai vowel signs sit
    # inside words. Python's own Unicode tables; every mark lies in planes 0, 1 and 14.
    ranges: list[list[int]] = []
    for c in itertools.chain(range(0x20000), range(0xE0000, 0xE1000)):
        if unicodedata.category(chr(c)).startswith("M"):
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    marks = "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return re.compile(rf"[\w'{marks}]+|\S", re.UNICODE)


def tokenize(text: str, tokenizer: str = "unicode") -> list[str]:
    """The words of `text` as the fasttext model sees them.

    "unicode": NFC-normalised (so "café" typed with a combining accent is
    "café"), the typographic apostrophe read as "'", case-folded ("Straße" ->
    "strasse"). A word is a run of letters, digits, "_" (\\w), combining marks
    and apostrophes: "café", "привет", "हिन्दी" stay whole. Any other non-space
    character is a word of its own. On ASCII text it gives the "ascii" words,
    except that "_" joins words instead of standing alone.

    "ascii" (checkpoints of spec version 1): lower-cased; runs of [a-z0-9'],
    any other non-space character alone ("café" -> "caf", "é").
    """
    if tokenizer == "ascii":
        return _ASCII_WORD.findall(text.lower())
    if tokenizer != "unicode":
        raise ValueError(f"tokenizer={tokenizer!r} must be one of {TOKENIZERS}")
    text = unicodedata.normalize("NFC", text).replace("\u2019", "'").casefold()
    return (_WORD_NO_MARKS if text.isascii() else _unicode_word()).findall(text)


def hash_ngrams(text: str, buckets: int, ngrams: int, char_ngrams: int = 0, tokenizer: str = "unicode",
                char_ngrams_min: int = 1) -> np.ndarray:
    """Hashed features of `text`: ids in [0, buckets) (CRC32, stable across runs and machines).

    Word 1..`ngrams`-grams of `tokenize(text, tokenizer)`, plus, when
    `char_ngrams` > 0, every `char_ngrams_min`..`char_ngrams`-character substring of each
    word. Text written without spaces (Chinese, Japanese, Thai) is one long
    word per clause; its overlapping character grams are the features that
    carry its meaning. In spaced languages they let the forms of a word share
    features. A character gram is hashed with a leading space, which no word
    gram has, so the character "a" and the word "a" are different features.
    """
    words = tokenize(text, tokenizer)
    grams = [" ".join(words[i:i + n]) for n in range(1, ngrams + 1) for i in range(len(words) - n + 1)]
    ids = [zlib.crc32(g.encode()) % buckets for g in grams]
    if char_ngrams:
        ids += itertools.chain.from_iterable(_char_gram_ids(w, buckets, char_ngrams, char_ngrams_min) for w in words)
    return np.array(ids, dtype=np.int64)


CACHED_TEXT_CHARS = 256  # longer texts are hashed anew each time: the cache holds at most ~5 KB a text


def _text_ids(text: str, buckets: int, ngrams: int, char_ngrams: int, tokenizer: str,
              char_ngrams_min: int) -> np.ndarray:
    if len(text) > CACHED_TEXT_CHARS:
        return hash_ngrams(text, buckets, ngrams, char_ngrams, tokenizer, char_ngrams_min)
    return _cached_text_ids(text, buckets, ngrams, char_ngrams, tokenizer, char_ngrams_min)


@functools.lru_cache(maxsize=1 << 15)
def _cached_text_ids(text: str, buckets: int, ngrams: int, char_ngrams: int, tokenizer: str,
                     char_ngrams_min: int) -> np.ndarray:
    # Cached: a run hashes the same texts the same way in several stages (the generalist, its outputs, the
    # peers, the evaluation, the report) and in every specialist; read-only, since callers share the array.
    ids = hash_ngrams(text, buckets, ngrams, char_ngrams, tokenizer, char_ngrams_min)
    ids.flags.writeable = False
    return ids


@functools.lru_cache(maxsize=1 << 14)
def _char_gram_ids(word: str, buckets: int, char_ngrams: int, char_ngrams_min: int) -> tuple[int, ...]:
    # Cached: a corpus repeats its words, and a word's character grams are most of a text's hashing.
    return tuple(zlib.crc32((" " + word[i:i + n]).encode()) % buckets
                 for n in range(char_ngrams_min, char_ngrams + 1) for i in range(len(word) - n + 1))


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


def distinct_rows(ids: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.unique(ids, return_inverse=True)` for ids in [0, n_rows): (the distinct ids in increasing
    order, each id's position among them). Marked in a table of n_rows flags instead of sorted: a batch's
    ids are many times fewer than a hashed embedding's rows, but sorting them costs more than the scan."""
    return (_distinct_rows_numpy if ids.device.type == "cpu" else _distinct_rows_torch)(ids, n_rows)


def _distinct_rows_numpy(ids: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    # on the CPU: torch's nonzero over the flags cost a character-gram step several times numpy's
    flat = ids.numpy()
    seen = np.zeros(n_rows, dtype=bool)
    seen[flat] = True
    rows = np.flatnonzero(seen)
    position = np.empty(n_rows, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    return torch.from_numpy(rows), torch.from_numpy(position[flat])


def _distinct_rows_torch(ids: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    seen = torch.zeros(n_rows, dtype=torch.bool, device=ids.device)
    seen[ids] = True
    rows = seen.nonzero().squeeze(1)
    position = torch.empty(n_rows, dtype=torch.long, device=ids.device)
    position[rows] = torch.arange(len(rows), device=ids.device)
    return rows, position[ids]


class FastText(nn.Module):
    """fastText-style classifier: mean of hashed word (and character) n-gram embeddings, then an MLP.

    Features as `hash_ngrams`; `tokenizer` is "unicode" for every new model and
    "ascii" for checkpoints of spec version 1 (`load_checkpoint` sets it).
    """

    input_kind = "text"

    def __init__(self, n_classes: int, buckets: int = 200_000, embed_dim: int = 128, ngrams: int = 2,
                 hidden: list[int] = (256,), dropout: float = 0.2, char_ngrams: int = 0,
                 tokenizer: str = "unicode", char_ngrams_min: int = 1):
        super().__init__()
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={tokenizer!r} must be one of {TOKENIZERS}")
        if not 1 <= char_ngrams_min <= max(char_ngrams, 1):
            raise ValueError(f"char_ngrams_min={char_ngrams_min} must be in [1, char_ngrams={char_ngrams}]")
        self.buckets, self.ngrams, self.char_ngrams, self.tokenizer = buckets, ngrams, char_ngrams, tokenizer
        self.char_ngrams_min = char_ngrams_min
        self.embedding = nn.EmbeddingBag(buckets, embed_dim, mode="mean", sparse=True)
        self.body, width = _mlp(embed_dim, list(hidden), dropout)
        self.head = nn.Linear(width, n_classes)

    def encode(self, texts) -> EncodedTexts:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("this model reads texts: pass a list of strings")
        return EncodedTexts([_text_ids(t, self.buckets, self.ngrams, self.char_ngrams, self.tokenizer,
                                       self.char_ngrams_min) for t in texts])

    def features(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.training and self.char_ngrams:
            # Character grams repeat within and across a batch's texts ("e", " th"): bagging each distinct
            # row once gives a sparse gradient of one row per distinct id, not one per occurrence, which
            # SparseAdam would sort and sum. The same rows in the same order: the same outputs.
            rows, ids = distinct_rows(ids, self.buckets)
            bag = nn.functional.embedding_bag(ids, nn.functional.embedding(rows, self.embedding.weight, sparse=True),
                                              offsets, mode="mean")
            return self.body(bag)
        return self.body(self.embedding(ids, offsets))

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids, offsets))


@contextlib.contextmanager
def read_only_arrays_shared():
    """Read-only numpy arrays (memory maps, np.frombuffer, Ray's object store) become tensors sharing
    their memory without torch's not-writable warning: the code inside only reads them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        yield


def encode_arrays(inputs, input_shape: tuple[int, ...]) -> EncodedArrays:
    """(N, *input_shape) numbers, checked, as a CPU tensor (floats as float32, NaN/inf refused)."""
    if isinstance(inputs, (str, bytes)) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], str)):
        raise TypeError(f"this model reads arrays of shape (N, {', '.join(map(str, input_shape))}), not texts")
    x = inputs
    if not isinstance(x, torch.Tensor):
        with read_only_arrays_shared():  # inputs are only read: every later step makes new tensors
            x = torch.as_tensor(np.asarray(x))
    if tuple(x.shape[1:]) != input_shape:
        if x.ndim == 1 and tuple(x.shape) == input_shape:
            raise ValueError(f"pass a batch: shape (N, {', '.join(map(str, input_shape))}), got one example {tuple(x.shape)}")
        raise ValueError(f"inputs have shape {tuple(x.shape)}; this model expects (N, {', '.join(map(str, input_shape))})")
    if not (x.dtype.is_floating_point or x.dtype in (torch.uint8, torch.int64, torch.int32)):
        raise TypeError(f"inputs must be numbers, got dtype {x.dtype}")
    if x.dtype.is_floating_point:
        if not torch.isfinite(x).all():
            raise ValueError("inputs contain NaN or inf")
        x = x.float()
    return EncodedArrays(x.cpu())


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
        """Standardisation from training inputs (N, *input_shape): per feature for vectors, one mean and std
        over all pixels for images (a pixel that is almost always blank would otherwise turn the ink that
        jitter or a test image puts there into values hundreds of standard deviations out)."""
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        if self.input_kind == "image":
            self.input_mean.fill_(x.mean().item())
            std = x.std().item()
            self.input_std.fill_(std if std > 1e-6 else 1.0)  # as a constant feature below
            return
        self.input_mean.copy_(x.mean(0))
        std = x.std(0)
        self.input_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def encode(self, inputs) -> EncodedArrays:
        return encode_arrays(inputs, self.input_shape)

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


# A name's entry is its class, or "module:Class" for an adapter of a network made elsewhere (adapters.py),
# imported on first use: its library (transformers, timm) is an optional extra.
MODELS = {"fasttext": FastText, "mlp": FeatureMLP, "cnn": SmallCNN,
          "torch": "adapters:TorchModel", "hf": "adapters:HFModel", "timm": "adapters:TimmModel"}
# config validates model.name against choices.MODEL_NAMES: a model added here must be named there too
assert tuple(MODELS) == MODEL_NAMES, f"models.MODELS {tuple(MODELS)} != choices.MODEL_NAMES {MODEL_NAMES}"


def model_class(name: str) -> type[nn.Module]:
    """The class registered as `name` (an adapter's module is imported here)."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not registered; known: {sorted(MODELS)}")
    entry = MODELS[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(f".{module}", __package__), attr)
    return entry


# The version of a model spec ({"name", "version", "kwargs"}, a checkpoint's model.json).
# A kwarg that a spec leaves out takes the default of the spec's version; load_checkpoint
# writes out the defaults that changed since. 1 (no "version" field): fasttext read
# "ascii" words. 2: "unicode" words and char_ngrams. 3: char_ngrams_min.
SPEC_VERSION = 3


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; `model.spec` records how, for checkpoints."""
    model = model_class(name)(**kwargs)
    model.spec = {"name": name, "version": SPEC_VERSION, "kwargs": kwargs}
    return model


def model_kwargs(cfg, input_kind: str, input_shape: tuple[int, ...], n_classes: int) -> dict:
    """Constructor arguments for `cfg` (a ModelConfig) on data of this kind and shape.

    For a model the user brings (choices.USER_MODELS) this checks the factory,
    the head and the weights' names and shapes first (`adapters.spec_kwargs`).
    """
    if cfg.name in USER_MODELS:
        from .adapters import spec_kwargs  # adapters.py imports this module

        return spec_kwargs(cfg, input_kind, tuple(input_shape), n_classes)
    if cfg.name == "fasttext":
        if input_kind != "text":
            raise ConfigError(f"model.name=fasttext reads texts, but the data are {input_kind}; use mlp or cnn")
        return _sized(cfg.name, dict(n_classes=n_classes, buckets=cfg.buckets, embed_dim=cfg.embed_dim,
                                     ngrams=cfg.ngrams, hidden=list(cfg.hidden), dropout=cfg.dropout,
                                     char_ngrams=cfg.char_ngrams, char_ngrams_min=cfg.char_ngrams_min))
    if input_kind == "text":
        raise ConfigError(f"model.name={cfg.name} reads arrays, but the data are texts; use fasttext")
    kwargs = dict(n_classes=n_classes, input_shape=list(input_shape), hidden=list(cfg.hidden), dropout=cfg.dropout,
                  jitter=cfg.jitter)
    if cfg.name == "mlp":
        kwargs["input_dropout"] = cfg.input_dropout
    elif len(input_shape) != 2:
        raise ConfigError(f"model.name=cnn needs images, but the inputs have shape {input_shape}; use mlp")
    return _sized(cfg.name, kwargs)


MAX_PARAMETERS = 1 << 31  # 8 GiB of float32 weights, before optimizer state: a typo, not a model
_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.tensor, torch.arange, torch.rand, torch.randn}


class _ShapesOnly(TorchFunctionMode):
    """Tensors made inside land on the meta device (no memory) and in-place initialisers are skipped.

    Only shapes are wanted; skipping also keeps the meta kernel of `normal_` from importing
    torch._dynamo (seconds per process) and leaves torch's random state as it was.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if func in _FACTORIES:
            kwargs["device"] = "meta"
        elif name.endswith("_") and not name.endswith("__"):  # in place: shapes unchanged
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def model_skeleton(name: str, kwargs: dict) -> nn.Module:
    """Model `name` with meta tensors of the right shapes: what `kwargs` would allocate, allocating nothing."""
    with _ShapesOnly():
        return create_model(name, **kwargs)


def model_to_load(name: str, kwargs: dict, skeleton: nn.Module | None = None) -> nn.Module:
    """Model `name`, for load_state_dict to fill: a model built here is allocated but not initialised (all
    its tensors are in its state dict, and drawing millions of random weights only to overwrite them
    costs a third of a second per model); a model you bring is built by its factory, whose modules may
    hold tensors outside their state dict. skeleton: `model_skeleton(name, kwargs)`, if already built."""
    if name in USER_MODELS:
        return create_model(name, **kwargs)
    return (skeleton if skeleton is not None else model_skeleton(name, kwargs)).to_empty(device="cpu")


def _sized(name: str, kwargs: dict) -> dict:
    """`kwargs`, once the model they build is known to hold at most MAX_PARAMETERS weights (counted on
    the meta device, which allocates nothing)."""
    n = sum(p.numel() for p in model_skeleton(name, kwargs).parameters())
    if n > MAX_PARAMETERS:
        raise ConfigError(f"model.hidden={kwargs['hidden']}: the {name} model on these data would have {n} weights, "
                          f"over {MAX_PARAMETERS}; use smaller model.hidden (or model.embed_dim, model.buckets)")
    return kwargs


# ---------------------------------------------------------------------------
# checkpoints: safetensors weights + a JSON spec; nothing in them is executed, unless trusted (below)

# Factories ("module:callable") that checkpoints may name. A user model's checkpoint (model.name=torch) is rebuilt
# by calling its factory: code, so load_checkpoint calls only those trusted here, as torch.load(weights_only=True)
# unpickles only the globals that torch.serialization.add_safe_globals allowed.
_TRUSTED_FACTORIES: set[str] = set()


def trust_factory(path: str) -> None:
    """Let checkpoints naming factory `path` ("module:callable") load in this process.

    `specialists run` and the commands on a run directory trust the `model.factory`
    of the config they run (the user's instruction, like a command line); a
    model.json read on its own is data, and names code only with this consent.
    """
    _TRUSTED_FACTORIES.add(str(path))


TRUST_ENV = "SPECIALISTS_TRUST_FACTORY"  # comma-separated factories trusted by every process (commands, Ray workers)


def is_trusted(path: str) -> bool:
    return path in _TRUSTED_FACTORIES or path in os.environ.get(TRUST_ENV, "").split(",")


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: nn.Module, folder: str | Path, extra: dict | None = None) -> Path:
    """Weights and spec into `folder`; `extra` is a note for people reading model.json, never read back."""
    state = _weights(model)
    return _write_checkpoint(folder, model.spec, lambda tmp: save_file(state, tmp), extra)


def checkpoint_bytes(model: nn.Module) -> bytes:
    """The model.safetensors that `save_checkpoint` writes, as bytes: made where the model was trained (a Ray
    worker), so the process that saves it only writes them."""
    return save(_weights(model))


def save_checkpoint_bytes(folder: str | Path, spec: dict, weights, extra: dict | None = None) -> Path:
    """`save_checkpoint` of a model sent as its spec and `checkpoint_bytes` (any bytes-like object)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(memoryview(weights).cast("B"))

    return _write_checkpoint(folder, spec, write, extra)


def _write_checkpoint(folder: str | Path, spec: dict, write_weights, extra: dict | None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "model.safetensors", write_weights)
    write_json(folder / "model.json", {**spec, **({"extra": extra} if extra else {})})
    return folder


def stored_shapes(path: str | Path, where: str | Path) -> dict[str, tuple]:
    """{tensor name: shape} of safetensors file `path`, from its header alone; CheckpointError naming `where`."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{where} is not a safetensors file, or is corrupt: {err}") from None


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
    version = spec.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= SPEC_VERSION:
        raise CheckpointError(f"{spec_path}: spec version {version!r} is not one this release reads "
                              f"(1 to {SPEC_VERSION}); was it written by a newer one?")
    kwargs = dict(spec["kwargs"])
    if version < 2 and spec["name"] == "fasttext":
        kwargs.setdefault("tokenizer", "ascii")  # so it predicts as before, and so do specialists built from it
    factory = kwargs.get("factory")  # a user model's (adapters.TorchModel): calling it runs code
    if factory is not None and not is_trusted(factory):
        raise CheckpointError(f"{spec_path}: the model is built by calling {factory!r}, code that this file names; "
                              f"load it only from a run you trust: specialists.load(run, trust_factory={factory!r}), "
                              f"specialists.trust_factory({factory!r}) or {TRUST_ENV}={factory} in the environment")
    # Sizes in model.json are untrusted: build the model on the meta device first (no memory) and compare
    # its tensor shapes with the weights file's header, so the real build allocates no more than the file holds.
    try:
        skeleton = model_skeleton(spec["name"], kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise CheckpointError(f"{spec_path}: cannot build {spec['name']!r} from its kwargs: {err}") from None
    stored = stored_shapes(weights_path, weights_path)
    expected = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    if stored != expected:
        key = sorted(set(stored) ^ set(expected)) or [k for k in expected if stored[k] != expected[k]]
        raise CheckpointError(f"{weights_path} does not match the model in {spec_path.name}: tensor {key[0]!r} "
                              f"is {stored.get(key[0])} in the weights, {expected.get(key[0])} in the model")
    try:
        model = model_to_load(spec["name"], kwargs, skeleton)
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_path} is corrupt or not a safetensors file: {err}") from None
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{weights_path} does not load into the model in {spec_path.name}: {err}") from None
    return model.to(device).eval()


# ---------------------------------------------------------------------------
# specialists: the generalist's network with a head over some classes plus a dustbin


def encoding_key(model: nn.Module) -> tuple | None:
    """Models with equal keys encode raw inputs alike: a fasttext model's hashing settings. None for every
    other kind: its specialists keep their generalist's encoding (the buffers `with_fresh_weights` keeps)."""
    if isinstance(model, FastText):
        return model.buckets, model.ngrams, model.char_ngrams, model.tokenizer, model.char_ngrams_min
    return None


def with_fresh_weights(model: nn.Module, **settings) -> nn.Module:
    """The same network with the parameters its constructor draws (from torch's current seed).

    Buffers, which hold the input encoding (a feature standardisation fitted
    on the training data), are kept: only what training learns starts anew.
    settings: constructor settings to take instead of its own (a fasttext model's `ngrams`, `char_ngrams`,
    `char_ngrams_min`, `embed_dim`, `buckets`).
    """
    fresh = create_model(model.spec["name"], **{**model.spec["kwargs"], **settings})
    params, kept = {name for name, _ in fresh.named_parameters()}, model.state_dict()
    fresh.load_state_dict({name: value if name in params else kept[name] for name, value in fresh.state_dict().items()})
    return fresh


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
    if widen != 1 and "hidden" not in kwargs:
        raise ValueError(f"widen={widen}: a {spec['name']!r} model has no hidden widths to widen (only models "
                         "built here do); use widen=1")
    if "hidden" in kwargs:
        kwargs["hidden"] = [max(1, int(round(h * widen))) for h in kwargs["hidden"]]
    # every weight is copied below, but for the widened units' fresh ones
    model = create_model(spec["name"], **kwargs) if widen != 1 else model_to_load(spec["name"], kwargs)

    old = generalist.state_dict()
    index = torch.tensor(cls)
    other = torch.ones(n_classes, dtype=torch.bool)
    other[index] = False
    # the head's name in the state dict: "head" in the models built here, the user's own layer in an adapter's
    head = next(name for name, module in generalist.named_modules() if module is generalist.head)
    weight, bias = old[f"{head}.weight"], old[f"{head}.bias"]
    head_w = torch.cat([weight[index], weight[other].mean(0, keepdim=True)])  # (k+1, width)
    head_b = torch.cat([bias[index], bias[other].mean(0, keepdim=True) + float(np.log(int(other.sum())))])
    old = {**old, f"{head}.weight": head_w, f"{head}.bias": head_b}
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

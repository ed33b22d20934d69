"""Generalists you bring: your own torch module, a Hugging Face sequence classifier, a timm classifier.

Every stage reads a model through one protocol. The models built here
(models.FastText, FeatureMLP, SmallCNN) satisfy it, and each adapter below
wraps a network made elsewhere so that it does too:

    model.encode(raw)   -> an Encoded* whose .batch(index, device) is the argument tuple of forward
    model(*batch)       -> (B, n_classes) logits
    model.head          the nn.Linear whose outputs the logits are, one row per class;
                        models.with_dustbin_head builds a specialist by giving a new model of the
                        same kind the rows of its classes plus a dustbin row
    model.spec          {"name", "version", "kwargs"}: models.create_model(name, **kwargs) rebuilds
                        the network (fresh weights, kwargs["n_classes"] head rows); checkpoints load
                        and Ray workers rebuild the generalist that way
    model.input_kind    "text" | "features" | "image"

An adapter also has `load_weights(path, classes)`, the user's trained
weights, and is registered in models.MODELS under its name (choices.USER_MODELS):

    torch  your nn.Module, built by `model.factory` ("module:callable", called with
           `model.factory_args`); `model.weights` is its state dict in safetensors.
           Inputs: arrays (npz, mnist, synthetic data), handed to it as float32 as they
           are: the network normalises them itself, as it did when it was trained.
    hf     a transformers AutoModelForSequenceClassification from a save_pretrained
           folder (`model.weights`: config.json, model.safetensors, tokenizer.json);
           inputs: texts, tokenised by its tokenizer.json. Needs the `hf` extra.
    timm   timm.create_model(`model.arch`), head from get_classifier(); inputs:
           images, (H, W) as one channel or (C, H, W). Needs the `timm` extra.

`spec_kwargs` checks everything before a run writes anything: the factory
imports and builds a module, its logits are the outputs of a Linear layer
(found by running it, see `find_head`), and the weights file holds exactly
that module's tensors, in its shapes, with one head row per class.

Calling a factory runs the user's code. A factory named on the command line
or in a config is the user's choice; one named by a checkpoint's model.json
is called only if trusted (models.trust_factory). The Hugging Face and timm
adapters run no code a file names: transformers builds only its own model
types from config.json (no remote code), timm only its registered architectures.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .config import ConfigError
from .models import CheckpointError, encode_arrays, stored_shapes

# ---------------------------------------------------------------------------
# the pieces every adapter uses


def import_factory(path: str, key: str = "model.factory") -> Callable:
    """The callable named by "module:attr" (attr may be dotted), imported; ConfigError naming `key` otherwise.

    A module that is not installed is also looked for in the current folder,
    as `python -m` and `python script.py` would find it there.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}={path!r}: expected 'module:callable', e.g. my_pkg.nets:build")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            here = os.getcwd()
            if err.name != module_name.split(".")[0] or here in sys.path or "" in sys.path:
                raise
            sys.path.insert(0, here)
            module = importlib.import_module(module_name)
    except Exception as err:  # a user's module may raise anything while it imports
        raise ConfigError(f"{key}={path!r}: module {module_name!r} does not import ({type(err).__name__}: {err}); "
                          "install it, or run from the folder that holds it") from None
    found: Any = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise ConfigError(f"{key}={path!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                              f"{attr!r}")
        found = getattr(found, part)
    if not callable(found):
        raise ConfigError(f"{key}={path!r} is a {type(found).__name__}, not a function or class that builds a model")
    return found


def call_factory(path: str, args: dict, key: str = "model.factory") -> nn.Module:
    """`path`'s callable called with `args`: the user's network."""
    try:
        net = import_factory(path, key)(**args)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{key}={path!r}: calling it with model.factory_args={args} failed: "
                          f"{type(err).__name__}: {err}") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{key}={path!r} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def find_head(net: nn.Module, run: Callable[[], Any], where: str, candidate: nn.Module | None = None) -> str:
    """The name (in `net`) of the nn.Linear whose outputs are the logits `run()` returns.

    run: calls `net` on a small batch of inputs of the data's shape and returns
    its (B, C) logits. The candidate is the last Linear layer to run (or
    `candidate`). It is the head if adding a vector s to its outputs adds s to
    every row of the logits: the logits are then that layer's outputs (maybe
    picked by rows, as a sequence model's last token). A Linear followed by a
    softmax, another layer or a sum of its outputs is not a head: specialists
    copy the head's rows and give them another one, so the logits must be
    those rows' outputs.
    """
    names = {module: name for name, module in net.named_modules() if isinstance(module, nn.Linear)}
    if not names:
        last = [type(m).__name__ for _, m in net.named_modules()][-1]
        raise ConfigError(f"{where}: the model has no Linear layer (its last layer is a {last}); its logits must be "
                          "the outputs of a Linear layer, one row per class, which specialists replace")
    ran: list[nn.Module] = []
    handles = [module.register_forward_hook(lambda module, args, out: ran.append(module)) for module in names]
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            logits = run()
    except Exception as err:
        raise ConfigError(f"{where}: the model fails on a batch shaped like the data: {type(err).__name__}: {err}") \
            from None
    finally:
        for handle in handles:
            handle.remove()
        net.train(training)
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(f"{where}: the model returns a {type(logits).__name__}; it must return the (N, classes) "
                          "logits as one tensor")
    head = candidate if candidate is not None else (ran[-1] if ran else None)
    if head not in names:
        raise ConfigError(f"{where}: no Linear layer ran, so its logits are not the outputs of one")
    name = names[head]
    if logits.ndim != 2 or logits.shape[1] != head.out_features:
        raise ConfigError(f"{where}: the model returns shape {tuple(logits.shape)} but its last Linear layer "
                          f"{name!r} has {head.out_features} outputs; its logits must be that layer's outputs, "
                          "(N, classes)")
    shift = torch.arange(1, head.out_features + 1, dtype=torch.float32)  # a different offset per class
    handle = head.register_forward_hook(lambda module, args, out: out + shift.to(out))
    net.eval()
    try:
        with torch.no_grad():
            moved = run()
    finally:
        handle.remove()
        net.train(training)
    tolerance = 1e-3 * (1 + float(logits.abs().max()))
    if not torch.allclose((moved - logits).float(), shift.expand_as(logits), atol=tolerance):
        raise ConfigError(f"{where}: its logits are not the outputs of its last Linear layer {name!r}: something "
                          "after that layer changes them (a softmax? another layer?). Return the outputs of a Linear "
                          "layer, one per class: specialists replace that layer's rows")
    return name


def with_head(net: nn.Module, head: str, n_classes: int, where: str) -> nn.Module:
    """`net` in float32 with layer `head` an nn.Linear of `n_classes` rows and a bias (a new one if it had other
    rows or no bias: the dustbin row's bias holds the log of the number of classes it stands for)."""
    try:
        layer = net.get_submodule(head)
    except AttributeError:
        raise ConfigError(f"{where}: the model has no layer {head!r}, the head its spec names; was its code "
                          "changed since?") from None
    if not isinstance(layer, nn.Linear):
        raise ConfigError(f"{where}: layer {head!r} is a {type(layer).__name__}, not the Linear head its spec names")
    if layer.out_features != n_classes or layer.bias is None:
        net.set_submodule(head, nn.Linear(layer.in_features, n_classes, device=layer.weight.device))
    return net.float()


def check_weights(net: nn.Module, path: str | Path, head: str, n_classes: int, key: str,
                  model: str = "the model") -> dict[str, tuple]:
    """The shapes in safetensors file `path`, once they are exactly `net`'s tensors with `n_classes` head rows.

    Reads the file's header only. A head without a bias in the file reads as
    zeros. CheckpointError naming the file, the first odd tensor and what was
    expected.
    """
    where = f"{key}={str(path)!r}"
    if not Path(path).is_file():
        raise CheckpointError(f"{where}: no such file (expected a safetensors state dict of your model)")
    stored = stored_shapes(path, where)
    expected = {name: tuple(value.shape) for name, value in net.state_dict().items()}
    missing = sorted(set(expected) - set(stored) - {f"{head}.bias"})
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {len(missing)} tensor(s) of the model, e.g. {missing[:3]}"] if missing else []) + \
                ([f"{len(unexpected)} tensor(s) the model does not have, e.g. {unexpected[:3]}"] if unexpected else [])
        raise CheckpointError(f"{where} does not match {model}: {'; '.join(parts)} (its {len(expected)} tensors "
                              f"begin {list(expected)[:3]})")
    rows = stored[f"{head}.weight"][0]
    if rows != n_classes:
        raise CheckpointError(f"{where}: the head {head!r} has {rows} rows (classes) in the weights, but the data have "
                              f"{n_classes} classes")
    for name, shape in expected.items():
        if name in stored and stored[name] != shape:
            raise CheckpointError(f"{where} does not match {model}: tensor {name!r} is {stored[name]} in the "
                                  f"weights, {shape} in the model")
    return stored


def load_weights(net: nn.Module, path: str | Path, head: str, key: str) -> None:
    """Load safetensors file `path` into `net` (checked by `check_weights` first); NaN/inf weights are refused."""
    check_weights(net, path, head, net.get_submodule(head).out_features, key)
    state = load_file(str(path))
    state.setdefault(f"{head}.bias", torch.zeros(net.get_submodule(head).out_features))
    for name, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{key}={str(path)!r}: tensor {name!r} holds NaN or inf")
    net.load_state_dict(state, strict=True)


def _extra(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"model.name={extra} needs {module}, which does not import here ({err}); "
                          f"pip install 'specialists[{extra}]'") from None


def _probe_generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)  # probe inputs that leave torch's own random state as it was


# ---------------------------------------------------------------------------
# your torch.nn.Module


class TorchModel(nn.Module):
    """Your network `factory(**factory_args)`, its layer `head` given `n_classes` rows.

    input_shape: one example's shape; inputs reach the network as float32
    tensors (N, *input_shape), not normalised.
    """

    parameter_root = "net."  # your network is `self.net`: specialists.freeze reads its names below this

    def __init__(self, n_classes: int, factory: str, input_shape: list[int], head: str,
                 factory_args: dict | None = None):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.head_name = head
        self.net = with_head(call_factory(factory, dict(factory_args or {})), head, n_classes,
                             f"model.factory={factory!r}")

    @property
    def head(self) -> nn.Linear:
        return self.net.get_submodule(self.head_name)

    @property
    def input_kind(self) -> str:
        return "features" if len(self.input_shape) == 1 else "image"

    def encode(self, inputs):
        return encode_arrays(inputs, self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def load_weights(self, path: str, classes: list[str]) -> None:
        load_weights(self.net, path, self.head_name, "model.weights")


def _torch_kwargs(cfg, input_kind: str, input_shape: tuple[int, ...], n_classes: int) -> dict:
    where = f"model.factory={cfg.factory!r}"
    if input_kind == "text":
        raise ConfigError("model.name=torch reads arrays (npz, mnist or synthetic data), but the data are texts; "
                          "for texts use model.name=hf or fasttext")
    with torch.random.fork_rng(devices=[]):  # the factory's initial weights: not the run's random state
        net = call_factory(cfg.factory, dict(cfg.factory_args)).float()
    probe = torch.randn((2, *input_shape), generator=_probe_generator())
    head = find_head(net, lambda: net(probe), f"{where} on inputs of shape (N, {', '.join(map(str, input_shape))})")
    if cfg.weights:
        check_weights(net, Path(cfg.weights).expanduser(), head, n_classes, "model.weights",
                      f"the model {where} builds")
    return {"n_classes": n_classes, "factory": cfg.factory, "factory_args": dict(cfg.factory_args),
            "input_shape": list(input_shape), "head": head}


# ---------------------------------------------------------------------------
# Hugging Face AutoModelForSequenceClassification


class EncodedTokens:
    """Token ids per text; batches are (ids, attention mask), (B, L) padded to the batch's longest."""

    def __init__(self, ids: list[np.ndarray], pad_id: int):
        self.ids, self.pad_id = ids, pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
        parts = [self.ids[i] for i in index]
        width = max((len(p) for p in parts), default=0)
        ids = np.full((len(parts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(parts), width), dtype=np.int64)
        for row, part in enumerate(parts):
            ids[row, :len(part)] = part
            mask[row, :len(part)] = 1
        return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


# config.json keys that say how a checkpoint was saved, not what the model is; num_labels comes from the data
_HF_NOT_ARCHITECTURE = ("id2label", "label2id", "num_labels", "torch_dtype", "dtype", "_name_or_path",
                        "transformers_version", "architectures", "auto_map")


def _hf_net(config: dict, n_classes: int, where: str) -> nn.Module:
    _extra("transformers", "hf")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = {k: v for k, v in config.items() if k not in _HF_NOT_ARCHITECTURE}
    model_type = config.pop("model_type", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
        hf_config.num_labels = n_classes
        return AutoModelForSequenceClassification.from_config(hf_config)  # never remote code (trust_remote_code)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{where}: transformers cannot build a sequence classifier of model_type {model_type!r}: "
                          f"{err}") from None


class HFModel(nn.Module):
    """A transformers sequence classifier rebuilt from its config (a dict), `n_classes` head rows.

    tokenizer: the tokenizers-library JSON (a save_pretrained folder's
    tokenizer.json) that turns texts into ids, truncated at `max_length`.
    """

    parameter_root = "net."  # your network is `self.net`: specialists.freeze reads its names below this

    input_kind = "text"

    def __init__(self, n_classes: int, config: dict, tokenizer: dict, head: str, max_length: int = 512,
                 pad_id: int = 0):
        super().__init__()
        self.head_name, self.max_length, self.pad_id = head, int(max_length), int(pad_id)
        self.tokenizer_json = tokenizer
        self._tokenizer = None
        self.net = with_head(_hf_net(config, n_classes, "model.weights"), head, n_classes, "the Hugging Face model")

    @property
    def head(self) -> nn.Linear:
        return self.net.get_submodule(self.head_name)

    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(json.dumps(self.tokenizer_json))
            tokenizer.no_padding()  # batches pad themselves (EncodedTokens)
            tokenizer.enable_truncation(self.max_length)
            self._tokenizer = tokenizer
        return self._tokenizer

    def encode(self, texts) -> EncodedTokens:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("this model reads texts: pass a list of strings")
        encodings = self.tokenizer().encode_batch(list(texts))
        return EncodedTokens([np.asarray(e.ids, dtype=np.int64) for e in encodings], self.pad_id)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids, attention_mask=mask).logits

    def load_weights(self, path: str, classes: list[str]) -> None:
        folder = Path(path).expanduser()
        names = _hf_label_names(_read_json(folder / "config.json"))
        if names is not None and names != list(classes):
            differ = next(i for i in range(min(len(names), len(classes)) + 1)
                          if i >= len(names) or i >= len(classes) or names[i] != classes[i])
            raise CheckpointError(f"model.weights={str(path)!r}: config.json's id2label names class {differ} "
                                  f"{names[differ] if differ < len(names) else None!r}, the data "
                                  f"{classes[differ] if differ < len(classes) else None!r}; the head's rows must be "
                                  f"the data's classes in their order ({classes[:5]}...)")
        load_weights(self.net, folder / "model.safetensors", self.head_name, "model.weights")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"model.weights: {str(path.parent)!r} has no {path.name} (expected the folder "
                              "save_pretrained writes: config.json, model.safetensors, tokenizer.json)")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"model.weights: {str(path)!r} is not readable JSON: {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"model.weights: {str(path)!r} must hold a JSON object")
    return value


def _hf_label_names(config: dict) -> list[str] | None:
    """config.json's class names in row order, or None when they are transformers' defaults (LABEL_0, ...)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        names = [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in range(len(id2label))]
    except KeyError:
        return None
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def _hf_kwargs(cfg, input_kind: str, input_shape: tuple[int, ...], n_classes: int) -> dict:
    _extra("transformers", "hf")
    if input_kind != "text":
        raise ConfigError(f"model.name=hf reads texts (csv_text data), but the data are {input_kind}; "
                          "for arrays use model.name=torch or timm")
    folder = Path(cfg.weights).expanduser()
    where = f"model.weights={cfg.weights!r}"
    if not folder.is_dir():
        raise CheckpointError(f"{where}: no such folder (expected what save_pretrained writes: config.json, "
                              "model.safetensors, tokenizer.json)")
    config, tokenizer = _read_json(folder / "config.json"), _read_json(folder / "tokenizer.json")
    tokenizer_config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() \
        else {}
    rows = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else int(config.get("num_labels", 2))
    max_length = int(config.get("max_position_embeddings", 512))
    if isinstance(tokenizer_config.get("model_max_length"), int):
        max_length = min(max_length, tokenizer_config["model_max_length"])
    pad_id = config.get("pad_token_id")
    pad_id = int(pad_id) if isinstance(pad_id, int) else 0
    with torch.random.fork_rng(devices=[]):
        net = _hf_net(config, rows, where).float()
    vocab = int(config.get("vocab_size", 2))
    ids = torch.randint(0, max(vocab, 1), (2, min(8, max_length)), generator=_probe_generator())
    head = find_head(net, lambda: net(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, where)
    check_weights(net, folder / "model.safetensors", head, n_classes, "model.weights")
    return {"n_classes": n_classes, "config": config, "tokenizer": tokenizer, "head": head, "max_length": max_length,
            "pad_id": pad_id}


# ---------------------------------------------------------------------------
# timm classifiers


class TimmModel(nn.Module):
    """timm.create_model(arch) with `n_classes` outputs; its head is get_classifier().

    input_shape: (H, W) images (one channel) or (C, H, W); inputs reach the
    network as float32, not normalised.
    """

    parameter_root = "net."  # your network is `self.net`: specialists.freeze reads its names below this

    def __init__(self, n_classes: int, arch: str, input_shape: list[int], head: str = ""):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        net = _timm_net(arch, n_classes, self.input_shape)
        self.head_name = head or _name_of(net, net.get_classifier(), f"model.arch={arch!r}")
        self.net = with_head(net, self.head_name, n_classes, f"model.arch={arch!r}")

    @property
    def head(self) -> nn.Linear:
        return self.net.get_submodule(self.head_name)

    input_kind = "image"

    def encode(self, inputs):
        return encode_arrays(inputs, self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(1) if len(self.input_shape) == 2 else x)

    def load_weights(self, path: str, classes: list[str]) -> None:
        load_weights(self.net, path, self.head_name, "model.weights")


def _timm_net(arch: str, n_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    timm = _extra("timm", "timm")
    if len(input_shape) not in (2, 3):
        raise ConfigError(f"model.name=timm reads images, (H, W) or (C, H, W); the inputs have shape {input_shape}")
    in_chans = 1 if len(input_shape) == 2 else input_shape[0]
    try:
        return timm.create_model(arch, pretrained=False, num_classes=n_classes, in_chans=in_chans)
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"model.arch={arch!r}: timm cannot build it: {err}") from None


def _name_of(net: nn.Module, layer: nn.Module, where: str) -> str:
    name = next((n for n, m in net.named_modules() if m is layer), None)
    if not name or not isinstance(layer, nn.Linear):
        raise ConfigError(f"{where}: its get_classifier() is a {type(layer).__name__}, not a Linear layer of the "
                          "network; specialists replace the rows of a Linear head")
    return name


def _timm_kwargs(cfg, input_kind: str, input_shape: tuple[int, ...], n_classes: int) -> dict:
    where = f"model.arch={cfg.arch!r}"
    if input_kind == "text":
        raise ConfigError("model.name=timm reads images, but the data are texts; for texts use model.name=hf")
    with torch.random.fork_rng(devices=[]):
        model = TimmModel(n_classes, cfg.arch, list(input_shape))
    probe = torch.randn((2, *input_shape), generator=_probe_generator())
    find_head(model.net, lambda: model(probe), where, candidate=model.head)
    if cfg.weights:
        check_weights(model.net, Path(cfg.weights).expanduser(), model.head_name, n_classes, "model.weights")
    return {"n_classes": n_classes, "arch": cfg.arch, "input_shape": list(input_shape), "head": model.head_name}


# ---------------------------------------------------------------------------


def spec_kwargs(cfg, input_kind: str, input_shape: tuple[int, ...], n_classes: int) -> dict:
    """Constructor arguments of the model `cfg` (a ModelConfig of a USER_MODELS name) names, on this data.

    Raises ConfigError (factory, architecture, head) or CheckpointError
    (weights) naming the setting or file and what was expected.
    """
    build = {"torch": _torch_kwargs, "hf": _hf_kwargs, "timm": _timm_kwargs}[cfg.name]
    return build(cfg, input_kind, tuple(int(s) for s in input_shape), n_classes)

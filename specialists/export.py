"""`specialists export`: a run's models as ONNX or TorchScript files, plus a numpy combiner.

    specialists export RUN_DIR --format onnx [--out DIR]

writes into DIR (default RUN_DIR/export-<format>):

    generalist.onnx        the generalist (and peer_<k>.onnx for each further full model)
    specialist_<m>.onnx    each specialist: logits over its classes, then the dustbin
    export.json            classes, input names and encoding, each specialist's classes and
                           dustbin correction, the combine settings (top_n, specialist_weight)
    combine_numpy.py       the combination in plain numpy (a copy of specialists/combine_numpy.py)

Each model is exported on ENCODED inputs, as its `forward` takes them: (x,) float32
of shape (N, *input_shape) for mlp and cnn (the feature normalisation is inside the
model), (ids, offsets) int64 for fasttext, the flat hashed n-gram ids of N texts and
each text's start in them (torch.nn.EmbeddingBag's inputs; `model.encode(texts)`
makes them, export.json's "input" holds the hashing settings: "encodings" one entry
per way the models hash texts, the generalist's first, and each model's "encoding"
its index, for specialists that read character grams beside the generalist's words).
The batch (and the number of ids) is dynamic. `combine_numpy.load(DIR).run(inputs, models)` reproduces
`specialists.load(RUN_DIR).predict_proba` (tests: within 1e-5).

ONNX uses torch.onnx.export's default exporter (torch.export based), which needs the
`onnx` and `onnxscript` packages: `pip install 'specialists[export]'` (with onnxruntime
to run the files). TorchScript (torch.jit.trace) needs nothing more, but torch marks
torch.jit as deprecated; its files load with torch.jit.load.

The folder is built beside DIR and renamed into place when complete; DIR may be new,
empty, or an earlier export (replaced whole).
"""

from __future__ import annotations

import contextlib
import io
import secrets
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from .rundir import replace_folder, write_json

__all__ = ["FORMATS", "ExportError", "export_run"]

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORT_FILE = "export.json"
COMBINER = Path(__file__).with_name("combine_numpy.py")
ONNX_MAX_INLINE_BYTES = 1 << 30  # larger weights go to an external data file (protobuf stops at 2 GiB)


class ExportError(ValueError):
    """An export cannot be made: unknown format, missing exporter package, or an occupied folder."""


def export_run(run_dir: str | Path, out: str | Path | None = None, format: str = "onnx", *,
               log=print, **options) -> Path:
    """Export a run's models and combiner into `out`; returns the folder.

    options: those of `specialists.load` (top_n, dustbin, specialist_weight, generalists,
    use_specialists): the combination the export reproduces.
    """
    from .ensemble import SpecialistsModel

    if format not in FORMATS:
        raise ExportError(f"--format {format!r} must be one of {sorted(FORMATS)}")
    if format == "onnx":
        for package in ("onnx", "onnxscript"):
            try:
                __import__(package)
            except ImportError:
                raise ExportError(f"ONNX export needs the {package!r} package: pip install 'specialists[export]' "
                                  "(or use --format torchscript)") from None
    model = SpecialistsModel(run_dir, "cpu", **options)
    out = Path(out) if out is not None else model.run.root / f"export-{format}"
    _check_out(out)
    example = _example_inputs(model.generalist)
    names = ["ids", "offsets"] if model.input_kind == "text" else ["x"]
    encoders, reads = _encoders(model)
    suffix = FORMATS[format]
    full_files = ["generalist" + suffix] + [f"peer_{k}{suffix}" for k in range(1, len(model.full_models))]
    spec = {
        "format": format,
        "run": str(model.run.root),
        "classes": list(model.classes),
        "input": _input_spec(model.generalist, names, encoders),
        "output": "logits",
        "full_models": [{"file": f, "encoding": e} for f, e in zip(full_files, reads)],
        "specialists": [{"file": f"specialist_{m}{suffix}", "id": info.get("id", m), "classes": list(info["classes"]),
                         "dustbin_correction": correction, "encoding": e}
                        for m, ((_, info), correction, e) in enumerate(zip(model.specialists,
                                                                            model.dustbin_corrections(),
                                                                            reads[len(full_files):]))],
        "combine": {"top_n": model.top_n, "specialist_weight": model.specialist_weight, "dustbin": model.dustbin},
    }
    models = list(zip(full_files, model.full_models)) + [(s["file"], m) for s, (m, _) in
                                                         zip(spec["specialists"], model.specialists)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir()
        for filename, net in models:
            log(f"export: {filename}")
            _export_one(net.eval(), example, names, tmp / filename, format)
        shutil.copyfile(COMBINER, tmp / COMBINER.name)
        write_json(tmp / EXPORT_FILE, spec)  # last: its presence means the folder is whole
        _check_out(out)  # still free, or an earlier export
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: {out} ({len(models)} models, {format})")
    return out


def _encoders(model) -> tuple[list[torch.nn.Module], list[int]]:
    """One model for each way the run's models encode raw inputs, the generalist's first, and the index of
    each full model's, then each specialist's, encoding in that list."""
    from .models import encoding_key

    encoders, keys, reads = [model.generalist], [encoding_key(model.generalist)], []
    for net in list(model.full_models) + [m for m, _ in model.specialists]:
        key = encoding_key(net)
        if key is not None and key not in keys:  # None: reads its generalist's encoding
            encoders.append(net)
            keys.append(key)
        reads.append(keys.index(key) if key is not None else 0)
    return encoders, reads


def _input_spec(generalist: torch.nn.Module, names: list[str], encoders: list[torch.nn.Module]) -> dict:
    if generalist.input_kind == "text":
        encodings = [{"buckets": m.buckets, "ngrams": m.ngrams, "char_ngrams": m.char_ngrams,
                      "char_ngrams_min": m.char_ngrams_min, "tokenizer": m.tokenizer,
                      "function": "specialists.models.hash_ngrams"} for m in encoders]
        return {"kind": "text", "names": names, "dtypes": ["int64", "int64"], "encoding": encodings[0],
                "encodings": encodings}
    return {"kind": generalist.input_kind, "names": names, "dtypes": ["float32"],
            "shape": ["N", *generalist.input_shape]}


def _example_inputs(generalist: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: 3 rows (not 0 or 1, which torch.export would take for constants)."""
    if generalist.input_kind == "text":
        ids = torch.arange(7, dtype=torch.int64) % generalist.buckets
        return ids, torch.tensor([0, 2, 5], dtype=torch.int64)
    return (torch.zeros((3, *generalist.input_shape), dtype=torch.float32),)


def _export_one(net: torch.nn.Module, example: tuple, names: list[str], path: Path, format: str) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's, and the exporters' own notes
        warnings.simplefilter("ignore", FutureWarning)
        if format == "torchscript":
            torch.jit.trace(net, example).save(str(path))
            return
        batch = torch.export.Dim("batch")
        dims = ({0: torch.export.Dim("n_ids")}, {0: batch}) if len(names) == 2 else ({0: batch},)
        size = sum(p.numel() * p.element_size() for p in net.state_dict().values())
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            torch.onnx.export(net, example, str(path), input_names=names, output_names=["logits"],
                              dynamic_shapes=dims, dynamo=True, external_data=size > ONNX_MAX_INLINE_BYTES,
                              verbose=False)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_FILE).is_file():
        raise ExportError(f"--out {out} holds files and is not an earlier export; pick a new or empty folder")


def encoded_inputs(model, inputs) -> tuple[np.ndarray, ...] | list[tuple[np.ndarray, ...]]:
    """The encoded numpy inputs of the exported models for raw `inputs` (texts or arrays): what
    `combine_numpy.Combiner.run` takes. One tuple, or a list of one per encoding (export.json's
    input.encodings) where specialists hash other n-grams than the generalist."""
    encoded = []
    for encoder in _encoders(model)[0]:
        batch = encoder.encode(inputs)
        encoded.append(tuple(t.numpy() for t in batch.batch(np.arange(len(batch)), torch.device("cpu"))))
    return encoded[0] if len(encoded) == 1 else encoded

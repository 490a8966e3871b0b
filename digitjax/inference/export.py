"""A trained model as one file that runs without digitjax: StableHLO for JAX programs, ONNX for
any ONNX runtime; and `ExportedModel`, which `predict --model` runs such a file with.

Both take (N, 28, 28) float32 images in [0, 1] (N dynamic; see PREPROCESSING) and return (N, 10)
class probabilities: the softmax of the logits divided by the checkpoint's temperature, as
`predict` and `evaluate` compute them; and, for a model with a non-digit detector, a second
output: (N,) scores, positive for an image that does not look like a digit. Both carry the same
metadata document (the checkpoint's config, dataset, test accuracy, temperature, detector,
digitjax version, the input contract):
- StableHLO: a zip archive of `metadata.json` and `model.jax_exported`, what
  `jax.export.export(...).serialize()` wrote: lowered for cpu, cuda and tpu with the standard
  `lax.conv` layers, loaded with `jax.export.deserialize` alone (no flax, no digitjax).
- ONNX (opset 17, IR version 8, so older runtimes load it too): built from the parameters with
  onnx's graph API; the metadata is the JSON under `metadata_props["digitjax"]`.

This module imports no JAX at the top: running an ONNX file must not pay for importing it.
"""

import hashlib
import importlib.util
import io
import json
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from digitjax import __version__
from digitjax.config import UserError, is_int, reason
from digitjax.inference.classifier import (
    ModelInfo,
    checkpoint_info,
    in_batches,
    packed,
    step_record,
)
from digitjax.outputs import check_output, write_file, writing
from digitjax.weights import is_class_count, is_number, is_temperature

FORMATS = ("stablehlo", "onnx")
SUFFIXES = {"stablehlo": ".stablehlo", "onnx": ".onnx"}
PLATFORMS = ("cpu", "cuda", "tpu")
ONNX_OPSET, ONNX_IR_VERSION = 17, 8  # IR 8 is the one that came with opset 17 (onnx 1.12)
METADATA_MEMBER, EXPORTED_MEMBER = "metadata.json", "model.jax_exported"
METADATA_KEY = "digitjax"
INPUT_NAME, OUTPUT_NAME, SCORE_NAME = "images", "probabilities", "non_digit_score"
IMAGE_SIDE = 28
MAX_FILE_BYTES = 2**31  # ONNX's protobuf limit; far above any model digitjax trains
# A StableHLO archive's members: the largest model digitjax trains (--preset best) serializes
# to 7 MB, and float weights hardly compress (1.07x); far beyond either is not an export.
MAX_MEMBER_BYTES = 2**30
MAX_COMPRESSION_RATIO = 20
ONNX_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(uint8)": "uint8"}
# An ONNX file carries the SHA-256 of its own bytes, taken with the digest's 64 characters
# written as zeros, under this key of its properties: a flipped bit in a weight would
# otherwise change answers silently (a StableHLO archive has its zip's CRCs). In the file the
# property is the key's protobuf field (1), then the 64-byte value's (2).
CHECKSUM_KEY = "digitjax_sha256"
_CHECKSUM_FIELD = b"\x0a" + bytes([len(CHECKSUM_KEY)]) + CHECKSUM_KEY.encode() + b"\x12\x40"
_METADATA_FIELD = b"\x0a" + bytes([len(METADATA_KEY)]) + METADATA_KEY.encode() + b"\x12"
_UNSIGNED = b"0" * 64
PREPROCESSING = (
    "(N, 28, 28) float32 in [0, 1]: a white digit on black, its longer side scaled to 20 px and "
    "its centre of mass at the centre, as in MNIST (what digitjax.inference.preprocess produces)"
)


def export_model(checkpoint: Path, fmt: str | None, out: Path, overwrite: bool = False) -> dict:
    """Writes the checkpoint's model to `out` in format `fmt` (default: by the suffix of
    `out`); returns what was written."""
    fmt = export_format(fmt, out)
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise UserError("exporting ONNX needs the onnx package: pip install 'digitjax[onnx]'")
    check_output("--out", out, overwrite)  # before the slow part: a wrong path costs nothing
    from digitjax.checkpoint import restore_model

    model = restore_model(checkpoint)
    metadata = export_metadata(model)
    data = stablehlo_bytes(model, metadata) if fmt == "stablehlo" else onnx_bytes(model, metadata)
    with writing("--out", out):
        write_file(out, data)
    return {"path": str(out), "format": fmt, "bytes": len(data), "metadata": metadata}


def export_format(fmt: str | None, out: Path) -> str:
    """--format, else the one --out's suffix names; they must not contradict each other (a
    file named .stablehlo holding ONNX would mislead whoever opens it)."""
    by_suffix = next((f for f, suffix in SUFFIXES.items() if out.suffix.lower() == suffix), None)
    if fmt is None and by_suffix is None:
        raise UserError(
            f"give --format {' or '.join(FORMATS)} (or an --out ending in .stablehlo or .onnx)"
        )
    fmt = fmt.lower() if fmt is not None else by_suffix  # --format ONNX, as suffixes are read
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}': choose {' or '.join(FORMATS)}")
    if by_suffix is not None and by_suffix != fmt:
        raise UserError(
            f"--format {fmt} contradicts --out {out.name}: name the file {SUFFIXES[fmt]}"
        )
    return fmt


def export_metadata(model: Any) -> dict:
    info = checkpoint_info(model)
    return {
        "digitjax_version": __version__,
        "checkpoint": "/".join(model.step_dir.parts[-3:]),  # run/kind/step, not the user's path
        "step": info.step,
        "epoch": step_record(model).get("epoch"),
        "test_accuracy": info.test_accuracy,  # on the dataset's test split
        "dataset": info.dataset,
        "num_classes": info.num_classes,
        "weights": "moving average" if model.config.ema_decay else "trained",
        "temperature": model.temperature,  # the logits are divided by it before the softmax
        "config": model.config.to_dict(),
        "input": {"name": INPUT_NAME, "shape": ["N", 28, 28], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", info.num_classes]},
        # Positive: the image does not look like a digit.
        "non_digit_score": {"name": SCORE_NAME, "shape": ["N"]} if model.detector else None,
        "preprocessing": PREPROCESSING,
    }


def stablehlo_bytes(model: Any, metadata: dict) -> bytes:
    import jax

    from digitjax.model import calibrated_outputs
    from digitjax.weights import IMAGE_SIZE

    conv_impls = ("lax",) * len(model.config.channels)  # portable: no CPU-specific layer forms

    def calibrated(images: jax.Array) -> Any:
        probabilities, scores = calibrated_outputs(
            model.graphdef, model.params, images, conv_impls, model.temperature, model.detector
        )
        return probabilities if scores is None else (probabilities, scores)

    shape = jax.export.symbolic_shape(f"N, {IMAGE_SIZE}, {IMAGE_SIZE}")
    exported = jax.export.export(jax.jit(calibrated), platforms=PLATFORMS)(
        jax.ShapeDtypeStruct(shape, np.float32)
    )
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(METADATA_MEMBER, json.dumps(metadata, indent=2))
        z.writestr(EXPORTED_MEMBER, bytes(exported.serialize()))
    return archive.getvalue()


def onnx_bytes(model: Any, metadata: dict) -> bytes:
    """The CNN of digitjax.model as an ONNX graph in NCHW layout (flax's is NHWC), with its
    non-digit detector if it has one."""
    from onnx import helper, numpy_helper

    from digitjax.checkpoint import leaves_by_path
    from digitjax.weights import NUM_POOLS

    params = {
        name: np.asarray(value, np.float32) for name, value in leaves_by_path(model.params).items()
    }
    initializers = [numpy_helper.from_array(np.array([1], np.int64), "channel_axis")]
    nodes = [helper.make_node("Unsqueeze", [INPUT_NAME, "channel_axis"], ["x0"])]
    x, conv_outputs = "x0", []

    def add(op: str, inputs: list[str], **attributes: Any) -> None:
        nonlocal x
        x = f"x{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [x], **attributes))

    def weight(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    for i in range(len(model.config.channels)):
        kernel = params[f"convs/{i}/kernel"]  # (kh, kw, in, out); ONNX wants (out, in, kh, kw)
        kh, kw = kernel.shape[:2]
        add(
            "Conv",
            [
                x,
                weight(f"conv{i}.kernel", kernel.transpose(3, 2, 0, 1)),
                weight(f"conv{i}.bias", params[f"convs/{i}/bias"]),
            ],
            kernel_shape=[kh, kw],
            pads=[kh // 2, kw // 2, kh // 2, kw // 2],
        )
        add("Relu", [x])
        if i < NUM_POOLS:
            add("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        conv_outputs.append(x)
    add("Flatten", [x], axis=1)
    # Flax flattened (height, width, channel); this graph flattens (channel, height, width):
    # the hidden layer's kernel rows are reordered to match.
    hidden = params["hidden/kernel"]
    channels = model.config.channels[-1]
    side = int(round((hidden.shape[0] // channels) ** 0.5))
    hidden = hidden.reshape(side, side, channels, -1).transpose(2, 0, 1, 3).reshape(hidden.shape)
    add("Gemm", [x, weight("hidden.kernel", hidden), weight("hidden.bias", params["hidden/bias"])])
    add("Relu", [x])
    hidden_output = x
    logits = [
        weight("logits.kernel", params["logits/kernel"]),
        weight("logits.bias", params["logits/bias"]),
    ]
    add("Gemm", [x, *logits])
    if model.temperature is not None:
        add("Div", [x, weight("temperature", np.array(model.temperature, np.float32))])
    nodes.append(helper.make_node("Softmax", [x], [OUTPUT_NAME], axis=-1))
    outputs = [OUTPUT_NAME]
    if model.detector is not None:
        # weights.detector_features: the hidden layer, the calibrated logits, their
        # logsumexp, then each conv output's mean and maximum over its positions.
        calibrated_logits, features = x, [hidden_output, x]
        add("ReduceLogSumExp", [calibrated_logits], axes=[1], keepdims=1)
        features.append(x)
        for output in conv_outputs:
            for op in ("ReduceMean", "ReduceMax"):
                add(op, [output], axes=[2, 3], keepdims=0)
                features.append(x)
        add("Concat", features, axis=1)
        add("MatMul", [x, weight("detector.kernel", model.detector.kernel)])
        bias = weight("detector.bias", np.array(model.detector.bias, np.float32))
        nodes.append(helper.make_node("Add", [x, bias], [SCORE_NAME]))
        outputs.append(SCORE_NAME)
    return _onnx_file(nodes, initializers, params["logits/bias"].shape[0], outputs, metadata)


def _onnx_file(
    nodes: list, initializers: list, num_classes: int, outputs: list[str], metadata: dict
) -> bytes:
    """The graph as a checked ONNX model carrying digitjax's metadata."""
    import onnx
    from onnx import TensorProto, helper

    shapes = {OUTPUT_NAME: ["N", num_classes], SCORE_NAME: ["N"]}
    graph = helper.make_graph(
        nodes,
        "digitjax_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 28, 28])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name]) for name in outputs],
        initializers,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=ONNX_IR_VERSION,
        producer_name="digitjax",
        producer_version=__version__,
        doc_string=(
            f"Input: {PREPROCESSING}. Output: (N, {num_classes}) class probabilities"
            + (f"; {SCORE_NAME}: (N,), positive for a non-digit." if len(outputs) > 1 else ".")
        ),
    )
    properties = {METADATA_KEY: json.dumps(metadata), CHECKSUM_KEY: _UNSIGNED.decode()}
    helper.set_model_props(onnx_model, properties)
    onnx.checker.check_model(onnx_model, full_check=True)
    return signed(onnx_model.SerializeToString())


def signed(unsigned: bytes) -> bytes:
    """An ONNX file's bytes with its checksum written in place of the zeros it carries."""
    at = _checksum_at(unsigned)
    if at is None:
        raise ValueError(f"no single {CHECKSUM_KEY} property to write the checksum into")
    digest = hashlib.sha256(unsigned).hexdigest().encode()
    return unsigned[:at] + digest + unsigned[at + len(digest) :]


def _checksum_at(data: bytes) -> int | None:
    """Where the checksum's 64 characters start in an ONNX file's bytes (None: it has none,
    or more than one)."""
    found = data.find(_CHECKSUM_FIELD)
    if found < 0 or data.find(_CHECKSUM_FIELD, found + 1) >= 0:
        return None
    return found + len(_CHECKSUM_FIELD)


def _check_checksum(path: Path, data: bytes) -> None:
    at = _checksum_at(data)
    if at is None and _METADATA_FIELD in data:
        raise _not_an_export(
            path,
            "ONNX",
            "it carries no checksum (older digitjax exports did not: export it again)",
        )
    if at is None and path.suffix.lower() == SUFFIXES["stablehlo"]:  # named for what it is not
        raise _not_an_export(path, "StableHLO", "not a zip archive")
    if at is None:  # the metadata and checksum come last: a cut copy loses both
        raise _not_an_export(
            path, "ONNX", "it carries no digitjax metadata (another file, or an export cut short)"
        )
    claimed = data[at : at + len(_UNSIGNED)]
    unsigned = data[:at] + _UNSIGNED + data[at + len(_UNSIGNED) :]
    if hashlib.sha256(unsigned).hexdigest().encode() != claimed:
        raise UserError(
            f"{path} is damaged: its contents do not match its checksum (a flipped bit, a cut "
            "or edited copy); export it again"
        )


class ExportedModel:
    """An exported file as a `Classifier`: run with onnxruntime (no JAX imported) or with
    jax.export. The format is told by the content (a zip archive is StableHLO), not the name.

    A file is taken for what it shows, not for its metadata alone: its input and output must
    be those of a digitjax export (names, dtypes, shapes with a free batch dimension), and what
    it returns must be probabilities, checked on every run."""

    def __init__(self, path: Path):
        self.source = path
        data = _read_limited(path)
        self.format = "stablehlo" if data.startswith(b"PK\x03\x04") else "onnx"
        load = _load_onnx if self.format == "onnx" else _load_stablehlo
        self.metadata, self._run = load(path, data)
        self.info = ModelInfo(
            name=path.name,
            kind=self.format,
            step=self.metadata.get("step"),
            test_accuracy=self.metadata.get("test_accuracy"),
            temperature=self.metadata.get("temperature"),
            dataset=self.metadata["dataset"],
            num_classes=self.metadata["num_classes"],
            detects_non_digits=_has_detector(self.metadata),
        )

    def outputs(self, images: np.ndarray) -> np.ndarray:
        return in_batches(self._checked_run, images)

    def _checked_run(self, batch: np.ndarray) -> np.ndarray:
        try:
            results = [np.asarray(result) for result in self._run(batch)]
        except Exception as e:  # the runtimes raise their own types for a model that fails
            raise UserError(f"{self.source} failed to run: {reason(e)[:200]}") from None
        probabilities, scores = results[0], results[1] if len(results) > 1 else None
        expected = (len(batch), self.info.num_classes)
        if probabilities.shape != expected:
            raise UserError(
                f"{self.source} returned an array of shape {probabilities.shape}, not {expected}"
            )
        if not _are_probabilities(probabilities):
            raise UserError(
                f"{self.source} returned values that are not probabilities (each row must be "
                "finite, in [0, 1] and sum to 1): not a digitjax export"
            )
        if scores is not None and not (scores.shape == (len(batch),) and np.isfinite(scores).all()):
            raise UserError(
                f"{self.source} returned non-digit scores that are not {len(batch)} finite numbers"
            )
        return packed(probabilities, scores)


def _has_detector(metadata: dict) -> bool:
    return metadata.get("non_digit_score") is not None


def _are_probabilities(rows: np.ndarray) -> bool:
    """float32 softmax rows: finite, in [0, 1] and summing to 1 up to rounding."""
    rows = rows.astype(np.float64)
    return bool(
        np.isfinite(rows).all()
        and (rows >= -1e-6).all()
        and (rows <= 1 + 1e-6).all()
        and (np.abs(rows.sum(axis=1) - 1) <= 1e-4).all()
    )


def _read_limited(path: Path) -> bytes:
    """The file's bytes, refused past MAX_FILE_BYTES. Regular files only: a pipe would block
    until something wrote to it, and a device such as /dev/zero never ends."""
    too_large = UserError(f"{path} is too large for a digitjax export")
    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode):
            raise UserError(f"{path} is not a regular file: not a digitjax export")
        if status.st_size > MAX_FILE_BYTES:
            raise too_large
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)  # bounded: it may have grown since
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise too_large
    return data


def _not_an_export(path: Path, fmt: str, reason: str) -> UserError:
    return UserError(f"{path} is not a digitjax {fmt} export: {reason[:200]}")


# A tensor as the checks below see it: name (None where the format has none), dtype, shape
# with None for a free dimension.
Signature = tuple[str | None, str, tuple[int | None, ...]]


def _check_signature(
    path: Path, fmt: str, inputs: list[Signature], outputs: list[Signature], metadata: dict
) -> None:
    """One (N, 28, 28) float32 input and one (N, num_classes) float32 output, then (N,) float32
    scores where the metadata says it has a non-digit detector; N free, named as an export
    names them (ONNX names its tensors; StableHLO does not)."""
    named = fmt == "ONNX"
    num_classes = metadata["num_classes"]
    want_in = (INPUT_NAME if named else None, "float32", (None, IMAGE_SIDE, IMAGE_SIDE))
    want_out: list[Signature] = [(OUTPUT_NAME if named else None, "float32", (None, num_classes))]
    if _has_detector(metadata):
        want_out.append((SCORE_NAME if named else None, "float32", (None,)))
    if inputs != [want_in]:
        got = ", ".join(map(_describe, inputs)) or "nothing"
        raise _not_an_export(path, fmt, f"it takes {got}, not {_describe(want_in)}")
    if outputs != want_out:
        got = ", ".join(map(_describe, outputs)) or "nothing"
        want = ", ".join(map(_describe, want_out))
        raise _not_an_export(path, fmt, f"it returns {got}, not {want}")


def _describe(tensor: Signature) -> str:
    name, dtype, shape = tensor
    dims = ", ".join("N" if d is None else str(d) for d in shape)
    return f"{name + ' ' if name else ''}{dtype} ({dims})"


def _load_onnx(path: Path, data: bytes) -> tuple[dict, Any]:
    _check_checksum(path, data)
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "running ONNX models needs onnxruntime: pip install 'digitjax[onnx]'"
        ) from None
    try:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for any unreadable model
        raise _not_an_export(path, "ONNX", reason(e)) from None
    metadata = _parse_metadata(
        path, "ONNX", session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    )

    def signature(tensor: Any) -> Signature:
        dtype = ONNX_DTYPES.get(tensor.type, str(tensor.type))
        return (
            str(tensor.name),
            dtype,
            tuple(d if isinstance(d, int) else None for d in tensor.shape),
        )

    _check_signature(
        path,
        "ONNX",
        [signature(t) for t in session.get_inputs()],
        [signature(t) for t in session.get_outputs()],
        metadata,
    )
    names = [OUTPUT_NAME, SCORE_NAME] if _has_detector(metadata) else [OUTPUT_NAME]
    return metadata, lambda images: session.run(names, {INPUT_NAME: images})


def _load_stablehlo(path: Path, data: bytes) -> tuple[dict, Any]:
    raw_metadata, serialized = _read_archive(path, data)
    metadata = _parse_metadata(path, "StableHLO", raw_metadata)
    import jax

    try:
        exported = jax.export.deserialize(bytearray(serialized))
    except Exception as e:  # flatbuffers raises anything on damaged bytes
        raise _not_an_export(path, "StableHLO", reason(e)) from None

    def signature(aval: Any) -> Signature:
        dims = tuple(d if isinstance(d, int) else None for d in aval.shape)  # None: symbolic
        return None, str(aval.dtype), dims

    _check_signature(
        path,
        "StableHLO",
        [signature(a) for a in exported.in_avals],
        [signature(a) for a in exported.out_avals],
        metadata,
    )
    forward = jax.jit(exported.call)
    if _has_detector(metadata):
        return metadata, forward
    return metadata, lambda images: [forward(images)]


def _read_archive(path: Path, data: bytes) -> tuple[str, bytes]:
    """The metadata and serialized program of a StableHLO archive. What is read is bounded by
    the zip directory's sizes, checked before anything is decompressed (a zip bomb: gigabytes
    that compress to a few megabytes), and again while reading (the directory may lie)."""
    fmt = "StableHLO"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: info for info in archive.infolist()}
            for name in (EXPORTED_MEMBER, METADATA_MEMBER):
                if name not in members:
                    raise _not_an_export(path, fmt, f"no {name} in the archive")
                size, packed = members[name].file_size, members[name].compress_size
                if size > MAX_MEMBER_BYTES or size > MAX_COMPRESSION_RATIO * max(packed, 1):
                    raise _not_an_export(
                        path,
                        fmt,
                        f"its {name} unpacks to {size:,} bytes from {packed:,}, "
                        "more than a digitjax export holds",
                    )
            with archive.open(METADATA_MEMBER) as member:
                raw_metadata = member.read(MAX_MEMBER_BYTES + 1).decode("utf-8", "replace")
            with archive.open(EXPORTED_MEMBER) as member:
                serialized = member.read(MAX_MEMBER_BYTES + 1)
    except zipfile.BadZipFile:  # its directory comes last: a cut copy loses it
        raise _not_an_export(path, fmt, "not a whole zip archive (cut short?)") from None
    except (zipfile.LargeZipFile, EOFError, ValueError, OSError) as e:
        raise _not_an_export(path, fmt, reason(e)) from None
    if max(len(raw_metadata), len(serialized)) > MAX_MEMBER_BYTES:
        raise _not_an_export(path, fmt, "its contents are larger than its zip directory says")
    return raw_metadata, serialized


def _parse_metadata(path: Path, fmt: str, raw: str | None) -> dict:
    if raw is None:
        raise _not_an_export(path, fmt, "it carries no digitjax metadata")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _not_an_export(path, fmt, f"unreadable metadata ({e})") from None
    if not isinstance(metadata, dict):
        raise _not_an_export(path, fmt, "unreadable metadata")
    for name, valid in METADATA_FIELDS.items():
        if not valid(metadata.get(name)):
            shown = repr(metadata.get(name))[:40]
            raise _not_an_export(path, fmt, f"its metadata's {name} is {shown}")
    return metadata


# The metadata fields a loaded export is described and judged by (ModelInfo), and what each
# must hold: a forged or damaged document is refused here rather than failing later, where
# its values are used (the server's answers, the default confidence threshold).
METADATA_FIELDS = {
    "num_classes": is_class_count,
    "dataset": lambda v: isinstance(v, str),
    "step": lambda v: v is None or (is_int(v) and v >= 0),
    "test_accuracy": lambda v: v is None or is_number(v, 0, 1),
    "temperature": lambda v: v is None or is_temperature(v),
    "non_digit_score": lambda v: v is None or isinstance(v, dict),
}

"""A trained model as one file that runs without digitjax: StableHLO for JAX programs, ONNX for
any ONNX runtime; and `ExportedModel`, which `predict --model` runs such a file with.

Both take (N, 28, 28) float32 images in [0, 1] (N dynamic; see PREPROCESSING) and return (N, 10)
class probabilities: the softmax of the logits divided by the checkpoint's temperature, as
`predict` and `evaluate` compute them. Both carry the same metadata document (the checkpoint's
config, dataset, test accuracy, temperature, digitjax version, the input contract):
- StableHLO: a zip archive of `metadata.json` and `model.jax_exported`, what
  `jax.export.export(...).serialize()` wrote: lowered for cpu, cuda and tpu with the standard
  `lax.conv` layers, loaded with `jax.export.deserialize` alone (no flax, no digitjax).
- ONNX (opset 17, IR version 8, so older runtimes load it too): built from the parameters with
  onnx's graph API; the metadata is the JSON under `metadata_props["digitjax"]`.

This module imports no JAX at the top: running an ONNX file must not pay for importing it.
"""

import importlib.util
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from digitjax import __version__
from digitjax.config import UserError, reason
from digitjax.inference.classifier import ModelInfo, checkpoint_info, in_batches, step_record

FORMATS = ("stablehlo", "onnx")
SUFFIXES = {"stablehlo": ".stablehlo", "onnx": ".onnx"}
PLATFORMS = ("cpu", "cuda", "tpu")
ONNX_OPSET, ONNX_IR_VERSION = 17, 8  # IR 8 is the one that came with opset 17 (onnx 1.12)
METADATA_MEMBER, EXPORTED_MEMBER = "metadata.json", "model.jax_exported"
METADATA_KEY = "digitjax"
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
MAX_FILE_BYTES = 2**31  # ONNX's protobuf limit; far above any model digitjax trains
PREPROCESSING = (
    "(N, 28, 28) float32 in [0, 1]: a white digit on black, its longer side scaled to 20 px and "
    "its centre of mass at the centre, as in MNIST (what digitjax.inference.preprocess produces)"
)


def export_model(checkpoint: Path, fmt: str | None, out: Path, overwrite: bool = False) -> dict:
    """Writes the checkpoint's model to `out` in format `fmt` (default: by the suffix of
    `out`); returns what was written."""
    fmt = fmt or next((f for f, suffix in SUFFIXES.items() if out.suffix.lower() == suffix), None)
    if fmt is None:
        raise UserError(
            f"give --format {' or '.join(FORMATS)} (or an --out ending in .stablehlo or .onnx)"
        )
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}': choose {' or '.join(FORMATS)}")
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise UserError("exporting ONNX needs the onnx package: pip install 'digitjax[onnx]'")
    if out.is_dir():
        raise UserError(f"{out} is a folder: give --out a file name")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: pass --overwrite to replace it")
    # The file is opened before the slow part, so an unwritable path fails at once. It gets its
    # name only when complete: an interrupted export leaves no partial model behind.
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        file = partial.open("xb")
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot write {out}: part of its folder path is a file") from None
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        from digitjax.checkpoint import restore_model

        model = restore_model(checkpoint)
        metadata = export_metadata(model)
        data = (
            stablehlo_bytes(model, metadata) if fmt == "stablehlo" else onnx_bytes(model, metadata)
        )
        try:
            with file:
                file.write(data)
            os.replace(partial, out)
        except OSError as e:
            raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        file.close()
        partial.unlink(missing_ok=True)
    return {"path": str(out), "format": fmt, "bytes": out.stat().st_size, "metadata": metadata}


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
        "preprocessing": PREPROCESSING,
    }


def stablehlo_bytes(model: Any, metadata: dict) -> bytes:
    import jax

    from digitjax.model import IMAGE_SIZE, calibrated_probabilities

    conv_impls = ("lax",) * len(model.config.channels)  # portable: no CPU-specific layer forms

    def calibrated(images: jax.Array) -> jax.Array:
        return calibrated_probabilities(
            model.graphdef, model.params, images, conv_impls, model.temperature
        )

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
    """The CNN of digitjax.model as an ONNX graph in NCHW layout (flax's is NHWC)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from digitjax.checkpoint import leaves_by_path
    from digitjax.model import NUM_POOLS

    params = {
        name: np.asarray(value, np.float32) for name, value in leaves_by_path(model.params).items()
    }
    initializers = [numpy_helper.from_array(np.array([1], np.int64), "channel_axis")]
    nodes = [helper.make_node("Unsqueeze", [INPUT_NAME, "channel_axis"], ["x0"])]
    x = "x0"

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
    add("Flatten", [x], axis=1)
    # Flax flattened (height, width, channel); this graph flattens (channel, height, width):
    # the hidden layer's kernel rows are reordered to match.
    hidden = params["hidden/kernel"]
    channels = model.config.channels[-1]
    side = int(round((hidden.shape[0] // channels) ** 0.5))
    hidden = hidden.reshape(side, side, channels, -1).transpose(2, 0, 1, 3).reshape(hidden.shape)
    add("Gemm", [x, weight("hidden.kernel", hidden), weight("hidden.bias", params["hidden/bias"])])
    add("Relu", [x])
    add(
        "Gemm",
        [
            x,
            weight("logits.kernel", params["logits/kernel"]),
            weight("logits.bias", params["logits/bias"]),
        ],
    )
    if model.temperature is not None:
        add("Div", [x, weight("temperature", np.array(model.temperature, np.float32))])
    nodes.append(helper.make_node("Softmax", [x], [OUTPUT_NAME], axis=-1))
    num_classes = params["logits/bias"].shape[0]
    graph = helper.make_graph(
        nodes,
        "digitjax_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 28, 28])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", num_classes])],
        initializers,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=ONNX_IR_VERSION,
        producer_name="digitjax",
        producer_version=__version__,
        doc_string=f"Input: {PREPROCESSING}. Output: (N, {num_classes}) class probabilities.",
    )
    helper.set_model_props(onnx_model, {METADATA_KEY: json.dumps(metadata)})
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model.SerializeToString()


class ExportedModel:
    """An exported file as a `Classifier`: run with onnxruntime (no JAX imported) or with
    jax.export. The format is told by the content (a zip archive is StableHLO), not the name."""

    def __init__(self, path: Path):
        self.source = path
        data = _read_limited(path)
        self.format = "stablehlo" if data.startswith(b"PK\x03\x04") else "onnx"
        if self.format == "onnx":
            self.metadata, self._run = _load_onnx(path, data)
        else:
            self.metadata, self._run = _load_stablehlo(path, data)
        self.info = ModelInfo(
            name=path.name,
            kind=self.format,
            step=self.metadata.get("step"),
            test_accuracy=self.metadata.get("test_accuracy"),
            temperature=self.metadata.get("temperature"),
            dataset=str(self.metadata.get("dataset")),
            num_classes=self.metadata.get("num_classes", 0),
        )

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return in_batches(self._run, images)


def _read_limited(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UserError(f"{path} is too large for a digitjax export")
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _not_an_export(path: Path, fmt: str, reason: str) -> UserError:
    return UserError(f"{path} is not a digitjax {fmt} export: {reason[:200]}")


def _load_onnx(path: Path, data: bytes) -> tuple[dict, Any]:
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
    return metadata, lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def _load_stablehlo(path: Path, data: bytes) -> tuple[dict, Any]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: info for info in archive.infolist()}
            if EXPORTED_MEMBER not in members or METADATA_MEMBER not in members:
                raise _not_an_export(path, "StableHLO", f"no {EXPORTED_MEMBER} in the archive")
            if sum(members[m].file_size for m in (EXPORTED_MEMBER, METADATA_MEMBER)) > (
                MAX_FILE_BYTES
            ):  # a zip bomb
                raise _not_an_export(path, "StableHLO", "its contents are too large")
            raw_metadata = archive.read(METADATA_MEMBER).decode("utf-8", "replace")
            serialized = archive.read(EXPORTED_MEMBER)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
        raise _not_an_export(path, "StableHLO", reason(e)) from None
    metadata = _parse_metadata(path, "StableHLO", raw_metadata)
    import jax

    try:
        exported = jax.export.deserialize(bytearray(serialized))
    except Exception as e:  # flatbuffers raises anything on damaged bytes
        raise _not_an_export(path, "StableHLO", reason(e)) from None
    forward = jax.jit(exported.call)
    return metadata, lambda images: np.asarray(forward(images))


def _parse_metadata(path: Path, fmt: str, raw: str | None) -> dict:
    if raw is None:
        raise _not_an_export(path, fmt, "it carries no digitjax metadata")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _not_an_export(path, fmt, f"unreadable metadata ({e})") from None
    if not isinstance(metadata, dict):
        raise _not_an_export(path, fmt, "unreadable metadata")
    return metadata

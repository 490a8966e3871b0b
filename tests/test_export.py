"""`digitjax export`: the exported files, run by docs/export.md's loaders in processes without
digitjax or flax, agree with `digitjax evaluate` on every MNIST test image."""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import (
    MNIST_DIR,
    assert_one_line_error,
    assert_same_outputs,
    python_block,
    run_digitjax,
    write_mnist_subset,
)
from typer.testing import CliRunner

from digitjax.checkpoint import restore_model
from digitjax.cli import app
from digitjax.data import read_idx_split
from digitjax.evaluate import calibrated_softmax, make_logits_fn, pad_to_batches, split_logits
from digitjax.inference.classifier import BUNDLED_MODEL, CheckpointClassifier
from digitjax.inference.export import CHECKSUM_KEY, FORMATS, signed

runner = CliRunner()
MODELS = ("default", "best", "uncalibrated", "bundled")
# The README's loader code, as a user copies it.
README_SNIPPETS = {
    "stablehlo": ("jax.export.deserialize", "model.stablehlo"),
    "onnx": ("onnxruntime.InferenceSession", "model.onnx"),
}
README_IMAGES = "np.zeros((3, 28, 28), np.float32)"
# Imports the loaders must not need: a meta-path finder that refuses them.
BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, Blocker())
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short training of the default, of the --preset best architecture and of a run
    without a temperature, and the bundled model."""
    folder = tmp_path_factory.mktemp("export-runs")
    data = write_mnist_subset(folder / "mnist", 512, 100)
    runs = {"bundled": BUNDLED_MODEL}
    calibrated = ["--calibration-fraction", "0.2"]  # the 100 images a temperature needs at least
    trained = {
        "default": calibrated,
        "best": ["--preset", "best", *calibrated],
        "uncalibrated": ["--calibration-fraction", "0"],  # no temperature, as older runs
    }
    for name, flags in trained.items():
        runs[name] = folder / name
        result = runner.invoke(
            app,
            ["train", "--data-dir", str(data), "--epochs", "1", *flags, "--out", str(runs[name])],
        )
        assert result.exit_code == 0, result.output
    return runs


@pytest.fixture(scope="module")
def exports(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("exports")
    files = {}
    for name in MODELS:
        for fmt in FORMATS:
            path = folder / f"{name}.{fmt}"
            result = runner.invoke(
                app,
                ["export", str(checkpoints[name]), "--format", fmt, "--out", str(path), "--json"],
            )
            assert result.exit_code == 0, result.output
            written = json.loads(result.stdout)
            assert written["path"] == str(path) and written["format"] == fmt
            assert written["bytes"] == path.stat().st_size
            files[name, fmt] = path, written["metadata"]
    return files


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    return read_idx_split(MNIST_DIR, "test")


@pytest.fixture(scope="module")
def evaluate_probabilities(checkpoints: dict[str, Path], mnist_test) -> dict[str, np.ndarray]:
    """The calibrated softmax of the logits `digitjax evaluate` computes (with the
    checkpoint's temperature), on the full MNIST test set."""
    calibrated = {}
    for name in MODELS:
        model = restore_model(checkpoints[name])
        assert (model.temperature is None) == (name == "uncalibrated")
        logits_fn = make_logits_fn(model.graphdef)
        images = mnist_test[0]
        logits = split_logits(logits_fn, model.params, pad_to_batches(images), len(images))
        calibrated[name] = calibrated_softmax(logits, model.temperature)
    return calibrated


def readme_snippet(fmt: str) -> str:
    marker, _ = README_SNIPPETS[fmt]
    return python_block("docs/export.md", marker)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_readme_loader_without_digitjax_matches_evaluate(
    fmt: str, exports, evaluate_probabilities, mnist_test, tmp_path: Path
):
    """The README's loader, with the full test set for its example images, in a process where
    digitjax, flax and orbax (and for ONNX, jax) cannot be imported."""
    snippet, (_, file_name) = readme_snippet(fmt), README_SNIPPETS[fmt]
    assert file_name in snippet and README_IMAGES in snippet
    np.save(tmp_path / "images.npy", mnist_test[0].astype(np.float32) / 255)
    blocked = {"digitjax", "flax", "orbax", "optax"} | (
        {"jax", "jaxlib"} if fmt == "onnx" else set()
    )
    script = BLOCKER.format(blocked=sorted(blocked))
    for name in MODELS:
        loader = snippet.replace(file_name, str(exports[name, fmt][0]))
        loader = loader.replace(README_IMAGES, f"np.load({str(tmp_path / 'images.npy')!r})")
        script += f"{loader}\nnp.save({str(tmp_path / name)!r}, np.asarray(probabilities))\n"
    script += "assert not {'digitjax', 'flax'} & set(sys.modules)\n"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for name in MODELS:
        probabilities, expected = np.load(tmp_path / f"{name}.npy"), evaluate_probabilities[name]
        assert probabilities.shape == (10_000, 10) and probabilities.dtype == np.float32
        assert (probabilities.argmax(axis=1) == expected.argmax(axis=1)).all(), name
        np.testing.assert_allclose(probabilities, expected, atol=1e-5, rtol=0, err_msg=name)
    accuracy = (np.load(tmp_path / "bundled.npy").argmax(axis=1) == mnist_test[1]).mean()
    assert accuracy == exports["bundled", fmt][1]["test_accuracy"]  # what evaluate reports


def test_exports_give_the_checkpoints_outputs_non_digit_scores_included(
    exports, checkpoints, mnist_test
):
    """Each format's file, run as `predict --model` runs it, against the checkpoint's forward
    pass: probabilities and, for the bundled model, its non-digit detector's scores, on
    digits and on generated non-digits; a model without a detector exports none."""
    from digitjax.inference.export import ExportedModel
    from digitjax.synthetic import non_digits

    others = non_digits.training_set(300)[:100]
    images = np.concatenate([mnist_test[0][:400], others]).astype(np.float32) / 255
    for name in ("bundled", "default"):
        want = CheckpointClassifier(checkpoints[name]).outputs(images)
        assert np.isnan(want[:, 10]).all() == (name != "bundled")
        for fmt in FORMATS:
            exported = ExportedModel(exports[name, fmt][0])
            assert exported.info.detects_non_digits == (name == "bundled")
            assert_same_outputs(exported.outputs(images), want)
    scores = CheckpointClassifier(BUNDLED_MODEL).outputs(images)[:, 10]
    assert (scores[:400] > 0).mean() <= 0.02 and (scores[400:] > 0).mean() > 0.8


def test_metadata_travels_with_both_formats(exports, checkpoints):
    for name in MODELS:
        model = restore_model(checkpoints[name])
        stablehlo, onnx_file = exports[name, "stablehlo"][0], exports[name, "onnx"][0]
        with zipfile.ZipFile(stablehlo) as archive:
            metadata = json.loads(archive.read("metadata.json"))
        props = {p.key: p.value for p in onnx.load(onnx_file).metadata_props}
        assert json.loads(props["digitjax"]) == metadata == exports[name, "onnx"][1]
        assert metadata["config"] == json.loads(json.dumps(model.config.to_dict()))
        assert metadata["dataset"] == "mnist" and metadata["num_classes"] == 10
        assert metadata["test_accuracy"] == model.summary["best"]["test_accuracy"]
        assert metadata["temperature"] == model.temperature
        assert metadata["digitjax_version"] and "preprocess" in metadata["preprocessing"]
    best = exports["best", "onnx"][1]["config"]
    assert best["channels"] == [32, 64, 128] and best["dense"] == 256
    onnx_model = onnx.load(exports["best", "onnx"][0])
    assert onnx_model.opset_import[0].version >= 17
    batch = onnx_model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a dynamic batch dimension


def predict_digits(*args: str, **kwargs) -> list[int]:
    result = subprocess.run(
        [sys.executable, *args, "--json"], capture_output=True, text=True, timeout=300, **kwargs
    )
    assert result.returncode == 0, result.stderr
    return [r["digit"] for r in json.loads(result.stdout)], result.stderr


def test_predict_with_exported_models(exports, user_image_files, tmp_path: Path):
    """Same digits as with the checkpoint; the ONNX model without importing JAX."""
    files = [str(p) for p in user_image_files]
    cli = ["-m", "digitjax.cli", "predict", *files]
    with_checkpoint, _ = predict_digits(*cli, "--checkpoint", str(BUNDLED_MODEL))
    with_onnx, imports = predict_digits(
        "-X", "importtime", *cli, "--model", str(exports["bundled", "onnx"][0])
    )
    imported = {line.split("|")[-1].strip() for line in imports.splitlines() if "|" in line}
    assert "onnxruntime" in imported
    assert not {name for name in imported if name.split(".")[0] in ("jax", "jaxlib", "flax")}
    with_stablehlo, _ = predict_digits(*cli, "--model", str(exports["bundled", "stablehlo"][0]))
    assert with_onnx == with_stablehlo == with_checkpoint
    assert None not in with_checkpoint


def test_export_defaults_to_the_bundled_model_and_never_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    result = runner.invoke(app, ["export", "--out", "model.onnx"])  # the format from the suffix
    assert result.exit_code == 0, result.output
    [bundled_step] = (BUNDLED_MODEL / "best").iterdir()
    assert f"model/best/{bundled_step.name} → model.onnx (onnx" in result.stdout
    exported = (tmp_path / "model.onnx").read_bytes()
    result = runner.invoke(app, ["export", "--out", "model.onnx", "--format", "onnx"])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "--out model.onnx: exists", "--overwrite")
    assert (tmp_path / "model.onnx").read_bytes() == exported
    (tmp_path / "model.onnx").write_bytes(b"an older file")
    result = runner.invoke(app, ["export", "--out", "model.onnx", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.onnx").read_bytes() == exported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no partial files


def test_export_errors(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "empty").mkdir()
    no_config = shutil.copytree(checkpoints["default"], tmp_path / "no-config")
    shutil.rmtree(next((no_config / "best").iterdir()) / "config")
    cases = [
        (["--format", "tflite", "--out", "m.tflite"], "unknown format 'tflite'"),
        (["--out", "m.bin"], "give --format"),
        (["--out", "a_file/m.onnx"], "--out a_file/m.onnx: a_file is a file, not a folder"),
        (["--format", "onnx", "--out", "."], "is a folder"),
        (["--format", "onnx", "--out", "m.stablehlo"], "--format onnx contradicts --out"),
        (["--format", "ONNX", "--out", "m.stablehlo"], "--format onnx contradicts --out"),
        (["--format", "stablehlo", "--out", "m.ONNX"], "name the file .stablehlo"),
        ([str(tmp_path / "empty"), "--out", "m.onnx"], "no digitjax checkpoint"),
        ([str(no_config), "--out", "m.onnx"], "is not a digitjax checkpoint"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["export", *args])
        assert result.exit_code == 1, (args, result.output)
        assert_one_line_error(result.stderr, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty", "no-config"]


def test_corrupt_or_foreign_exported_files(exports, user_image_files, tmp_path: Path):
    onnx_file, stablehlo_file = exports["bundled", "onnx"][0], exports["bundled", "stablehlo"][0]
    foreign_onnx = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "identity",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    with zipfile.ZipFile(tmp_path / "foreign.stablehlo", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with zipfile.ZipFile(tmp_path / "damaged.stablehlo", "w") as archive:
        archive.writestr("metadata.json", zipfile.ZipFile(stablehlo_file).read("metadata.json"))
        archive.writestr("model.jax_exported", b"\x00" * 1000)
    older = onnx.load_model_from_string(onnx_file.read_bytes())  # as exports were before
    kept = [prop for prop in older.metadata_props if prop.key != "digitjax_sha256"]
    del older.metadata_props[:]
    older.metadata_props.extend(kept)
    flipped = bytearray(onnx_file.read_bytes())
    flipped[len(flipped) // 2] ^= 0x40  # a bit of a weight
    files = {
        "flipped.onnx": bytes(flipped),
        "truncated.onnx": onnx_file.read_bytes()[:5000],
        "truncated.stablehlo": stablehlo_file.read_bytes()[:5000],
        "foreign.onnx": foreign_onnx.SerializeToString(),
        "older.onnx": older.SerializeToString(),
        "noise.bin": bytes(range(256)) * 10,
        "noise.stablehlo": bytes(range(256)) * 10,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name, message in [
        ("truncated.onnx", "not a digitjax ONNX export: it carries no digitjax metadata"),
        ("truncated.stablehlo", "not a digitjax StableHLO export: not a whole zip archive"),
        ("flipped.onnx", "is damaged: its contents do not match its checksum"),
        ("foreign.onnx", "it carries no digitjax metadata (another file, or an export cut"),
        ("older.onnx", "carries no checksum (older digitjax exports did not: export it again)"),
        ("foreign.stablehlo", "no model.jax_exported"),
        ("damaged.stablehlo", "is not a digitjax StableHLO export"),
        ("noise.bin", "is not a digitjax ONNX export: it carries no digitjax metadata"),
        ("noise.stablehlo", "is not a digitjax StableHLO export: not a zip archive"),
        ("missing.onnx", "cannot read"),
    ]:
        result = runner.invoke(
            app, ["predict", str(user_image_files[0]), "--model", str(tmp_path / name)]
        )
        assert result.exit_code == 1, (name, result.output)
        assert_one_line_error(result.stderr, name, message)


def forged_onnx(
    path: Path,
    input_name: str = "images",
    batch: str | int = "N",
    columns: int = 10,
    metadata: dict | None = None,
    **kw: bool,
) -> Path:
    """An ONNX file carrying digitjax's metadata and checksum without being an export: a dense
    layer, with a softmax unless `softmax=False`."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).normal(scale=10, size=(28 * 28, columns)).astype(np.float32)
    last = "logits" if kw.get("softmax", True) else "probabilities"
    nodes = [
        helper.make_node("Flatten", [input_name], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "weight"], [last]),
    ]
    if last == "logits":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "forged",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, columns])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    metadata = metadata or {"dataset": "mnist", "num_classes": 10}
    helper.set_model_props(model, {"digitjax": json.dumps(metadata), CHECKSUM_KEY: "0" * 64})
    path.write_bytes(signed(model.SerializeToString()))
    return path


def forged_stablehlo(path: Path, shape: str, columns: int, metadata: dict | None = None) -> Path:
    """A StableHLO archive with digitjax's metadata around another function."""
    import jax

    def dense(images: jax.Array) -> jax.Array:
        return jax.nn.softmax(images.reshape(images.shape[0], -1)[:, :columns])

    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(shape), np.float32)
    exported = jax.export.export(jax.jit(dense))(spec)
    with zipfile.ZipFile(path, "w") as archive:
        metadata = metadata or {"dataset": "mnist", "num_classes": 10}
        archive.writestr("metadata.json", json.dumps(metadata))
        archive.writestr("model.jax_exported", bytes(exported.serialize()))
    return path


def test_files_that_only_carry_the_metadata_are_refused(user_image_files, tmp_path: Path):
    """Each check of the contract in one line: input and output names, dtypes and shapes
    (a free batch dimension), and probabilities out of every run."""
    cases = [
        (forged_onnx(tmp_path / "x.onnx", input_name="x"), "it takes x float32 (N, 28, 28)"),
        (forged_onnx(tmp_path / "one.onnx", batch=1), "takes images float32 (1, 28, 28), not"),
        (
            forged_onnx(tmp_path / "three.onnx", columns=3, softmax=False),
            "it returns probabilities float32 (N, 3), not probabilities float32 (N, 10)",
        ),
        (forged_onnx(tmp_path / "raw.onnx", softmax=False), "returned values that are not"),
        (forged_stablehlo(tmp_path / "one.stablehlo", "1, 28, 28", 10), "(1, 28, 28), not"),
        (forged_stablehlo(tmp_path / "three.stablehlo", "N, 28, 28", 3), "returns float32 (N, 3)"),
    ]
    for path, message in cases:
        result = runner.invoke(app, ["predict", str(user_image_files[0]), "--model", str(path)])
        assert result.exit_code == 1, (path.name, result.output)
        assert_one_line_error(result.stderr, path.name, message)
        assert result.stdout == ""  # no confidence of 31.33 printed before the error


def test_serve_stops_when_the_model_fails_on_its_first_images(tmp_path: Path):
    """A file that loads but does not return probabilities: `serve` used to stay up, never
    ready, answering 503 for ever; it stops with the reason, as `predict` does."""
    path = forged_onnx(tmp_path / "raw.onnx", softmax=False)
    result = subprocess.run(
        ["digitjax", "serve", "--port", "0", "--workers", "1", "--model", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert_one_line_error(result.stderr, "raw.onnx returned values that are not probabilities")


def test_a_zip_bomb_is_refused_from_its_directory(user_image_files, tmp_path: Path):
    """A .stablehlo archive whose member unpacks to 256 MiB of zeros from 256 kB: refused
    before anything is decompressed."""
    bomb = tmp_path / "bomb.stablehlo"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("metadata.json", json.dumps({"dataset": "mnist", "num_classes": 10}))
        with archive.open("model.jax_exported", "w") as member:
            for _ in range(256):
                member.write(bytes(2**20))
    assert bomb.stat().st_size < 2**20
    started = time.monotonic()
    result = runner.invoke(app, ["predict", str(user_image_files[0]), "--model", str(bomb)])
    assert result.exit_code == 1
    assert_one_line_error(
        result.stderr, "bomb.stablehlo", "model.jax_exported unpacks to 268,435,456 bytes from"
    )
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("kind", ["/dev/zero", "/dev/urandom", "a named pipe"])
def test_a_model_that_is_no_regular_file_is_refused_unread(
    user_image_files, tmp_path: Path, kind: str
):
    """A device has no end: read, it would take all the memory (bounded here to 2 GiB); a
    named pipe blocks whoever opens it until something writes to it. Both are refused."""
    model = tmp_path / "z.onnx"
    if kind.startswith("/dev/"):
        model.symlink_to(kind)
    else:
        os.mkfifo(model)
    bounded = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2**31, 2**31)); "
        "from digitjax.launch import main; main()"
    )
    for command in ("predict", "serve") if kind == "a named pipe" else ("predict",):
        args = [str(user_image_files[0]), "--model", "z.onnx"] if command == "predict" else [
            "--model", "z.onnx", "--port", "0"]  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", bounded, command, *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 1, (command, result.stderr)
        assert_one_line_error(result.stderr, "z.onnx is not a regular file")


def test_exports_with_forged_metadata_are_refused(user_image_files, tmp_path: Path):
    """Metadata values a forged or damaged file may hold, each refused on loading, in one
    line naming the field, by `predict` and by `serve` (whose answers show them)."""
    base = {"dataset": "mnist", "num_classes": 10}
    cases = [
        ({"step": "x"}, "its metadata's step is 'x'"),
        ({"test_accuracy": "abc"}, "its metadata's test_accuracy is 'abc'"),
        ({"temperature": -0.4}, "its metadata's temperature is -0.4"),
        ({"num_classes": "10"}, "its metadata's num_classes is '10'"),
        ({"dataset": None}, "its metadata's dataset is None"),
    ]
    for n, (fields, message) in enumerate(cases):
        for path in (
            forged_onnx(tmp_path / f"m{n}.onnx", metadata={**base, **fields}),
            forged_stablehlo(tmp_path / f"m{n}.stablehlo", "N, 28, 28", 10, {**base, **fields}),
        ):
            result = runner.invoke(app, ["predict", str(user_image_files[0]), "--model", str(path)])
            assert result.exit_code == 1, (path.name, result.output)
            assert_one_line_error(result.stderr, path.name, message)
            if n == 0:  # the server used to start, then fail on its first answer's schema
                served = run_digitjax("serve", "--port", "0", "--model", str(path))
                assert served.returncode == 1, served.stderr
                assert_one_line_error(served.stderr, path.name, message)


def test_the_format_is_told_by_the_content_not_the_name(exports, user_image_files, tmp_path: Path):
    files = [str(p) for p in user_image_files]
    digits = {}
    for fmt, other in (("onnx", "stablehlo"), ("stablehlo", "onnx")):
        misnamed = Path(shutil.copy(exports["bundled", fmt][0], tmp_path / f"model.{other}"))
        result = runner.invoke(app, ["predict", *files, "--model", str(misnamed), "--json"])
        assert result.exit_code == 0, result.output
        digits[fmt] = [r["digit"] for r in json.loads(result.stdout)]
    assert digits["onnx"] == digits["stablehlo"]

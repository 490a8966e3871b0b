import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, python_block, run_digitjax, write_mnist_subset
from PIL import Image
from typer.testing import CliRunner

from digitjax.cli import app
from digitjax.inference.classifier import BUNDLED_MODEL

runner = CliRunner()


@pytest.fixture
def trained_run(tiny_run: Path) -> Path:
    return tiny_run


def step_dir(run_dir: Path, kind: str = "best") -> Path:
    return next((run_dir / kind).iterdir())


def test_the_documented_plain_orbax_snippet_restores_a_checkpoint_quietly(trained_run: Path):
    """As a user runs it: in a process of its own, where digitjax cannot quiet Orbax's
    warnings (it could not import digitjax if it tried)."""
    snippet = python_block("docs/checkpoints.md", "ocp.CheckpointManager").replace(
        "/abs/path/checkpoints/mnist-20261124-120000/best", str((trained_run / "best").absolute())
    )
    check = """
import sys
assert "digitjax" not in sys.modules
params = restored["state"]["params"]
assert restored["config"]["channels"] == [4, 8]
assert restored["summary"]["best"]["test_accuracy"] > 0.5
assert params["convs"]["0"]["kernel"].shape == (3, 3, 1, 4)
assert int(restored["state"]["step"]) == manager.latest_step()
"""
    result = subprocess.run(
        [sys.executable, "-c", snippet + check], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no "WARNING:absl:Item ... could not be restored"


def test_paths_with_control_characters_are_shown_harmless(trained_run: Path, tmp_path: Path):
    """A run folder named with a terminal escape (ESC c resets the terminal), a line break and
    markup: evaluate and export wrote it raw, the line cut in two."""
    odd = shutil.copytree(trained_run, tmp_path / "r\x1bc\n[bold]x")
    evaluated = runner.invoke(app, ["evaluate", str(odd)])
    exported = runner.invoke(app, ["export", str(odd), "--out", f"{odd}.stablehlo"])
    for result in (evaluated, exported):
        assert result.exit_code == 0, result.output
        output = result.stdout + result.stderr
        # Joined: a long temporary path wraps the line where the terminal's width ends.
        assert "\x1b" not in output and "r?c?[bold]x" in output.replace("\n", ""), output


def test_evaluate_json_matches_training_figures(trained_run: Path):
    result = runner.invoke(app, ["evaluate", str(trained_run), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    history = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    best = max(history, key=lambda r: r["test_accuracy"])
    assert report["accuracy"] == pytest.approx(best["test_accuracy"])
    assert report["loss"] == pytest.approx(best["test_loss"], rel=1e-5)
    assert report["num_examples"] == 1000
    confusion = np.array(report["confusion_matrix"])
    assert confusion.sum() == 1000 and np.trace(confusion) == round(1000 * report["accuracy"])
    assert report["non_digit_flagged"] is None  # trained without --non-digit-detector
    recall_of_7 = report["per_class"]["7"]["recall"]
    assert recall_of_7 == pytest.approx(confusion[7, 7] / confusion[7].sum())


def test_evaluate_table_and_plot(trained_run: Path, tmp_path: Path):
    plot = tmp_path / "report.png"
    result = runner.invoke(
        app, ["evaluate", str(trained_run), "--plot", str(plot), "--split", "train"]
    )
    assert result.exit_code == 0, result.output
    assert "Confusion matrix" in result.stdout and "precision" in result.stdout
    assert "on mnist train" in result.stdout
    with Image.open(plot) as image:
        assert image.size[0] > 1000


def test_evaluate_on_another_dataset(trained_run: Path):
    result = runner.invoke(
        app, ["evaluate", str(trained_run), "--dataset", "fashion_mnist", "--json"]
    )
    if result.exit_code == 1 and "no data reachable" in result.stderr:
        pytest.skip("fashion-mnist is not installed here")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] < 0.5  # digits model, clothes images


def test_evaluate_defaults_to_the_newest_run(trained_run: Path, tmp_path: Path):
    shutil.copytree(trained_run, tmp_path / "checkpoints" / "run")
    result = run_digitjax("evaluate", "--json", cwd=tmp_path)  # the installed console script
    assert result.returncode == 0, result.stderr
    assert "checkpoints/run/best" in json.loads(result.stdout)["checkpoint"]


def test_missing_checkpoint(tmp_path: Path):
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "no checkpoint at")
    result = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert_one_line_error(result.stderr, "no digitjax checkpoint in")


def test_corrupt_checkpoint(trained_run: Path, tmp_path: Path):
    copy = shutil.copytree(trained_run, tmp_path / "run")
    for file in (step_dir(copy) / "state").rglob("*"):
        if file.is_file() and file.stat().st_size > 1000:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])
    result = runner.invoke(app, ["evaluate", str(copy)])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "corrupt checkpoint")


def test_checkpoint_that_does_not_match_its_config(trained_run: Path, tmp_path: Path):
    copy = shutil.copytree(trained_run, tmp_path / "run")
    config_file = step_dir(copy) / "config" / "metadata"
    config = json.loads(config_file.read_text())
    config["channels"] = [4, 16]
    config_file.write_text(json.dumps(config))
    result = runner.invoke(app, ["evaluate", str(copy)])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "does not match its config's model")


def test_not_a_digitjax_checkpoint(trained_run: Path, tmp_path: Path):
    copy = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(step_dir(copy) / "config")
    result = runner.invoke(app, ["evaluate", str(copy)])
    assert_one_line_error(result.stderr, "is not a digitjax checkpoint")


def test_evaluate_on_a_folder_names_the_folder(trained_run: Path, tmp_path: Path):
    """Images from --data-dir are reported as that folder's, not as the run's dataset nor
    as a --dataset named beside it (which is refused: the folder's images are its own)."""
    folder = write_mnist_subset(tmp_path / "other", 64, 300)
    result = runner.invoke(app, ["evaluate", str(trained_run), "--data-dir", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["dataset"], report["num_examples"]) == (str(folder), 300)
    both = ["evaluate", str(trained_run), "--data-dir", str(folder), "--dataset", "fashion_mnist"]
    result = runner.invoke(app, both)
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "pass --dataset or --data-dir, not both")


def test_evaluate_reports_what_the_non_digit_detector_flags():
    """The bundled model's detector: few MNIST test digits, nearly every Fashion-MNIST
    photo; in the JSON and on the terminal."""
    result = runner.invoke(app, ["evaluate", str(BUNDLED_MODEL), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["accuracy"] == 0.9968 and 0 < report["non_digit_flagged"] <= 0.01
    result = runner.invoke(app, ["evaluate", str(BUNDLED_MODEL), "--dataset", "fashion_mnist"])
    if result.exit_code == 1 and "no data reachable" in result.stderr:
        pytest.skip("fashion-mnist is not installed here")
    assert result.exit_code == 0, result.output
    flagged = re.search(r"non-digit detector: flags ([\d.]+)% of these images", result.stdout)
    assert flagged is not None and float(flagged[1]) > 95

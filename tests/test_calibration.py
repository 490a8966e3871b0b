"""Calibrated confidence: the temperature fitted on held-out training images, the expected
calibration error, and `predict --min-confidence`."""

import collections
import csv
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error
from PIL import Image
from typer.testing import CliRunner

from digitjax import checkpoint
from digitjax.cli import app
from digitjax.config import Config, Interrupted
from digitjax.data import load_dataset
from digitjax.evaluate import (
    calibrated_softmax,
    expected_calibration_error,
    fit_temperature,
    make_logits_fn,
    pad_to_batches,
    reliability,
    split_logits,
)
from digitjax.inference.classifier import (
    DEFAULT_MIN_CONFIDENCE,
    NUM_DIGITS,
    CheckpointClassifier,
)
from digitjax.synthetic.non_digits import KINDS as NON_DIGIT_KINDS
from digitjax.synthetic.non_digits import generate as generate_non_digits
from digitjax.train import Callbacks, train

runner = CliRunner()


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (20_000, 10))
    for true_temperature in (0.5, 1.0, 2.5):
        probs = calibrated_softmax(logits, true_temperature)
        labels = (probs.cumsum(axis=1) < rng.random((len(probs), 1))).sum(axis=1)
        fitted = fit_temperature(logits, labels)
        assert fitted == pytest.approx(true_temperature, rel=0.03)
        assert fit_temperature(logits, labels) == fitted  # deterministic
        # Calibrated, the labels' own distribution has almost no calibration error.
        assert expected_calibration_error(calibrated_softmax(logits, fitted), labels) < 0.01


def test_fit_temperature_stays_in_its_bracket_when_every_answer_is_right():
    logits = np.eye(10)[np.arange(100) % 10] * 5
    assert fit_temperature(logits, np.arange(100) % 10) == pytest.approx(1 / 20, rel=1e-6)


def test_expected_calibration_error_on_a_hand_worked_example():
    # Top probabilities 0.95, 0.95, 0.5, 0.5 (two bins: (14/15, 1] and (7/15, 8/15]).
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.5, 0.5], [0.5, 0.5]])
    labels = np.array([0, 1, 0, 0])  # right, wrong, right, right (argmax of a tie: class 0)
    # Bin of 0.95: accuracy 1/2, confidence 0.95; bin of 0.5: accuracy 1, confidence 0.5.
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.5)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, rel=1e-12)
    diagram = reliability(probs, labels)
    assert diagram.counts.sum() == 4 and diagram.counts[14] == 2 and diagram.counts[7] == 2
    assert diagram.accuracy[14] == 0.5 and diagram.confidence[7] == 0.5


def held_out(config: Config) -> tuple[np.ndarray, np.ndarray]:
    _, images, labels = load_dataset(config.dataset, config.data_dir).hold_out(
        config.calibration_fraction
    )
    return images, labels


def fitted_here(model: checkpoint.TrainedModel) -> float:
    """The checkpoint's weights calibrated again, outside training."""
    images, labels = held_out(model.config)
    logits_fn = make_logits_fn(model.graphdef)
    logits = split_logits(logits_fn, model.params, pad_to_batches(images), len(labels))
    return fit_temperature(logits, labels)


def test_a_run_saves_the_temperature_of_its_weights_and_evaluate_uses_it(tiny_run, tmp_path):
    history = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    model = checkpoint.restore_model(tiny_run)
    best = max(history, key=lambda r: r["test_accuracy"])
    assert model.temperature == best["temperature"] == model.summary["temperature"]
    assert model.temperature == pytest.approx(fitted_here(model), rel=1e-5)
    assert len(held_out(model.config)[1]) == round(2048 * 0.05)

    result = runner.invoke(app, ["evaluate", str(tiny_run), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["temperature"] == model.temperature
    assert report["ece"] == pytest.approx(best["test_ece"], rel=1e-5)
    assert report["loss"] == pytest.approx(best["test_loss"], rel=1e-5)
    assert report["loss"] < report["uncalibrated_loss"]  # fitted on other images, still better
    assert 0 <= report["ece"] < 0.1 and report["uncalibrated_ece"] > report["ece"]
    bins = report["reliability"]
    assert len(bins["counts"]) == 15 and sum(bins["counts"]) == report["num_examples"]

    plot = tmp_path / "report.png"
    result = runner.invoke(app, ["evaluate", str(tiny_run), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert f"ECE {100 * report['ece']:.2f}%" in result.stdout
    assert f"temperature {model.temperature:.4f}" in result.stdout
    with Image.open(plot) as image:
        assert image.size[0] > 2000  # confusion matrix, reliability diagram, misclassified


def test_predictor_probabilities_are_the_calibrated_softmax(tiny_run):
    model = checkpoint.restore_model(tiny_run)
    images, _ = held_out(model.config)
    logits = split_logits(
        make_logits_fn(model.graphdef), model.params, pad_to_batches(images), len(images)
    )
    got = CheckpointClassifier(tiny_run).outputs(images.astype(np.float32) / 255)[:, :NUM_DIGITS]
    np.testing.assert_allclose(got, calibrated_softmax(logits, model.temperature), atol=1e-5)
    assert (got.argmax(axis=1) == logits.argmax(axis=1)).all()


def test_raw_weights_of_an_averaging_run_have_no_temperature(tiny_run):
    assert checkpoint.restore_model(tiny_run, average=False).temperature is None


# Config fields added with calibration (2026-11-29): checkpoints written before lack them.
CALIBRATION_ERA_FIELDS = (
    "calibration_fraction",
    "augment_elastic",
    "augment_thickness",
    "augment_blur",
    "augment_low_res",
)


@pytest.fixture(scope="module")
def old_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_run` as digitjax wrote its checkpoints before calibration: no temperature in the
    summaries, none of the fields added since in the config."""
    copy = shutil.copytree(tiny_run, tmp_path_factory.mktemp("old") / "run")
    for step_dir in copy.glob("*/[0-9]*"):
        config_file = step_dir / "config" / "metadata"
        config = json.loads(config_file.read_text())
        for name in CALIBRATION_ERA_FIELDS:
            del config[name]
        config_file.write_text(json.dumps(config))
        summary_file = step_dir / "summary" / "metadata"
        summary = json.loads(summary_file.read_text())
        del summary["temperature"]
        summary_file.write_text(json.dumps(summary))
    return copy


def test_a_checkpoint_without_a_temperature_evaluates_and_predicts_as_before(
    old_run, tiny_run, tmp_path, monkeypatch
):
    """The plain softmax: the loss and calibration error are those of the uncalibrated
    model, and the predictor's probabilities are its softmax."""
    monkeypatch.chdir(tmp_path)
    reports = {}
    for name, run in (("old", old_run), ("calibrated", tiny_run)):
        result = runner.invoke(app, ["evaluate", str(run), "--json"])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads(result.stdout)
    old, calibrated = reports["old"], reports["calibrated"]
    assert old["temperature"] is None and calibrated["temperature"] is not None
    assert old["accuracy"] == calibrated["accuracy"]
    assert old["loss"] == old["uncalibrated_loss"] == calibrated["uncalibrated_loss"]
    assert old["ece"] == old["uncalibrated_ece"] == calibrated["uncalibrated_ece"]
    model = checkpoint.restore_model(old_run)
    images, _ = held_out(checkpoint.restore_model(tiny_run).config)
    logits = split_logits(
        make_logits_fn(model.graphdef), model.params, pad_to_batches(images), len(images)
    )
    got = CheckpointClassifier(old_run).outputs(images.astype(np.float32) / 255)[:, :NUM_DIGITS]
    np.testing.assert_allclose(got, calibrated_softmax(logits), atol=1e-5)


def test_a_mid_epoch_checkpoint_holds_the_temperature_of_its_weights(tiny_mnist, tmp_path):
    """Ctrl-C saves weights that no epoch record describes: they are calibrated anew."""
    run_dir = tmp_path / "run"

    def interrupt(step: int) -> None:
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    config = Config.from_flags({"data_dir": tiny_mnist, "channels": (4, 8), "dense": 16})
    with pytest.raises(Interrupted):
        train(config, run_dir, callbacks=Callbacks(on_chunk=interrupt))
    model = checkpoint.restore_model(run_dir, checkpoint.LATEST)
    assert model.step_dir.name == "6" and model.summary["history"] == []
    assert model.temperature == pytest.approx(fitted_here(model), rel=1e-5)


def test_no_held_out_images_means_no_temperature(tiny_mnist, tmp_path):
    config = Config.from_flags(
        {"data_dir": tiny_mnist, "channels": (4, 8), "dense": 16, "epochs": 1}
    )
    config = Config.from_dict({**config.to_dict(), "calibration_fraction": 0.0})
    summary = train(config, tmp_path / "run")
    assert summary["temperature"] is None and summary["history"][0]["temperature"] is None
    assert checkpoint.restore_model(tmp_path / "run").temperature is None


def test_an_invalid_temperature_in_a_summary_is_one_line(tiny_run, tmp_path):
    copy = shutil.copytree(tiny_run, tmp_path / "run")
    summary_file = next((copy / "best").iterdir()) / "summary" / "metadata"
    summary = json.loads(summary_file.read_text())
    summary["temperature"] = -1
    summary_file.write_text(json.dumps(summary))
    result = runner.invoke(app, ["evaluate", str(copy)])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "invalid temperature")


def test_min_confidence_marks_uncertain_predictions(tiny_run, user_image_files, tmp_path):
    files = [str(path) for path in user_image_files]
    result = runner.invoke(app, ["predict", *files, "--checkpoint", str(tiny_run), "--json"])
    assert result.exit_code == 0, result.output
    confidences = sorted(p["confidence"] for p in json.loads(result.stdout))
    threshold = (confidences[5] + confidences[6]) / 2  # six below it

    csv_file = tmp_path / "out.csv"
    base = ["predict", *files, "--checkpoint", str(tiny_run), "--min-confidence", str(threshold)]
    result = runner.invoke(app, [*base, "--json"])
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)
    assert [p["uncertain"] for p in predictions] == [
        p["confidence"] < threshold for p in predictions
    ]
    assert sum(p["uncertain"] for p in predictions) == 6

    result = runner.invoke(app, [*base, "--csv", str(csv_file)])
    assert result.exit_code == 0, result.output
    verdicts = collections.Counter(p["verdict"] for p in predictions)
    summary = " ".join(result.stdout.split())  # the terminal may wrap it
    assert f"{len(files)} images: {len(files) - 6} recognized, {verdicts['not_sure']} not sure" in (
        summary
    )
    assert f"{verdicts['not_a_digit']} not a digit" in summary
    digit_cells = [line.split("│")[2].strip() for line in result.stdout.splitlines() if "│" in line]
    assert sum(cell.endswith("?") for cell in digit_cells) == verdicts["not_sure"]
    assert sum(cell == "not a digit" for cell in digit_cells) == verdicts["not_a_digit"]
    with csv_file.open() as f:
        rows = list(csv.DictReader(f))
    assert [row["uncertain"] for row in rows] == [str(p["uncertain"]).lower() for p in predictions]


def test_min_confidence_default_and_bounds(tiny_run, old_run, user_image_files):
    """The default threshold applies to calibrated models; one without a temperature (an
    older checkpoint) marks nothing unless asked, as before."""
    files = [str(path) for path in user_image_files]
    result = runner.invoke(app, ["predict", *files, "--checkpoint", str(tiny_run), "--json"])
    assert result.exit_code == 0, result.output
    for p in json.loads(result.stdout):
        assert p["uncertain"] is (p["confidence"] < DEFAULT_MIN_CONFIDENCE)
    result = runner.invoke(app, ["predict", *files, "--checkpoint", str(old_run)])
    assert result.exit_code == 0, result.output
    summary = " ".join(result.stdout.split())  # the terminal may wrap it
    assert "0 not a digit, none marked not sure (the model has no temperature" in summary
    assert "This model has no non-digit detector" in summary
    result = runner.invoke(app, ["predict", *files, "--checkpoint", str(old_run), "--json"])
    uncalibrated = json.loads(result.stdout)
    assert not any(p["uncertain"] for p in uncalibrated)
    assert min(p["confidence"] for p in uncalibrated) < DEFAULT_MIN_CONFIDENCE  # would mark
    files = files[:2]
    for threshold in (0.0, 1.0):
        flags = ["--checkpoint", str(tiny_run), "--json", "--min-confidence", str(threshold)]
        result = runner.invoke(app, ["predict", *files, *flags])
        assert result.exit_code == 0, result.output
        for p in json.loads(result.stdout):
            assert p["uncertain"] is (p["confidence"] < threshold)


@pytest.mark.parametrize("value", ["nan", "-0.1", "1.5", "inf", "abc"])
def test_bad_min_confidence_is_one_line(value, user_image_files):
    result = runner.invoke(app, ["predict", str(user_image_files[0]), "--min-confidence", value])
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "--min-confidence")


def test_non_digit_generator_makes_every_kind_the_same_way_twice(tmp_path):
    """The images `benchmarks/uncertain_rate.py` measures the uncertain rate on."""
    first = generate_non_digits(tmp_path / "a", 2, seed=3)
    again = generate_non_digits(tmp_path / "b", 2, seed=3)
    assert [kind for _, kind in first] == [kind for kind in NON_DIGIT_KINDS for _ in range(2)]
    for (path, _), (same, _) in zip(first, again, strict=True):
        assert path.read_bytes() == same.read_bytes()
        with Image.open(path) as image:
            assert min(image.size) >= 28

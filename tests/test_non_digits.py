"""Refusing images of no digit: the generated non-digits, training with them, the policy that
decides from the probabilities, and the bundled model's refusals."""

import json
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import MNIST_DIR, fit_small_detectors, tiny_train
from typer.testing import CliRunner

from digitjax import checkpoint, detector, weights
from digitjax.cli import app
from digitjax.config import ADDED_LATER, Config, Interrupted, UserError
from digitjax.data import read_idx_split
from digitjax.inference.classifier import (
    BUNDLED_MODEL,
    DEFAULT_MIN_CONFIDENCE,
    NON_DIGIT_SCORE,
    NOT_A_DIGIT_BELOW,
    Prediction,
    judge,
)
from digitjax.inference.predict import load_classifier, predict_files
from digitjax.synthetic import drawn_digits, non_digits, user_digits
from digitjax.train import Callbacks, train
from digitjax.weights import (
    DETECTOR_FILE,
    ONE_PIXEL_SHIFTS,
    STEADY_BAND,
    shifted,
    steady_scores,
)

runner = CliRunner()
NON_DIGIT_FLAGS = ["--non-digit-fraction", "0.25", "--non-digit-images", "48"]


def test_non_digit_settings_default_to_none_and_older_checkpoints_had_none():
    assert Config().non_digit_fraction == 0.0 and ADDED_LATER["non_digit_fraction"] == 0.0
    assert ADDED_LATER["non_digit_images"] == Config().non_digit_images
    saved = Config(non_digit_fraction=0.5).to_dict()
    del saved["non_digit_fraction"], saved["non_digit_images"]
    assert Config.from_dict(saved).non_digit_fraction == 0.0


@pytest.mark.parametrize(
    ("name", "value"),
    [("non_digit_fraction", -0.1), ("non_digit_fraction", 1.5),
     ("non_digit_fraction", float("nan")), ("non_digit_images", 0)],
)  # fmt: skip
def test_non_digit_settings_out_of_bounds_are_refused(name, value):
    with pytest.raises(UserError, match=f"--{name.replace('_', '-')} must be in"):
        Config(**{name: value})


def test_train_help_shows_the_non_digit_flags():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--non-digit-fraction" in result.stdout and "--non-digit-images" in result.stdout


def test_held_out_and_training_kinds_are_disjoint_and_cover_every_kind():
    assert not set(non_digits.HELD_OUT_KINDS) & set(non_digits.TRAINING_KINDS)
    assert set(non_digits.HELD_OUT_KINDS) | set(non_digits.TRAINING_KINDS) == set(non_digits.KINDS)
    assert len(non_digits.HELD_OUT_KINDS) >= 5 and len(non_digits.TRAINING_KINDS) >= 10


@pytest.mark.parametrize("kind", non_digits.KINDS)
def test_every_kind_draws_something_and_the_same_thing_twice(kind):
    fonts = non_digits.fonts()
    for number in range(3):
        image = np.asarray(non_digits.draw(kind, 5, number, fonts).convert("L"), np.int16)
        again = np.asarray(non_digits.draw(kind, 5, number, fonts).convert("L"), np.int16)
        assert np.array_equal(image, again)
        assert min(image.shape) >= 28
        # Not blank: a part of the image differs from the rest (blank paper by its specks).
        assert np.percentile(image, 99.9) - np.percentile(image, 0.1) > 20
    other = np.asarray(non_digits.draw(kind, 6, 0, fonts).convert("L"))
    assert not np.array_equal(other, np.asarray(non_digits.draw(kind, 5, 0, fonts).convert("L")))


def test_training_set_is_preprocessed_once_then_read_from_its_cache(tmp_path, monkeypatch):
    images = non_digits.training_set(30, tmp_path)
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
    assert 20 <= len(images) <= 30  # those with no digit found, or read as a 1, are left out
    assert not any(non_digits.looks_like_a_one(image) for image in images)
    made = non_digits._training_block
    monkeypatch.setattr(non_digits, "_training_block", lambda numbers: pytest.fail("remade"))
    assert np.array_equal(non_digits.training_set(30, tmp_path), images)
    (cache,) = tmp_path.iterdir()
    cache.write_bytes(b"damaged")
    monkeypatch.setattr(non_digits, "_training_block", made)
    assert np.array_equal(non_digits.training_set(30, tmp_path), images)


def test_drawn_digits_are_digits_as_users_give_them_and_are_cached(tmp_path, monkeypatch):
    """The detector's digits drawn as users' images: still the digits they were (the bundled
    model reads them), not MNIST's own pixels, the same drawings every time, made once."""
    images, labels = read_idx_split(MNIST_DIR, "train")
    digits, labels = images[:40], labels[:40]
    drawn = [drawn_digits.preprocessed(digit, n) for n, digit in enumerate(digits)]
    found = [n for n, image in enumerate(drawn) if image is not None]
    assert len(found) >= 36
    seen = np.stack([drawn[n] for n in found])
    assert not any(np.array_equal(seen[i], digits[n]) for i, n in enumerate(found))
    outputs = load_classifier(BUNDLED_MODEL, quick_start=True).outputs(seen / np.float32(255))
    assert (outputs[:, :10].argmax(1) == labels[found]).mean() >= 0.9
    cached = drawn_digits.training_set(digits, tmp_path)
    assert np.array_equal(cached, seen)
    monkeypatch.setattr(drawn_digits, "_drawn_block", lambda task: pytest.fail("remade"))
    assert np.array_equal(drawn_digits.training_set(digits, tmp_path), seen)
    # Other digits are other drawings: not read from that cache.
    with pytest.raises(pytest.fail.Exception):
        drawn_digits.training_set(digits[1:], tmp_path)


def test_printed_digits_are_the_digits_they_print_in_the_letters_fonts():
    """The detector's printed digits: the digit number % 10, in the fonts and manner the
    non-digits' letters are printed, as the model sees them; the same every time."""
    font_files = non_digits.fonts()
    printed = [drawn_digits.printed_digit(n, font_files) for n in range(30)]
    assert all(image is not None for image in printed)
    seen = np.stack(printed)
    assert np.array_equal(drawn_digits.printed_digit(7, font_files), seen[7])
    outputs = load_classifier(BUNDLED_MODEL, quick_start=True).outputs(seen / np.float32(255))
    assert (outputs[:, :10].argmax(1) == np.arange(30) % 10).mean() >= 0.9


def test_policy_decides_from_the_top_probability_and_the_detector():
    assert judge(0.999, DEFAULT_MIN_CONFIDENCE) == "digit"
    assert judge(DEFAULT_MIN_CONFIDENCE, DEFAULT_MIN_CONFIDENCE) == "digit"
    assert judge(DEFAULT_MIN_CONFIDENCE - 1e-6, DEFAULT_MIN_CONFIDENCE) == "not_sure"
    assert judge(NOT_A_DIGIT_BELOW, DEFAULT_MIN_CONFIDENCE) == "not_sure"
    assert judge(0.1, DEFAULT_MIN_CONFIDENCE) == "not_a_digit"  # ten equal probabilities
    assert judge(0.1, None) == "digit"  # an uncalibrated model, no threshold asked for
    assert 0.1 < NOT_A_DIGIT_BELOW < DEFAULT_MIN_CONFIDENCE < 1
    # A positive non-digit score refuses the image however sure the model is, with or
    # without a threshold; a negative one leaves the decision to the probabilities.
    assert judge(0.999, DEFAULT_MIN_CONFIDENCE, 0.2) == "not_a_digit"
    assert judge(0.999, None, 1e-6) == "not_a_digit"
    assert judge(0.999, DEFAULT_MIN_CONFIDENCE, 0.0) == "digit"
    assert judge(0.9, DEFAULT_MIN_CONFIDENCE, -3.0) == "not_sure"


def test_the_flag_report_splits_digits_flags_by_whether_they_caught_a_misreading():
    """benchmarks/uncertain_rate.py's split of the flags on digits (README figures)."""
    from uncertain_rate import rates

    digits = [
        (0.99, -1.0, True),  # sure, read right: not flagged
        (0.99, 1.0, True),  # the detector flags a digit read right
        (0.50, -1.0, False),  # "not sure" catches a misreading
        (0.99, -1.0, False),  # a misreading passes unflagged
        None,  # no digit found: flagged, neither read right nor wrong
    ]
    report = rates(digits, [DEFAULT_MIN_CONFIDENCE])
    assert report["flagged"][f"{DEFAULT_MIN_CONFIDENCE:g}"] == 3 / 5
    assert report["at_the_default"] == {
        "flagged_misread": 1 / 5,
        "flagged_read_right": 1 / 5,
        "unflagged_misread": 1 / 5,
    }
    # Images of no digit have no reading to be right about.
    assert "at_the_default" not in rates([(0.99, 1.0, None)], [DEFAULT_MIN_CONFIDENCE])


def test_real_sets_count_each_icon_once_and_leave_out_those_that_may_show_a_digit(tmp_path):
    """benchmarks/real_non_digits.py's choice of icons (README figures): the first file of
    each name, a link to a file already taken counted once, no name hinting at a digit."""
    from real_non_digits import one_per_name

    def icon(relative: str) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(relative.encode())
        return path

    folder, printer = icon("actions/folder.png"), icon("devices/printer.png")
    (tmp_path / "places").mkdir()
    (tmp_path / "places/folder-blue.png").symlink_to(folder)  # another name, the same icon
    (tmp_path / "places/dangling.png").symlink_to(tmp_path / "nowhere.png")
    paths = [
        folder,
        icon("places/folder.png"),  # the name again, another size or context
        tmp_path / "places/folder-blue.png",
        tmp_path / "places/dangling.png",
        icon("status/battery-100.png"),
        icon("apps/accessories-calculator-dialpad.png"),
        icon("apps/alarm-clock.png"),
        icon("actions/go-next-rtl.png"),
        printer,
    ]
    assert one_per_name(paths) == [folder, printer]


def test_the_flag_causes_on_users_digits_are_told_apart():
    """benchmarks/user_digit_flags.py's columns (README figures): each flag has one cause."""
    from user_digit_flags import causes

    def digit(confidence: float, score: float, top: int) -> Prediction:
        probabilities = tuple(confidence if d == top else 0.0 for d in range(10))
        return Prediction("x.png", top, confidence, "digit", probabilities, score)

    rows = [
        causes(digit(0.99, -1.0, 3), 3),  # sure, read right: not flagged
        causes(digit(0.99, 2.0, 3), 3),  # the detector alone, read right
        causes(digit(0.50, -1.0, 5), 3),  # "not sure" alone, misread
        causes(digit(0.50, 2.0, 3), 3),  # both, read right
        causes(Prediction("x.png", error="no digit found"), 3),
    ]
    total = sum(rows, Counter())
    assert {k: total[k] for k in total if total[k]} == {
        "images": 5,
        "flagged": 4,
        "detector": 1,
        "not_sure": 1,
        "both": 1,
        "none_found": 1,
        "flagged_read_right": 2,
        "misread": 2,
    }


def test_the_bundled_model_refuses_non_digit_kinds_it_never_saw(tmp_path):
    """Its detector was fitted on the training kinds only: the held-out kinds, drawn with a
    seed of their own, are refused; users' digits and MNIST test digits mostly are not
    (benchmarks/README.md, "Non-digit rejection", has the figures on 100 per kind)."""
    classifier = load_classifier(BUNDLED_MODEL, quick_start=True)
    assert classifier.info.detects_non_digits
    others = non_digits.generate(tmp_path / "others", 8, seed=7, kinds=non_digits.HELD_OUT_KINDS)
    answers, _ = predict_files(classifier, [path for path, _ in others], DEFAULT_MIN_CONFIDENCE)
    refused = [a.verdict == "not_a_digit" or a.error is not None for a in answers]
    assert sum(refused) >= 0.85 * len(answers), [p.name for p, r in zip(others, refused) if not r]
    digits = user_digits.generate(tmp_path / "digits", 4, seed=7)
    answers, _ = predict_files(classifier, [path for path, _, _ in digits], DEFAULT_MIN_CONFIDENCE)
    assert sum(a.verdict == "not_a_digit" for a in answers) <= 0.1 * len(answers)
    images = read_idx_split(MNIST_DIR, "test")[0][:2000].astype(np.float32) / 255
    outputs = classifier.outputs(images)
    assert (outputs[:, NON_DIGIT_SCORE] > 0).mean() <= 0.02  # issue 21: <= 2% of MNIST test


def test_shifted_moves_images_by_one_pixel_filling_with_black():
    images = np.zeros((1, 28, 28), np.float32)
    images[0, 5, 7] = 1
    for (rows, cols), (row, col) in zip(ONE_PIXEL_SHIFTS, [(4, 7), (6, 7), (5, 6), (5, 8)]):
        moved = shifted(images, rows, cols)
        assert moved[0, row, col] == 1 and moved.sum() == 1
    images[0, 0, :] = 1  # the top row leaves the frame when moved up
    assert shifted(images, -1, 0)[0, 27].sum() == 0 and shifted(images, -1, 0).sum() == 1


def test_scores_near_the_threshold_are_averaged_over_one_pixel_shifts():
    images = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)

    def scores_of(views):  # a score that moves with the image: its top-left pixel
        return 10 * views[:, 0, 0]

    scores = np.array([-5.0, -0.5, 0.5, np.nan])
    steady = steady_scores(scores, images, scores_of)
    assert steady[0] == -5.0 and np.isnan(steady[3])  # far from 0, and no detector
    for n in (1, 2):
        shifts = [scores_of(shifted(images[n : n + 1], *s))[0] for s in ONE_PIXEL_SHIFTS]
        assert steady[n] == pytest.approx((scores[n] + sum(shifts)) / 5)


def test_the_threshold_is_set_on_the_scores_over_five_views():
    """A detector's threshold flags `false_alarms` of the held-out digits by their mean score
    over the five views, not by one view's."""
    digits = np.random.default_rng(1).random((2000, 28, 28), dtype=np.float32)

    def scores_of(views):  # a score that a one-pixel shift changes a lot
        return 8 * views[:, 0, 0] + 4 * views[:, 1, 1] - 9

    threshold = detector.steady_threshold(scores_of, digits, 0.05)
    views = [digits] + [shifted(digits, *s) for s in ONE_PIXEL_SHIFTS]
    means = np.mean([scores_of(v) for v in views], axis=0)
    assert abs((means > threshold).sum() - 0.05 * len(digits)) <= 1
    assert abs((scores_of(digits) > threshold).sum() - 0.05 * len(digits)) > 20


def test_every_classifier_steadies_the_scores_near_the_threshold(monkeypatch):
    """The bundled model's scores, as `outputs` gives them, are the one-view forward pass's
    where that is far from 0, and its mean over five views near 0."""
    classifier = load_classifier(BUNDLED_MODEL, quick_start=True)
    images = read_idx_split(MNIST_DIR, "test")[0][:2000].astype(np.float32) / 255
    given = classifier.outputs(images)[:, NON_DIGIT_SCORE]

    monkeypatch.setattr(weights, "STEADY_BAND", 0.0)  # no image is near: one view each
    one_view = classifier.outputs(images)[:, NON_DIGIT_SCORE]
    near = np.flatnonzero(np.abs(one_view) < STEADY_BAND)
    assert 0 < near.size < 0.2 * len(images)
    far = np.abs(one_view) >= STEADY_BAND
    np.testing.assert_array_equal(given[far], one_view[far])
    views = [images[near]] + [shifted(images[near], *s) for s in ONE_PIXEL_SHIFTS]
    mean = np.mean([classifier.outputs(v)[:, NON_DIGIT_SCORE] for v in views], axis=0)
    np.testing.assert_allclose(given[near], mean, atol=1e-4)
    assert not np.allclose(given[near], one_view[near], atol=1e-2)


def tiny_config(tiny_mnist: Path) -> Config:
    return Config.from_flags(
        {"data_dir": tiny_mnist, "channels": (4, 8), "dense": 16, "epochs": 2,
         "non_digit_fraction": 0.25, "non_digit_images": 48}
    )  # fmt: skip


def test_training_with_non_digits_checkpoints_and_resumes_exactly(tiny_mnist, tmp_path):
    reference = tmp_path / "reference"
    flags = tiny_train(tiny_mnist, reference, *NON_DIGIT_FLAGS, epochs=2)
    result = runner.invoke(app, [*flags, "--json"])
    assert result.exit_code == 0, result.output
    saved, summary = checkpoint.read_config(reference, checkpoint.LATEST)
    assert saved.non_digit_fraction == 0.25 and saved.non_digit_images == 48
    # Interrupted in its first epoch, then resumed: exactly the uninterrupted run's metrics.
    run_dir = tmp_path / "run"

    def interrupt(step: int) -> None:
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(tiny_config(tiny_mnist), run_dir, callbacks=Callbacks(on_chunk=interrupt))
    assert runner.invoke(app, ["train", "--out", str(run_dir), "--resume"]).exit_code == 0
    resumed = checkpoint.read_config(run_dir, checkpoint.LATEST)[1]
    assert resumed["history"] == summary["history"]
    # The non-digits change the training: the same run without them ends elsewhere.
    plain = tmp_path / "plain"
    assert runner.invoke(app, tiny_train(tiny_mnist, plain, epochs=2)).exit_code == 0
    plain_history = checkpoint.read_config(plain, checkpoint.LATEST)[1]["history"]
    assert plain_history[-1]["train_loss"] != summary["history"][-1]["train_loss"]


def test_training_fits_a_non_digit_detector_when_asked(tiny_mnist, tmp_path, monkeypatch):
    """`--non-digit-detector`: fitted once training ends, for the best checkpoint, into the
    run folder; a stop signal during the fit leaves the run complete without one, and
    `--resume` fits it."""
    fit_small_detectors(monkeypatch, tiny_mnist)
    run_dir = tmp_path / "run"
    flags = tiny_train(tiny_mnist, run_dir, "--non-digit-detector", epochs=1)
    result = runner.invoke(app, flags)
    assert result.exit_code == 0, result.output
    assert "Fitting the non-digit detector" in result.stderr
    detector_file = run_dir / DETECTOR_FILE
    best_step = int(next(run_dir.glob("best/*")).name)
    assert json.loads(detector_file.read_text())["step"] == best_step
    for classifier in (load_classifier(run_dir, quick_start=True), load_classifier(run_dir)):
        assert classifier.info.detects_non_digits
    fitted = detector_file.read_bytes()

    detector_file.unlink()
    real_fit = detector.fit

    def stopped_during_the_fit(model):
        os.kill(os.getpid(), signal.SIGINT)
        return real_fit(model)

    monkeypatch.setattr(detector, "fit", stopped_during_the_fit)
    result = runner.invoke(app, ["train", "--out", str(run_dir), "--resume"])
    assert result.exit_code == 130
    assert "SIGINT while fitting the non-digit detector" in result.stderr
    assert not detector_file.exists() and not list(tmp_path.glob("run/*.tmp*"))
    monkeypatch.setattr(detector, "fit", real_fit)
    result = runner.invoke(app, ["train", "--out", str(run_dir), "--resume"])
    assert result.exit_code == 0, result.output
    assert detector_file.read_bytes() == fitted  # the same detector: the same seed

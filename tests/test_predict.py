import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import MNIST_DIR, assert_one_line_error, huge_png, run_digitjax
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from digitjax import render
from digitjax.cli import app
from digitjax.data import read_idx_split
from digitjax.inference import predict as predict_module
from digitjax.inference.classifier import BUNDLED_MODEL
from digitjax.inference.preprocess import load_grayscale

runner = CliRunner()


@pytest.fixture
def no_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder without checkpoints/, so predict uses the bundled model."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def predict_json(*args: str) -> tuple[int, list[dict], str]:
    result = runner.invoke(app, ["predict", *args, "--json"])
    return result.exit_code, json.loads(result.stdout), result.stderr


def test_bundled_model_restores_and_reaches_its_stated_accuracy(no_runs):
    """Without runs in checkpoints/, evaluate (as predict, serve and export) falls back to the
    bundled model, and says so."""
    result = runner.invoke(app, ["evaluate", "--json"])
    assert result.exit_code == 0, result.output
    assert "evaluating the model bundled with digitjax" in result.stderr
    report = json.loads(result.stdout)
    assert Path(report["checkpoint"]).is_relative_to(BUNDLED_MODEL)
    stated = json.loads(next(BUNDLED_MODEL.glob("best/*/summary/metadata")).read_text())
    assert report["accuracy"] == pytest.approx(stated["best"]["test_accuracy"])
    assert report["accuracy"] >= 0.994


def test_predicts_user_images_with_the_bundled_model(no_runs, user_images):
    code, results, _ = predict_json(*(str(path) for path, _, _ in user_images))
    assert code == 0
    assert [r["name"] for r in results] == [str(path) for path, _, _ in user_images]
    correct = [r["digit"] == label for r, (_, label, _) in zip(results, user_images)]
    assert np.mean(correct) >= 0.9, results
    for r in results:
        assert 0 < r["confidence"] <= 1 and len(r["probabilities"]) == 10
        assert sum(r["probabilities"]) == pytest.approx(1, abs=1e-4)
        assert r["confidence"] == max(r["probabilities"])
        assert r["verdict"] in ("digit", "not_sure", "not_a_digit") and r["error"] is None
        assert r["uncertain"] is (r["verdict"] != "digit")
        if r["verdict"] != "not_a_digit":
            assert r["probabilities"][r["digit"]] == r["confidence"]


def test_folder_glob_csv_preprocessed_and_plot(no_runs, user_images):
    folder = user_images[0][0].parent
    csv_file, seen_dir, plot = no_runs / "out.csv", no_runs / "seen", no_runs / "grid.png"
    result = runner.invoke(
        app,
        [
            "predict",
            str(folder),
            "--csv",
            str(csv_file),
            "--save-preprocessed",
            str(seen_dir),
            "--plot",
            str(plot),
        ],
    )
    assert result.exit_code == 0, result.output
    notes = result.stderr.splitlines()
    assert notes == [
        f"CSV written to {csv_file}",
        f"{len(list(seen_dir.glob('*.png')))} preprocessed 28x28 images written to {seen_dir}",
        f"plot written to {plot}",
    ]
    with csv_file.open() as f:
        rows = list(csv.DictReader(f))
    in_folder = [p for p, _, _ in user_images if p.parent == folder]
    assert sorted(r["name"] for r in rows) == sorted(map(str, in_folder))
    saved = sorted(seen_dir.glob("*.png"))
    assert len(saved) == len(in_folder)
    assert Image.open(saved[0]).size == (28, 28)
    assert Image.open(plot).size[0] > 500
    pattern = str(folder / "*.*")
    code, results, _ = predict_json(pattern)
    assert code == 0 and len(results) == len(in_folder)


def test_bad_files_are_reported_one_line_each_and_others_still_predicted(no_runs):
    images, labels = read_idx_split(MNIST_DIR, "test")
    good = no_runs / "seven.png"
    Image.fromarray(images[0]).resize((140, 140)).save(good)
    (no_runs / "notes.png").write_text("not an image")
    truncated = no_runs / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    blank = no_runs / "blank.png"
    Image.new("L", (100, 100), 230).save(blank)
    result = runner.invoke(
        app,
        [
            "predict",
            str(good),
            str(no_runs / "notes.png"),
            str(truncated),
            str(blank),
            str(no_runs / "missing.png"),
            "--json",
        ],
    )
    assert result.exit_code == 1
    results = {Path(r["name"]).name: r for r in json.loads(result.stdout)}
    assert results["seven.png"]["digit"] == labels[0] == 7
    assert results["blank.png"]["error"] == "no digit found"
    for name in ("notes.png", "truncated.png", "missing.png", "blank.png"):
        assert results[name]["digit"] is None and results[name]["error"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 4 and "Traceback" not in result.stderr
    assert all(
        any(name in line for line in errors)
        for name in ("notes.png", "truncated.png", "missing.png", "blank.png")
    )
    # The table's count tells the files it could not read from those holding no digit.
    args = [str(no_runs / name) for name in results]
    summary = " ".join(runner.invoke(app, ["predict", *args]).stdout.split())
    assert "4 images: 1 recognized," in summary
    assert "not a digit, 1 without a digit found, 2 unreadable; 1 path naming no image" in summary


def test_a_non_digit_shows_no_confidence(no_runs):
    """The confidence is the top digit's: beside "not a digit" it read as how sure the model
    is that the image is none (99.9% for a photo). The top 3 still show the digits' odds."""
    box = Image.new("L", (280, 280), 0)
    pen = ImageDraw.Draw(box)
    pen.rectangle((60, 60, 220, 220), outline=255, width=18)
    pen.line((60, 60, 220, 220), fill=255, width=18)
    pen.line((220, 60, 60, 220), fill=255, width=18)
    box.save(no_runs / "box.png")
    result = run_digitjax("predict", "box.png", cwd=no_runs, env={**os.environ, "COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    [row] = [line for line in result.stdout.splitlines() if "box.png" in line]
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells[1:3] == ["not a digit", ""] and cells[3].startswith("0: "), row


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            IndexError("index -1 is out of bounds for axis 0 with size 0"),
            "unreadable image: IndexError: index -1 is out of bounds for axis 0 with size 0",
        ),
        # PIL holds no row of 79,000,000 pixels: it raised MemoryError with no message.
        (MemoryError(), "too large to preprocess in the memory available"),
    ],
)
def test_a_file_preprocessing_fails_on_gets_its_error_and_others_are_still_predicted(
    no_runs, monkeypatch, error, said
):
    # A defect on an odd file (a pixel-high image once raised IndexError) must cost that
    # file, not the run: the same per-image error the server gives.
    from digitjax.inference import parallel

    def fails_on_odd(file, max_pixels):
        if "odd" in str(file):
            raise error
        return load_grayscale(file, max_pixels)

    images, _ = read_idx_split(MNIST_DIR, "test")
    for name in ("seven.png", "odd.png"):
        Image.fromarray(images[0]).resize((140, 140)).save(no_runs / name)
    monkeypatch.setattr(parallel, "load_grayscale", fails_on_odd)
    result = runner.invoke(app, ["predict", "seven.png", "odd.png", "--json"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    results = {r["name"]: r for r in json.loads(result.stdout)}
    assert results["seven.png"]["digit"] == 7
    assert results["odd.png"]["error"] == said
    assert_one_line_error(result.stderr, f"odd.png: {said}")


def test_huge_images_and_bombs_get_an_error_each_and_others_are_still_predicted(no_runs):
    images, labels = read_idx_split(MNIST_DIR, "test")
    good = [no_runs / "seven.png", no_runs / "two.png"]
    Image.fromarray(images[0]).resize((140, 140)).save(good[0])
    Image.fromarray(255 - images[1]).resize((90, 90)).save(good[1])
    huge = huge_png(no_runs / "huge.png", 20000, 20000)  # beyond what PIL itself accepts
    bomb = huge_png(no_runs / "bomb.png", 10000, 10000)  # PIL only warns: we must not decode
    (no_runs / "garbage.jpg").write_bytes(bytes(range(256)) * 8)
    result = runner.invoke(
        app,
        [
            "predict",
            str(huge),
            str(good[0]),
            str(bomb),
            str(no_runs / "garbage.jpg"),
            str(good[1]),
            "--json",
        ],
    )
    assert result.exit_code == 1
    results = {Path(r["name"]).name: r for r in json.loads(result.stdout)}
    assert [results[name]["digit"] for name in ("seven.png", "two.png")] == list(labels[:2])
    assert results["huge.png"]["error"].startswith("image too large: 400,000,000 pixels")
    assert results["bomb.png"]["error"] == "image too large: 10000x10000 pixels, limit 80,000,000"
    assert results["garbage.jpg"]["error"].startswith("not an image in a known format (PNG,")
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 == len(result.stderr.splitlines())


def test_table_at_80_columns_shows_every_file_name_whole(no_runs):
    images, labels = read_idx_split(MNIST_DIR, "test")
    deep = no_runs / "a-rather-long-folder-name" / "scans from the office" / "2026" / "batch-1"
    deep.mkdir(parents=True)
    names = [f"customer_form_digit_{i:03}.png" for i in range(4)]
    for name, image in zip(names, images):
        Image.fromarray(image).resize((56, 56)).save(deep / name)
    result = run_digitjax("predict", str(no_runs), cwd=no_runs, env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    for name, label in zip(names, labels):
        row = next(line for line in lines if name in line)
        assert row.startswith("│ …/") and f"│ {label}  " in row
    assert "non-digit detector" not in result.stdout  # the bundled model has one


@pytest.mark.parametrize(
    ("probability", "shown"),
    [(0.99972, "99.9%"), (0.999, "99.9%"), (0.9989999, "99.8%"), (1.0, "100.0%"), (0.5, "50.0%")],
)
def test_confidence_is_shown_rounded_down(probability, shown):
    """99.97% is no certainty: it never reads 100.0% (beside "not sure", with a higher
    --min-confidence, that read as a contradiction)."""
    assert render.percent(probability) == shown


def test_table_at_40_columns_names_every_file(no_runs):
    """Too narrow for the top 3 beside the names: the names stay, the top 3 goes (--json
    has it); it used to be the other way round, a file column of one `…`."""
    images, labels = read_idx_split(MNIST_DIR, "test")
    for i in range(3):
        Image.fromarray(images[i]).save(no_runs / f"{i}.png")
    files = [f"{i}.png" for i in range(3)]
    result = run_digitjax("predict", *files, cwd=no_runs, env={**os.environ, "COLUMNS": "40"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 40 and "top 3" not in result.stdout
    for name, label in zip(files, labels):
        assert any(line.startswith(f"│ {name} ") and f"│ {label} " in line for line in lines)


def test_empty_folder(no_runs):
    (no_runs / "empty").mkdir()
    result = runner.invoke(app, ["predict", str(no_runs / "empty")])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "folder holds no images")
    assert "0 images: " in result.stdout and "1 path naming no image" in result.stdout


def test_each_path_that_names_no_image_says_why(no_runs):
    (no_runs / "loop").symlink_to("loop")
    (no_runs / "empty.png").write_bytes(b"")
    said = {
        "loop": "a link that leads to no file",
        "nothing*.png": "no file matches",
        "missing.png": "no such file",
        "empty.png": "the file is empty",
        "/dev/zero": "not an image in a known format (PNG",  # it has no size, but bytes
    }
    result = runner.invoke(app, ["predict", *said])
    assert result.exit_code == 1
    errors = sorted(line for line in result.stderr.splitlines() if line)
    expected = sorted(f"error: {path}: {why}" for path, why in said.items())
    assert len(errors) == len(expected)
    assert [e[: len(start)] for e, start in zip(errors, expected)] == expected


def test_control_characters_in_names_do_not_reach_the_terminal(no_runs):
    # A file name can hold an escape sequence (here: red, then clear the screen) or markup.
    name = "a\x1b[31mred\x1b[2J[bold].png"
    Image.fromarray(read_idx_split(MNIST_DIR, "test")[0][0]).save(no_runs / name)
    result = runner.invoke(app, ["predict", name, "gone\x1b[2J.png"])
    assert result.exit_code == 1
    assert "\x1b" not in result.stdout + result.stderr
    assert "a?[31mred?[2J[bold].png" in result.stdout
    assert_one_line_error(result.stderr, "error: gone?[2J.png: no such file")
    result = runner.invoke(app, ["predict", name, "--json"])  # data keeps the name as it is
    assert json.loads(result.stdout)[0]["name"] == name


def test_an_empty_name_is_no_file_not_the_current_folder(no_runs):
    Image.new("L", (28, 28)).save(no_runs / "here.png")  # what Path("") would have found
    result = runner.invoke(app, ["predict", "", "--json"])
    assert result.exit_code == 1
    assert [r["name"] for r in json.loads(result.stdout)] == ['""']
    assert_one_line_error(result.stderr, '"": no such file (an empty name)')


def test_checkpoint_that_is_not_digitjax(no_runs):
    (no_runs / "ckpt" / "best" / "1" / "state").mkdir(parents=True)
    image = no_runs / "x.png"
    Image.new("L", (28, 28)).save(image)
    result = runner.invoke(app, ["predict", str(image), "--checkpoint", str(no_runs / "ckpt")])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "is not a digitjax checkpoint")


def test_installed_command_predicts_one_image(no_runs):
    images, labels = read_idx_split(MNIST_DIR, "test")
    photo = no_runs / "two.jpg"
    # Dark ink on light paper, bigger than MNIST: predict must invert and rescale it.
    Image.fromarray(255 - images[1]).resize((200, 200)).convert("RGB").save(photo)
    result = run_digitjax("predict", str(photo), "--json", cwd=no_runs)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["digit"] == labels[1] == 2


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_a_closed_output_is_no_failure(no_runs, closed):
    # Python starts without sys.stdout (or sys.stderr) when its descriptor is closed.
    Image.fromarray(read_idx_split(MNIST_DIR, "test")[0][0]).save(no_runs / "seven.png")
    close = "1>&-" if closed == "stdout" else "2>&-"
    result = subprocess.run(
        f"digitjax predict seven.png --json {close}",
        shell=True, cwd=no_runs, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    if closed == "stderr":
        assert json.loads(result.stdout)[0]["digit"] == 7


@pytest.mark.parametrize("output", [[], ["--json"]])
def test_a_reader_that_leaves_ends_the_command_quietly(no_runs, output):
    """`digitjax predict ... | head`: the table and JSON alike end with status 1 and no message
    (JSON said "error: [Errno 32] Broken pipe")."""
    Image.fromarray(read_idx_split(MNIST_DIR, "test")[0][0]).save(no_runs / "seven.png")
    command = ["digitjax", "predict", "seven.png", *output]
    process = subprocess.Popen(command, cwd=no_runs, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader left before the results
    assert process.wait(timeout=600) == 1
    assert process.stderr.read() == b""


@pytest.mark.parametrize(
    "args", [["predict", "seven.png"], ["predict", "seven.png", "--json"], ["predict", "--help"],
             ["--version"]],
)  # fmt: skip
def test_an_output_that_cannot_be_written_is_one_line_naming_it(no_runs, args):
    """Output into a full disk (/dev/full): the results said "error: [Errno 28] No space
    left on device", naming nothing; --help and --version ended in a traceback."""
    Image.fromarray(read_idx_split(MNIST_DIR, "test")[0][0]).save(no_runs / "seven.png")
    with open("/dev/full", "w") as full_disk:
        result = subprocess.run(["digitjax", *args], cwd=no_runs, stdout=full_disk,
                                stderr=subprocess.PIPE, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "cannot write to standard output: No space left on device")


def test_a_model_of_another_dataset_is_refused(no_runs):
    run = no_runs / "fashion"
    shutil.copytree(BUNDLED_MODEL, run)
    config_file = next(run.glob("best/*/config/metadata"))
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "dataset": "fashion_mnist"})
    )
    image = no_runs / "x.png"
    Image.new("L", (28, 28)).save(image)
    result = runner.invoke(app, ["predict", str(image), "--checkpoint", str(run)])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "is a fashion_mnist model, not a digit model")


def test_many_images_run_on_jax_a_few_on_numpy(no_runs, monkeypatch):
    """Past NUMPY_UP_TO images, JAX's faster forward pass pays for its imports."""
    images, labels = read_idx_split(MNIST_DIR, "test")
    for i in range(3):
        Image.fromarray(images[i]).save(no_runs / f"{i}.png")
    monkeypatch.setattr(predict_module, "NUMPY_UP_TO", 2)
    used_numpy = []
    quick_classifier = predict_module.quick_classifier
    monkeypatch.setattr(
        predict_module,
        "quick_classifier",
        lambda path: used_numpy.append(path) or quick_classifier(path),
    )
    for count, numpy in ((2, True), (3, False)):
        used_numpy.clear()
        code, results, _ = predict_json(*[str(no_runs / f"{i}.png") for i in range(count)])
        assert code == 0 and [r["digit"] for r in results] == list(labels[:count])
        assert bool(used_numpy) == numpy


def test_a_folder_search_finds_regular_files_only(no_runs):
    """A named pipe would block the run on reading it; a folder named like an image is none."""
    images, labels = read_idx_split(MNIST_DIR, "test")
    (no_runs / "scans" / "x.png").mkdir(parents=True)
    Image.fromarray(images[0]).save(no_runs / "scans" / "seven.png")
    os.mkfifo(no_runs / "scans" / "pipe.png")
    for search in ("scans", "scans/*.png", "scans/**"):
        result = subprocess.run(["digitjax", "predict", search, "--json"], cwd=no_runs,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert [(r["name"], r["digit"]) for r in json.loads(result.stdout)] == [
            ("scans/seven.png", labels[0])
        ]


def write_seven(path: Path) -> Path:
    images, _ = read_idx_split(MNIST_DIR, "test")
    Image.fromarray(images[0]).resize((140, 140)).save(path)
    return path


@pytest.mark.parametrize(
    "name",
    [
        "$\\frac$.png",  # maths markup to matplotlib
        os.fsdecode(b"bad\xff.png"),  # not UTF-8
        "/dev/stdin",  # a stream: it can be read only once
    ],
)
def test_plot_of_any_input(no_runs, name):
    image = write_seven(no_runs / "seven.png").read_bytes()
    if name != "/dev/stdin":
        (no_runs / "seven.png").rename(no_runs / name)
    result = subprocess.run(["digitjax", "predict", name, "--plot", "grid.png"], cwd=no_runs,
                            input=image, capture_output=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode() == "plot written to grid.png\n"
    assert Image.open(no_runs / "grid.png").size[0] > 500


def test_csv_names_a_file_whose_name_is_not_utf8(no_runs):
    name = os.fsdecode(b"bad\xff.png")
    write_seven(no_runs / name)
    result = run_digitjax("predict", name, "--csv", "out.csv", "--json", cwd=no_runs)
    assert result.returncode == 0, result.stderr
    assert (no_runs / "out.csv").read_bytes().splitlines()[1].startswith(b"bad\xff.png,7,")

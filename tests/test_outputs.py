"""Output flags (--csv, --save-preprocessed, --plot, --out): a path that cannot be written fails
before any work, in one line; a write that fails after the work loses none of the results."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MNIST_DIR, assert_one_line_error
from PIL import Image
from typer.testing import CliRunner

from digitjax.cli import app
from digitjax.data import read_idx_split
from digitjax.outputs import write_files

runner = CliRunner()


def everything_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "adir").mkdir()
    images, _ = read_idx_split(MNIST_DIR, "test")
    Image.fromarray(images[0]).save(tmp_path / "seven.png")
    return tmp_path


UNWRITABLE = {  # name: (path relative to the work folder, what the error says)
    "under a file": ("afile/out.x", "afile is a file, not a folder"),
    "in /proc": ("/proc/digitjax-test/out.x", "cannot create files in /proc"),
}


# Each command with a file output flag, the flag last.
FILE_OUTPUTS = [
    ["predict", "seven.png", "--csv"],
    ["predict", "seven.png", "--plot"],
    ["evaluate", "--plot"],
    ["benchmark", "--steps", "1", "--repeats", "1", "--out"],
]


@pytest.mark.parametrize("where", ["under a file", "in /proc", "an existing folder"])
@pytest.mark.parametrize("command", FILE_OUTPUTS)
def test_unwritable_file_outputs_fail_first(workdir, monkeypatch, command, where):
    path, message = UNWRITABLE.get(where, ("adir", "is a folder, give a file name"))
    # A missing checkpoint: had the work started first, that would be the error.
    missing = ["--checkpoint", "nothing"] if command[0] == "predict" else []
    missing += ["nothing"] if command[0] == "evaluate" else []
    monkeypatch.chdir(workdir)
    before = everything_under(workdir)
    result = runner.invoke(app, [*command, path, *missing])
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, f"{command[-1]} {path}: {message}")
    assert result.stdout == "" and everything_under(workdir) == before


@pytest.mark.parametrize("command", [c for c in FILE_OUTPUTS if c[-1] == "--plot"])
def test_a_figure_in_a_format_matplotlib_cannot_write_fails_first(workdir, monkeypatch, command):
    """Before, a traceback (matplotlib's ValueError) once the work was done."""
    missing = ["--checkpoint", "nothing"] if command[0] == "predict" else ["nothing"]
    monkeypatch.chdir(workdir)
    before = everything_under(workdir)
    result = runner.invoke(app, [*command, "figure.txt", *missing])
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "--plot figure.txt: cannot write .txt figures; name a")
    assert everything_under(workdir) == before
    for suffix in ("svg", "PDF"):  # formats it does write pass the check
        result = runner.invoke(app, [*command, f"figure.{suffix}", *missing])
        assert "--plot" not in result.stderr and "nothing" in result.stderr


@pytest.mark.parametrize("where", ["under a file", "in /proc", "an existing file"])
def test_unwritable_preprocessed_folder_fails_first(workdir, monkeypatch, where):
    path, message = UNWRITABLE.get(where, ("afile", "is a file, not a folder"))
    monkeypatch.chdir(workdir)
    before = everything_under(workdir)
    result = runner.invoke(
        app, ["predict", "seven.png", "--save-preprocessed", path, "--checkpoint", "nothing"]
    )
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, f"--save-preprocessed {path}: {message}")
    assert everything_under(workdir) == before and (workdir / "afile").read_text() == "mine\n"


def test_a_write_failing_after_the_work_comes_after_the_results(workdir):
    """Files over 4 kB cannot be written (as on a full disk): the plot fails, the CSV (on
    stdout, a stream) and the 28x28 images are written, and the results were printed first."""

    # The limit is set by the child itself before it becomes digitjax: a preexec_fn would
    # fork this process, which JAX's threads make unsafe (and JAX warns about it).
    small_files_only = (
        "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4_000, 4_000)); "
        "os.execvp('digitjax', ['digitjax', *sys.argv[1:]])"
    )
    (workdir / "out").mkdir()
    (workdir / "out" / "grid.png").write_bytes(b"an earlier plot")
    result = subprocess.run(
        [sys.executable, "-c", small_files_only, "predict", "seven.png", "--csv", "/dev/stdout",
         "--plot", "out/grid.png", "--overwrite", "--save-preprocessed", "out/seen"],
        cwd=workdir, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "--plot out/grid.png: cannot write: File too large")
    assert result.stderr.splitlines()[-1].startswith("error: --plot")
    table, _, rest = result.stdout.partition(
        "name,digit,confidence,uncertain,verdict,probabilities,non_digit_score,error"
    )
    assert "seven.png" in table and "│ 7 " in table
    rows = list(csv.reader(io.StringIO(rest.strip())))
    assert rows[0][:2] == ["seven.png", "7"]
    assert (workdir / "out" / "grid.png").read_bytes() == b"an earlier plot"
    assert [p.name for p in everything_under(workdir / "out")] == [
        "grid.png",
        "seen",
        "seven.png",
    ]  # no partial file left behind
    assert Image.open(workdir / "out" / "seen" / "seven.png").size == (28, 28)
    mode = (workdir / "out" / "seen" / "seven.png").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


@pytest.mark.parametrize("command", FILE_OUTPUTS)
def test_an_existing_output_file_is_replaced_only_with_overwrite(workdir, monkeypatch, command):
    monkeypatch.chdir(workdir)
    # Fails at once with a checkpoint that is not there, instead of benchmarking.
    monkeypatch.setattr("digitjax.benchmark.run_benchmark", lambda plan, report: {"timed": 1})
    missing = ["--checkpoint", "nothing"] if command[0] == "predict" else []
    missing += ["nothing"] if command[0] == "evaluate" else []
    result = runner.invoke(app, [*command, "afile", *missing])
    assert result.exit_code == 1, result.output
    assert_one_line_error(
        result.stderr, f"{command[-1]} afile: exists: pass --overwrite to replace it"
    )
    assert result.stdout == "" and (workdir / "afile").read_text() == "mine\n"
    result = runner.invoke(app, [*command, "afile", *missing, "--overwrite", "--json"])
    assert "exists" not in result.stderr
    if command[0] == "benchmark":
        assert result.exit_code == 0, result.output
        assert json.loads((workdir / "afile").read_text()) == {"timed": 1}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_two_outputs_naming_one_file_are_refused(workdir, monkeypatch, overwrite):
    monkeypatch.chdir(workdir)
    (workdir / "linked").symlink_to("out.x")
    for table, plot in (("out.x", "out.x"), ("out.x", "./adir/../linked")):
        result = runner.invoke(
            app, ["predict", "seven.png", "--csv", table, "--plot", plot, *overwrite]
        )
        assert result.exit_code == 1
        assert_one_line_error(
            result.stderr, f"--plot {plot.removeprefix('./')}: also given to --csv"
        )
        assert not (workdir / "out.x").exists()
    # A stream can take both.
    result = runner.invoke(
        app, ["predict", "seven.png", "--csv", "/dev/null", "--plot", "/dev/null"]
    )
    assert result.exit_code == 0, result.output


def test_predict_replaces_its_outputs_only_with_overwrite_and_writes_to_streams(
    workdir, monkeypatch
):
    monkeypatch.chdir(workdir)
    (workdir / "seen").mkdir()
    (workdir / "seen" / "seven.png").write_text("an earlier image")
    outputs = ["--csv", "afile", "--save-preprocessed", "seen", "--plot", "/dev/null"]
    result = runner.invoke(app, ["predict", "seven.png", *outputs[2:]])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "--save-preprocessed seen/seven.png: exists: pass")
    assert (workdir / "seen" / "seven.png").read_text() == "an earlier image"
    result = runner.invoke(app, ["predict", "seven.png", *outputs, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert next(csv.DictReader((workdir / "afile").open()))["digit"] == "7"
    assert Image.open(workdir / "seen" / "seven.png").size == (28, 28)
    assert "plot written to /dev/null" in result.stderr


@pytest.mark.parametrize(
    ("flag", "output", "shown"),
    [
        ("--csv", "seven.png", "seven.png"),
        ("--plot", "./adir/../seven.png", "adir/../seven.png"),  # another spelling
        ("--plot", "linked.png", "linked.png"),  # a symbolic link to it
        ("--csv", "hard.png", "hard.png"),  # a hard link: the same file by another name
        ("--save-preprocessed", ".", "hard.png"),  # 28x28 images written over the inputs
    ],
)
def test_an_input_image_is_never_an_output_even_with_overwrite(
    workdir, monkeypatch, flag, output, shown
):
    monkeypatch.chdir(workdir)
    (workdir / "linked.png").symlink_to("seven.png")
    os.link(workdir / "seven.png", workdir / "hard.png")
    image = (workdir / "seven.png").read_bytes()
    for folder in (["."], [str(workdir)]):  # found in a folder or given by name
        for overwrite in ([], ["--overwrite"]):
            result = runner.invoke(app, ["predict", *folder, flag, output, *overwrite])
            assert result.exit_code == 1, result.output
            assert_one_line_error(result.stderr, f"{flag} {shown}: is one of the input images")
            assert (workdir / "seven.png").read_bytes() == image


def test_several_files_are_written_all_or_none(tmp_path: Path):
    """--save-preprocessed's images: one that cannot be written (here its folder is a file;
    on a full disk, its bytes) leaves none of them, and the file it would replace as it was."""
    (tmp_path / "a.png").write_bytes(b"an earlier image")
    (tmp_path / "afile").write_text("mine\n")
    contents = {
        tmp_path / "a.png": b"new",
        tmp_path / "b.png": b"new",
        tmp_path / "afile" / "c.png": b"new",
    }
    with pytest.raises(OSError):
        write_files(contents)
    assert everything_under(tmp_path) == [tmp_path / "a.png", tmp_path / "afile"]
    assert (tmp_path / "a.png").read_bytes() == b"an earlier image"
    del contents[tmp_path / "afile" / "c.png"]
    write_files(contents)
    assert [p.read_bytes() for p in contents] == [b"new", b"new"]

"""Nothing lost, ever: signals at any moment, crashes between checkpoint writes, two runs on
one folder, damaged checkpoints and full disks, each against real runs and checkpoints."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import (
    MNIST_DIR,
    assert_one_line_error,
    history,
    run_digitjax,
    signal_until_each_lands,
    tiny_train,
)
from PIL import Image
from typer.testing import CliRunner

from digitjax import checkpoint
from digitjax.cli import app
from digitjax.config import Config, Interrupted
from digitjax.data import read_idx_split
from digitjax.train import Callbacks, train

runner = CliRunner()
EPOCHS = 3
# tiny_mnist less the images held out for calibration, in batches of TINY_FLAGS's 64
STEPS_PER_EPOCH = (2048 - round(2048 * Config().calibration_fraction)) // 64


def flags(tiny_mnist: Path, run_dir: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return tiny_train(tiny_mnist, run_dir, *extra, epochs=epochs)


def best_steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "best").iterdir())


def saved_summary(run_dir: Path) -> dict:
    return checkpoint.read_config(run_dir, checkpoint.LATEST)[1]


def assert_complete_and_consistent(run_dir: Path, reference: Path) -> None:
    """The run ended exactly as the uninterrupted one, and best/ holds exactly the step its
    summary calls best, and nothing else (no temporary folder)."""
    assert history(run_dir) == history(reference)
    assert saved_summary(run_dir)["history"] == history(reference)
    assert best_steps(run_dir) == [str(saved_summary(run_dir)["best"]["step"])]
    assert best_steps(run_dir) == best_steps(reference)


@pytest.fixture
def reference(tiny_run: Path) -> Path:
    """The session's tiny run: an uninterrupted run of EPOCHS epochs."""
    return tiny_run


def tiny_config(tiny_mnist: Path, epochs: int = EPOCHS) -> Config:
    return Config.from_flags(
        {"data_dir": tiny_mnist, "channels": (4, 8), "dense": 16, "epochs": epochs}
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_in_an_epochs_last_chunk_saves_that_epoch(signum, reference, tiny_mnist, tmp_path):
    """The stop is taken after the epoch's evaluation and checkpoints, so --resume goes on
    with the next epoch and nothing is missing from the metrics."""
    run_dir = tmp_path / "run"

    def signal_in_last_chunk(step: int) -> None:
        if step == STEPS_PER_EPOCH:
            os.kill(os.getpid(), signum)

    with pytest.raises(Interrupted) as stopped:
        train(tiny_config(tiny_mnist), run_dir, callbacks=Callbacks(on_chunk=signal_in_last_chunk))
    assert stopped.value.exit_code == 128 + signum
    assert history(run_dir) == history(reference)[:1]
    assert runner.invoke(app, ["train", "--out", str(run_dir), "--resume"]).exit_code == 0
    assert_complete_and_consistent(run_dir, reference)


def test_signal_in_the_last_chunk_of_the_run_just_finishes(tiny_mnist, tmp_path):
    def interrupt_at_the_end(step: int) -> None:
        if step == STEPS_PER_EPOCH:
            os.kill(os.getpid(), signal.SIGINT)

    callbacks = Callbacks(on_chunk=interrupt_at_the_end)
    summary = train(tiny_config(tiny_mnist, epochs=1), tmp_path / "run", callbacks=callbacks)
    assert [r["epoch"] for r in summary["history"]] == [1]
    assert summary["best"]["step"] == STEPS_PER_EPOCH


def test_sigterm_saves_and_resumes_like_ctrl_c(reference, tiny_mnist, tmp_path):
    """SIGTERM after the first checkpoint; if the run finished before the signal landed, again
    with the signal as soon as the run folder exists (then there may be nothing to resume)."""
    run_dir = tmp_path / "run"
    moments = [lambda: checkpoint.usable_steps(run_dir / "latest"), run_dir.exists]
    for ready in moments:
        shutil.rmtree(run_dir, ignore_errors=True)
        process = subprocess.Popen(
            ["digitjax", *flags(tiny_mnist, run_dir, epochs=EPOCHS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(ready, process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        if process.returncode != 0:
            break
    assert process.returncode == 143, f"the signal never landed: {stderr}"
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    resume, start = ["train", "--out", str(run_dir), "--resume"], flags(tiny_mnist, run_dir)
    command = resume if checkpoint.usable_steps(run_dir / "latest") else start
    assert runner.invoke(app, command).exit_code == 0
    assert_complete_and_consistent(run_dir, reference)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_crash_between_latest_and_best_is_repaired_on_resume(
    reference, tiny_mnist, tmp_path, monkeypatch
):
    """A kill after a new best epoch's latest/ checkpoint but before its best/ copy."""
    run_dir = tmp_path / "run"
    real_save = checkpoint.RunCheckpointer.save

    class Killed(Exception):
        pass

    def save(self, kind, state, config, summary):
        if kind == checkpoint.BEST and int(state["step"]) == 2 * STEPS_PER_EPOCH:
            raise Killed
        real_save(self, kind, state, config, summary)

    monkeypatch.setattr(checkpoint.RunCheckpointer, "save", save)
    with pytest.raises(Killed):
        train(tiny_config(tiny_mnist), run_dir)
    monkeypatch.undo()
    assert saved_summary(run_dir)["best"]["step"] == 2 * STEPS_PER_EPOCH, "epoch 2 was best"
    assert best_steps(run_dir) == [str(STEPS_PER_EPOCH)]
    # A write cut short leaves Orbax's temporary folder; evaluate reads the latest meanwhile.
    shutil.rmtree(run_dir / "best" / str(STEPS_PER_EPOCH))
    (run_dir / "best" / "64.orbax-checkpoint-tmp-1").mkdir()
    result = runner.invoke(app, ["evaluate", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"].endswith(f"latest/{2 * STEPS_PER_EPOCH}")
    assert runner.invoke(app, ["train", "--out", str(run_dir), "--resume"]).exit_code == 0
    assert_complete_and_consistent(run_dir, reference)


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        ["digitjax", *flags(tiny_mnist, run_dir, epochs=200)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: checkpoint.usable_steps(run_dir / "latest"), first)
    for extra in ([], ["--seed", "1", "--overwrite"], ["--resume"]):
        second = run_digitjax(*flags(tiny_mnist, run_dir, *extra, epochs=200))
        assert second.returncode == 1
        assert_one_line_error(
            second.stderr, "is in use by another digitjax run", f"process {first.pid} on"
        )
    first.kill()
    first.wait()
    with checkpoint.run_lock(run_dir):  # the kernel released the dead process's lock
        pass


def test_run_that_died_before_its_first_checkpoint_is_no_dead_end(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    diverged = runner.invoke(app, flags(tiny_mnist, run_dir, "--learning-rate", "1e6"))
    assert diverged.exit_code == 1
    assert_one_line_error(diverged.stderr, "loss became NaN/inf", "the same command starts")
    resumed = runner.invoke(app, ["train", "--out", str(run_dir), "--resume"])
    assert_one_line_error(resumed.stderr, "nothing to resume", "without --resume")
    rerun = runner.invoke(app, flags(tiny_mnist, run_dir, "--epochs", "1"))
    assert rerun.exit_code == 0, rerun.output


def test_default_checkpoint_is_the_newest_usable_run(reference, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(reference, tmp_path / "checkpoints" / "good")
    broken = tmp_path / "checkpoints" / "broken"  # newer, but killed in its first epoch
    (broken / "latest" / "32.orbax-checkpoint-tmp-7").mkdir(parents=True)
    (broken / "metrics.jsonl").write_text("")
    assert checkpoint.newest_run() == Path("checkpoints/good")
    result = runner.invoke(app, ["evaluate", "--json"])
    assert result.exit_code == 0, result.output
    # Newer still: stopped in its first epoch, so it has its unfinished weights only. `train
    # --resume` takes it up; the commands that answer with a model keep to finished epochs.
    unfinished = Path(shutil.copytree(reference, tmp_path / "checkpoints" / "unfinished"))
    shutil.rmtree(unfinished / "best")
    assert checkpoint.choose_run_dir(None, True, "mnist") == Path("checkpoints/unfinished")
    result = runner.invoke(app, ["evaluate", "--json"])
    assert result.exit_code == 0, result.output
    assert "checkpoints/good/best/" in json.loads(result.stdout)["checkpoint"]


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


def data_files(step_dir: Path) -> list[Path]:
    """Every file of the state's arrays: which one holds the weights is Orbax's choice, and
    evaluate reads (and checks) only the weights."""
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def test_flipped_bits_in_a_checkpoint_are_detected(reference, tmp_path):
    """In whatever arrays they land: evaluate reads (and checks) only the weights it uses,
    resuming reads all the state."""
    run_dir = copy_of(reference, tmp_path)
    for kind in ("best", "latest"):
        for data_file in data_files(next((run_dir / kind).iterdir())):
            raw = bytearray(data_file.read_bytes())
            for position in range(len(raw) // 64, len(raw), max(1, len(raw) // 32)):
                raw[position] ^= 0x10
            data_file.write_bytes(bytes(raw))
    result = run_digitjax("evaluate", str(run_dir))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "corrupt checkpoint")
    assert "nan" not in result.stdout.lower()
    result = runner.invoke(app, ["train", "--out", str(run_dir), "--resume"])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "corrupt checkpoint")


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_data_files_are_one_clean_line(damage, reference, tmp_path):
    run_dir = copy_of(reference, tmp_path)
    for data_file in data_files(next((run_dir / "best").iterdir())):
        if damage == "truncate":
            data_file.write_bytes(data_file.read_bytes()[:100])
        else:
            data_file.unlink()
    result = run_digitjax("evaluate", str(run_dir))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "corrupt checkpoint")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("name", "position"),
    [("manifest.ocdbt", 0), ("_METADATA", 0), ("_METADATA", 5), ("array_metadatas", 0)],
)
def test_damaged_state_metadata_is_named_in_one_line(name, position, reference, tmp_path):
    """A flipped byte in the files that say what the state holds, not in its arrays: one line
    that says the checkpoint is damaged, not Orbax's words for it ('key_type', 'NoneType')."""
    run_dir = copy_of(reference, tmp_path)
    step_dir = next((run_dir / "best").iterdir())
    path = step_dir / "state" / name
    [damaged] = [path] if path.is_file() else list(path.iterdir())  # array_metadatas/process_0
    raw = bytearray(damaged.read_bytes())
    raw[position] ^= 0x10
    damaged.write_bytes(bytes(raw))
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, f"corrupt checkpoint {step_dir}: ")
    said = result.stderr.strip().split(f"{step_dir}: ", 1)[1]
    assert re.fullmatch(
        r"its state's metadata is damaged|a file of it is damaged \(\w+: .+\)", said
    )
    assert "NoneType" not in said


def test_a_process_that_goes_on_after_a_damaged_checkpoint_prints_nothing_more(reference, tmp_path):
    """Orbax's reads of the other arrays, abandoned after the failure, raise when they are
    collected: Python would print each, with TensorStore's spec of its array, to the stderr of
    a process that goes on (a server, a notebook; 12 to 49 of them in four runs of this test
    before they were dropped)."""
    run_dir = copy_of(reference, tmp_path)
    [metadata] = (next((run_dir / "best").iterdir()) / "state" / "array_metadatas").iterdir()
    metadata.write_bytes(b"}" + metadata.read_bytes()[1:])  # it starts with "{"
    goes_on = f"""
import gc, time
from digitjax import checkpoint
from digitjax.config import UserError
for _ in range(8):  # how many of the reads are left to collect varies from one to the next
    try:
        checkpoint.restore_model({str(run_dir)!r})
    except UserError as error:
        said = str(error)
    for _ in range(3):  # the reads end on TensorStore's threads
        time.sleep(0.03)
        gc.collect()
print(said)
print("went on")
"""
    result = subprocess.run(["python", "-c", goes_on], capture_output=True, text=True, timeout=300)
    assert "a file of it is damaged (JSONDecodeError" in result.stdout
    assert result.stdout.endswith("went on\n"), result.stdout
    assert "Exception ignored" not in result.stderr, result.stderr[:2000]


@pytest.mark.parametrize(
    ("item", "edit", "message"),
    [
        ("config", lambda c: {**c, "epochs": "5"}, "config field epochs = '5' has the wrong type"),
        ("summary", lambda s: {k: v for k, v in s.items() if k != "history"}, "has no history"),
    ],
)
def test_edited_json_items_are_refused_in_one_line(item, edit, message, reference, tmp_path):
    run_dir = copy_of(reference, tmp_path)
    for kind in ("latest", "best"):
        item_file = next((run_dir / kind).iterdir()) / item / "metadata"
        item_file.write_text(json.dumps(edit(json.loads(item_file.read_text()))))
    for command in (["train", "--out", str(run_dir), "--resume"], ["evaluate", str(run_dir)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1
        assert_one_line_error(result.stderr, message)


def test_relative_data_dir_is_stored_resolved(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_mnist.parent)
    run_dir = tmp_path / "run"
    result = runner.invoke(app, [*flags(Path(tiny_mnist.name), run_dir, epochs=1), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["data_dir"] == str(tiny_mnist)
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["evaluate", str(run_dir)]).exit_code == 0


def test_overwrite_with_invalid_flags_keeps_the_old_run(reference, tiny_mnist, tmp_path):
    run_dir = copy_of(reference, tmp_path)
    for bad in (
        ["--warmup-epochs", "nan"],
        ["--seed", "-1"],
        ["--batch-size", "4096"],
        ["--data-dir", "/nonexistent"],
        ["--augment-rotate", "nan"],
    ):
        result = runner.invoke(app, [*flags(tiny_mnist, run_dir), "--overwrite", *bad])
        assert result.exit_code == 1
        assert_one_line_error(result.stderr)
        assert history(run_dir) == history(reference)
    assert best_steps(run_dir) == best_steps(reference)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a tmpfs")
def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tiny_mnist, tmp_path):
    """Training onto a small tmpfs that fills up mid-run (in a private mount namespace)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = f"""
        mount -t tmpfs -o size=8m tmpfs {disk} || exit 77
        digitjax {" ".join(flags(tiny_mnist, disk / "run", epochs=200))} 2> {tmp_path}/stderr &
        while [ -z "$(ls {disk}/run/latest 2>/dev/null | grep -x '[0-9]*')" ]; do sleep 0.01; done
        dd if=/dev/zero of={disk}/filler bs=4k 2>/dev/null
        wait $!; echo $? > {tmp_path}/status
        rm {disk}/filler
        ls -R {disk}/run > {tmp_path}/listing
        digitjax evaluate {disk}/run --latest --json > {tmp_path}/evaluation
    """
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], timeout=600)
    if done.returncode == 77:
        pytest.skip("cannot mount a tmpfs here")
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "status").read_text().strip() == "1", stderr
    assert_one_line_error(stderr, "No space left on device")
    assert "orbax-checkpoint-tmp" not in (tmp_path / "listing").read_text()
    assert json.loads((tmp_path / "evaluation").read_text())["accuracy"] > 0.2


@pytest.mark.slow
def test_chaos_kills_and_signals_never_lose_the_run(reference, tiny_mnist, tmp_path):
    """kill -9, SIGINT and SIGTERM at random (seeded) moments, some while a checkpoint is
    being written; resuming after each, the run ends exactly as the uninterrupted one."""
    rng = random.Random(13)
    run_dir = tmp_path / "run"
    start = flags(tiny_mnist, run_dir)
    resume = ["train", "--out", str(run_dir), "--resume"]
    events = [
        (signal.SIGKILL, "write"),
        (signal.SIGINT, "time"),
        (signal.SIGKILL, "time"),
        (signal.SIGTERM, "time"),
        (signal.SIGKILL, "write"),
        (signal.SIGINT, "write"),
    ]

    def start_or_resume() -> subprocess.Popen:
        command = resume if checkpoint.usable_steps(run_dir / "latest") else start
        return subprocess.Popen(
            ["digitjax", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def writing() -> bool:
        return bool(list(run_dir.glob("*/*.orbax-checkpoint-tmp*")))

    signal_until_each_lands(events, start_or_resume, writing, run_dir, rng, (1.0, 6.0))
    command = resume if checkpoint.usable_steps(run_dir / "latest") else start
    final = runner.invoke(app, command)
    assert final.exit_code == 0, final.output
    assert_complete_and_consistent(run_dir, reference)
    saved, expected = checkpoint.restore_model(run_dir), checkpoint.restore_model(reference)
    for got, want in zip(jax.tree.leaves(saved.params), jax.tree.leaves(expected.params)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("checksums", 5, "its checksums are not text"),
        ("num_classes", 0, "no class count"),
        ("curve", 5, "its curve is not a list"),
        ("wall_seconds", "x", "its wall time is no number"),
        ("temperature", 1e-300, "invalid temperature 1e-300"),
        ("history", [{"epoch": 1, "step": 30, "test_accuracy": "x"}], "history is not numbers"),
    ],
)
def test_a_forged_summary_is_refused_in_one_line(reference, tmp_path, field, value, message):
    """Each field that evaluating, predicting or resuming reads, forged: one line each, where
    they used to be tracebacks (a TypeError, a ZeroDivisionError deep in Flax) or a NaN
    confidence printed as an answer."""
    run_dir = Path(shutil.copytree(reference, tmp_path / "run"))
    for metadata in run_dir.glob("*/*/summary/metadata"):
        summary = json.loads(metadata.read_text())
        metadata.write_text(json.dumps({**summary, field: value}))
    image = tmp_path / "seven.png"
    Image.fromarray(read_idx_split(MNIST_DIR, "test")[0][0]).save(image)
    for args in (
        ["predict", str(image), "--checkpoint", str(run_dir)],
        ["evaluate", str(run_dir)],
        ["train", "--out", str(run_dir), "--resume"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert_one_line_error(result.stderr, message)


def test_a_folder_without_a_checkpoint_is_restarted_only_when_nothing_would_be_lost(
    reference, tiny_mnist, tmp_path
):
    """Started again in place without --overwrite only where all a run left is what one that
    ended in its first epoch leaves (an empty metrics file among them). The user's own files
    under a run's names, a run whose checkpoint lacks a file (which evaluate may still read)
    and one whose records outlived its checkpoints are refused and left as they are."""
    mine = tmp_path / "mine"
    (mine / "latest").mkdir(parents=True)
    (mine / "latest" / "notes.txt").write_text("mine")
    damaged = Path(shutil.copytree(reference, tmp_path / "damaged"))
    for marker in damaged.glob("*/*/_CHECKPOINT_METADATA"):
        marker.unlink()
    records = tmp_path / "records"  # a run's records, its checkpoints deleted
    records.mkdir()
    shutil.copy(reference / checkpoint.METRICS_FILE, records)
    plotted = tmp_path / "plotted"
    plotted.mkdir()
    (plotted / checkpoint.CURVES_FILE).write_bytes(b"my own plot")
    for run_dir, message in [
        (mine, "latest/notes.txt, which no digitjax run wrote"),
        (damaged, "a checkpoint that is incomplete or damaged"),
        (records, "metrics.jsonl, which a run with no checkpoint never leaves"),
        (plotted, "curves.png, which a run with no checkpoint never leaves"),
    ]:
        before = contents(run_dir)
        result = runner.invoke(app, flags(tiny_mnist, run_dir, epochs=1))
        assert result.exit_code == 1, result.output
        assert_one_line_error(result.stderr, message, "pass --overwrite")
        assert contents(run_dir) == before
    result = runner.invoke(app, ["train", "--out", str(damaged), "--resume"])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, f"cannot resume {damaged}: it holds", "damaged")


def contents(folder: Path) -> dict[Path, bytes]:
    """Every file's bytes but the lock's (which names the last process that held it)."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != checkpoint.LOCK_FILE]
    return {p: p.read_bytes() for p in files}


def test_links_in_a_run_folder_are_replaced_not_followed(reference, tiny_mnist, tmp_path):
    """A link at a run's file name, or at its best/ folder: resuming writes the run's own
    file in the link's place, --overwrite removes the link; what they link to is untouched."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "folder").mkdir(parents=True)
    (elsewhere / "important.txt").write_text("precious")
    (elsewhere / "folder" / "kept.txt").write_text("kept")
    run_dir = tmp_path / "run"

    def stop_after_the_first_epoch(step: int) -> None:
        if step == STEPS_PER_EPOCH:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(
            tiny_config(tiny_mnist),
            run_dir,
            callbacks=Callbacks(on_chunk=stop_after_the_first_epoch),
        )
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").symlink_to(elsewhere / "important.txt")
    result = runner.invoke(app, ["train", "--out", str(run_dir), "--resume"])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "important.txt").read_text() == "precious"
    assert not (run_dir / "metrics.jsonl").is_symlink() and history(run_dir) == history(reference)
    shutil.rmtree(run_dir / "best")
    (run_dir / "best").symlink_to(elsewhere / "folder")
    result = runner.invoke(app, [*flags(tiny_mnist, run_dir, epochs=1), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "folder" / "kept.txt").read_text() == "kept"
    assert (run_dir / "best").is_dir() and not (run_dir / "best").is_symlink()


def test_a_run_folder_under_brackets_is_refused_before_any_work(tiny_mnist, tmp_path):
    """Orbax wrote checkpoints under `runs/a[1]` that it could not read back (its files are
    merged by a pattern made of the path): such a folder is refused, and nothing is made."""
    run_dir = tmp_path / "runs" / "a[1]"
    result = runner.invoke(app, flags(tiny_mnist, run_dir, epochs=1))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "cannot write checkpoints under a path holding [ or ]")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("kind", "message"),
    [("file", "is a file, not a folder"), ("dangling link", "is a link to nothing, not a folder")],
)
def test_an_out_that_is_no_folder_is_named_as_such(tiny_mnist, tmp_path, kind, message):
    """Not `cannot create run folder X: File exists`, which the check behind it never said."""
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine")
    else:
        out.symlink_to(tmp_path / "nowhere")
    result = runner.invoke(app, flags(tiny_mnist, out, epochs=1))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, f"--out {out} {message}")

"""TensorBoard events and --profile traces of real runs, read back with TensorBoard's own
reader."""

import gzip
import io
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, history, read_events, steps_and_values, tiny_train
from PIL import Image
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from typer.testing import CliRunner

from digitjax import checkpoint
from digitjax.benchmark import training_throughput
from digitjax.cli import app
from digitjax.config import Config, UserError
from digitjax.data import load_dataset
from digitjax.distributed import make_mesh
from digitjax.tracking import PROFILED_CHUNKS, EventFile, Trace
from digitjax.train import Schedule, learning_rate_schedule

runner = CliRunner()
STEPS_PER_EPOCH, CHUNK = 30, 3  # of the tiny runs: 1,945 training images in batches of 64
CURVE_TAGS = ("train/loss", "train/accuracy", "train/learning_rate")
EPOCH_TAGS = ("test/loss", "test/accuracy", "test/ece", "test/temperature")


def curve(run_dir: Path) -> list[dict]:
    """The training curve per chunk that the run's latest checkpoint holds."""
    return checkpoint.read_config(run_dir, checkpoint.LATEST)[1]["curve"]


def assert_events_match_the_run(run_dir: Path, epochs: int) -> None:
    """Every curve point and epoch record once, at its step, with the values that the
    checkpoint's curve and metrics.jsonl hold (float32 in the events)."""
    events, records, points = read_events(run_dir), history(run_dir), curve(run_dir)
    total = STEPS_PER_EPOCH * epochs
    assert [p["step"] for p in points] == list(range(CHUNK, total + 1, CHUNK))
    for tag, key in zip(CURVE_TAGS[:2], ("train_loss", "train_accuracy")):
        steps, values = steps_and_values(events, tag)
        assert steps == [p["step"] for p in points], tag
        assert values == pytest.approx([p[key] for p in points], rel=1e-6), tag
    for tag, key in zip(EPOCH_TAGS, ("test_loss", "test_accuracy", "test_ece", "temperature")):
        steps, values = steps_and_values(events, tag)
        assert steps == [r["step"] for r in records] == list(range(30, total + 1, 30)), tag
        assert values == pytest.approx([r[key] for r in records], rel=1e-6), tag
    config, _ = checkpoint.read_config(run_dir, checkpoint.LATEST)
    schedule = Schedule(STEPS_PER_EPOCH * config.batch_size, config.batch_size, epochs)
    learning_rate = learning_rate_schedule(config, schedule)
    steps, values = steps_and_values(events, "train/learning_rate")
    assert steps == [p["step"] for p in points]
    # float32, compiled in the run and op by op here: equal to rounding.
    assert values == pytest.approx([float(learning_rate(s - 1)) for s in steps], rel=1e-5)
    assert max(values) == pytest.approx(config.learning_rate, rel=0.05)  # warmed up, decays
    steps, values = steps_and_values(events, "train/images_per_second")
    assert len(set(steps)) == len(steps) and set(steps) <= {r["step"] for r in records}
    assert all(v > 0 for v in values)


def test_events_hold_the_curves_settings_and_final_images(tiny_run: Path):
    assert_events_match_the_run(tiny_run, epochs=3)
    events = read_events(tiny_run)
    # Each epoch of one uninterrupted session has its training throughput.
    assert steps_and_values(events, "train/images_per_second")[0] == [30, 60, 90]
    for tag in ("test/confusion_matrix", "test/misclassified"):
        [shown] = events.Images(tag)
        image = Image.open(io.BytesIO(shown.encoded_image_string))
        assert shown.step == 90 and image.size == (700, 650), tag
        assert len(np.unique(np.asarray(image.convert("L")))) > 20, "a drawing, not blank"
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    settings = HParamsPluginData.FromString(content).session_start_info.hparams
    assert settings["epochs"].number_value == 3 and settings["channels"].string_value == "4,8"
    assert settings["dataset"].string_value == "mnist"
    experiment = events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    metrics = HParamsPluginData.FromString(experiment).experiment.metric_infos
    assert [m.name.tag for m in metrics] == ["test/accuracy", "test/loss", "test/ece"]
    assert len(list(tiny_run.glob("events.out.tfevents.*"))) == 1


def newest_event_file(run_dir: Path) -> Path:
    return sorted(run_dir.glob("events.out.tfevents.*"))[-1]


def stop_when(process: subprocess.Popen, ready, what: str) -> None:
    """Pauses the process (SIGSTOP) at a moment when `ready()` holds: checked while it is
    paused, so that the moment does not pass while it is checked."""
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"never {what}"
        process.send_signal(signal.SIGSTOP)
        try:
            if ready():
                return
        except BaseException:
            process.kill()  # never leave it stopped
            raise
        process.send_signal(signal.SIGCONT)
        time.sleep(0.02)


def latest_step(run_dir: Path) -> int:
    steps = checkpoint.usable_steps(run_dir / checkpoint.LATEST)
    return int(steps[-1].name) if steps else 0


def last_event_step(run_dir: Path) -> int:
    if not list(run_dir.glob("events.out.tfevents.*")):
        return 0
    events = read_events(run_dir)
    return max((s.step for s in events.Scalars("train/loss")), default=0)


@pytest.mark.slow
def test_resumed_run_shows_every_step_once_after_a_kill_and_a_ctrl_c(tiny_mnist, tmp_path):
    """kill -9 after the run wrote events past its checkpoint (and mid-write: a record cut in
    half), then Ctrl-C mid-epoch: resumed each time, the events are those of one run."""
    epochs = 8
    run_dir = tmp_path / "run"
    start = ["digitjax", *tiny_train(tiny_mnist, run_dir, epochs=epochs)]
    resume = ["digitjax", "train", "--out", str(run_dir), "--resume"]
    process = subprocess.Popen(start, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop_when(
        process,
        lambda: latest_step(run_dir) and last_event_step(run_dir) > latest_step(run_dir) + CHUNK,
        "events past a checkpoint",
    )
    process.kill()
    process.communicate()
    killed_at = latest_step(run_dir)
    assert last_event_step(run_dir) > killed_at  # what the resumed run must hide
    events_file = newest_event_file(run_dir)
    first_record = events_file.read_bytes()[:60]
    with events_file.open("ab") as f:
        f.write(first_record[:20])  # a valid record header, and part of its data

    process = subprocess.Popen(resume, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def mid_epoch() -> bool:
        """A chunk of the resumed session (its file's purge marker hides the killed one's
        later steps), with two more before the epoch's end."""
        if newest_event_file(run_dir) == events_file:
            return False
        step = last_event_step(run_dir)
        return step > killed_at and 0 < step % STEPS_PER_EPOCH <= STEPS_PER_EPOCH - 3 * CHUNK

    stop_when(process, mid_epoch, "a resumed chunk mid-epoch")
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    interrupted_at = latest_step(run_dir)
    assert interrupted_at % STEPS_PER_EPOCH, "saved mid-epoch"
    assert killed_at < interrupted_at < STEPS_PER_EPOCH * epochs

    result = runner.invoke(app, resume[1:])
    assert result.exit_code == 0, result.output
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 3  # one per session
    assert_events_match_the_run(run_dir, epochs)


def test_sessions_started_in_the_same_second_are_read_in_order(tmp_path, monkeypatch):
    """TensorBoard reads a folder's event files in name order: a resumed session's file,
    started in the same second as the one before (or in the same process), must come after
    it, or its purge marker hides the steps it should keep."""
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)  # every file in one second
    first = EventFile(tmp_path, purge_after=None)
    first.write_scalars(10, {"train/loss": 1.0})
    first.write_scalars(20, {"train/loss": 2.0})  # past the checkpoint at 10: to be purged
    first.close()
    second = EventFile(tmp_path, purge_after=10)
    second.write_scalars(20, {"train/loss": 3.0})
    second.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert steps_and_values(read_events(tmp_path), "train/loss") == ([10, 20], [1.0, 3.0])


def test_profile_traces_a_few_chunks_and_changes_nothing(tiny_run, tiny_mnist, tmp_path):
    """The trace is there for TensorBoard's profile plugin and Perfetto; the run's metrics
    are those of the same run without it. A new run in a folder clears old event files."""
    run_dir, profile = tmp_path / "run", tmp_path / "profile"
    run_dir.mkdir()
    (run_dir / "events.out.tfevents.1.elsewhere").write_bytes(b"an earlier run's")
    result = runner.invoke(
        app, [*tiny_train(tiny_mnist, run_dir, epochs=3), "--profile", str(profile)]
    )
    assert result.exit_code == 0, result.output
    assert history(run_dir) == history(tiny_run)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert_trace(profile)


def assert_trace(profile: Path) -> None:
    """One trace, in both forms: XProf's (.xplane.pb) and Perfetto's (.json.gz), holding the
    calls of the compiled chunk that it traced (the first chunk, which compiles, is not)."""
    [trace_dir] = (profile / "plugins" / "profile").iterdir()
    [xplane] = trace_dir.glob("*.xplane.pb")
    assert xplane.stat().st_size > 10_000
    with gzip.open(trace_dir / "perfetto_trace.json.gz") as f:
        names = [event.get("name", "") for event in json.load(f)["traceEvents"]]
    calls = [name for name in names if name.startswith("PjitFunction") and "train_chunk" in name]
    assert len(calls) >= PROFILED_CHUNKS, calls


def test_benchmark_profiles_the_timed_chunk(tiny_mnist, tmp_path):
    config = Config(channels=(4, 8), dense=16, batch_size=64)
    dataset = load_dataset("mnist", tiny_mnist)
    measured = training_throughput(config, dataset, 4, 1, make_mesh(1), tmp_path / "profile")
    assert measured["images_per_s"] > 0
    assert_trace(tmp_path / "profile")


@pytest.mark.parametrize("command", ["train", "benchmark"])
def test_profile_into_a_file_is_one_clean_line_before_any_work(command, tiny_mnist, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    args = tiny_train(tiny_mnist, tmp_path / "run", epochs=1) if command == "train" else [command]
    result = runner.invoke(app, [*args, "--profile", str(not_a_folder)])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "--profile", "is a file, not a folder")
    assert not (tmp_path / "run").exists()


def fill_the_disk_as_the_trace_is_written(
    monkeypatch, named: Callable[[], Path], then: Callable[[], None] = lambda: None
) -> None:
    """jax.profiler.stop_trace writes the trace, then (after `then`) fails as JAX does when
    the disk fills, naming the file `named()`."""
    import jax

    real_stop = jax.profiler.stop_trace

    def stop_on_a_full_disk() -> None:
        real_stop()
        then()
        raise jax.errors.JaxRuntimeError(f"RESOURCE_EXHAUSTED: {named()}; No space left on device")

    monkeypatch.setattr(jax.profiler, "stop_trace", stop_on_a_full_disk)


def test_a_trace_that_cannot_be_written_costs_the_run_nothing(
    tiny_run, tiny_mnist, tmp_path, monkeypatch
):
    """--profile on a full disk: the training goes on to its end, every epoch checkpointed
    as without --profile, and only then the one error line; no half-written trace is left."""
    run_dir, profile = tmp_path / "run", tmp_path / "profile"
    fill_the_disk_as_the_trace_is_written(monkeypatch, lambda: profile)
    result = runner.invoke(
        app, [*tiny_train(tiny_mnist, run_dir, epochs=3), "--profile", str(profile)]
    )
    assert result.exit_code == 1
    assert_one_line_error(
        result.stderr, "--profile", "cannot write the trace: No space left on device",
        "the run itself is complete",
    )  # fmt: skip
    assert history(run_dir) == history(tiny_run)
    assert checkpoint.usable_steps(run_dir / checkpoint.LATEST)
    assert not profile.exists()


def test_a_trace_that_cannot_be_written_is_told_in_the_interrupt_line(
    tiny_mnist, tmp_path, monkeypatch
):
    """Ctrl-C after the trace failed: the run stops and saves as any interrupted run, and its
    one last line tells of the trace too, which the run could no longer report after it."""
    import os

    run_dir, profile = tmp_path / "run", tmp_path / "profile"

    def ctrl_c() -> None:
        os.kill(os.getpid(), signal.SIGINT)

    fill_the_disk_as_the_trace_is_written(monkeypatch, lambda: profile, then=ctrl_c)
    result = runner.invoke(
        app, [*tiny_train(tiny_mnist, run_dir, epochs=3), "--profile", str(profile)]
    )
    stopped_at = CHUNK * (1 + PROFILED_CHUNKS)  # the chunk whose end stops the trace
    assert result.exit_code == 128 + signal.SIGINT, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "SIGINT" in line]
    assert line.startswith(f"SIGINT at step {stopped_at}: saved to"), result.stderr
    assert line.endswith(
        "; --profile " + str(profile) + ": cannot write the trace: No space left on device"
    )
    assert "Traceback" not in result.stderr and "error:" not in result.stderr
    assert latest_step(run_dir) == stopped_at
    assert not profile.exists()


@pytest.mark.parametrize("existed", [False, True])
def test_a_trace_that_cannot_be_written_leaves_none_of_its_files(tmp_path, monkeypatch, existed):
    """A full disk while JAX writes the trace: one UserError, the half-written trace removed,
    what was in the folder before kept, and no folder made for it left (benchmark traces
    into a folder inside --profile)."""
    folder = tmp_path / "profile" / "batch-64"
    if existed:
        (folder / "earlier").mkdir(parents=True)
        (folder / "earlier" / "trace.pb").write_text("an earlier trace")
    # As if the disk had filled midway through the trace's file.
    fill_the_disk_as_the_trace_is_written(monkeypatch, lambda: next(folder.rglob("*.xplane.pb")))
    trace = Trace(folder)
    with pytest.raises(UserError, match="cannot write the trace: No space left on device$"):
        trace.stop()
    if existed:
        assert sorted(folder.rglob("*")) == [folder / "earlier", folder / "earlier" / "trace.pb"]
    else:
        assert not (tmp_path / "profile").exists()

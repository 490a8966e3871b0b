"""What a run shows outside the terminal: TensorBoard event files in its folder, and with
--profile a `jax.profiler` trace of a few of its chunks. `train` holds one `RunTracker` per
run it trains (one per seed with --seeds: each seed's folder has its events) and feeds it on
process 0 only.

The events are written synchronously, one flush per chunk, with tensorboardX's event file
writer and summary protos rather than its `SummaryWriter`: that one writes from a background
thread whose failure (a full disk) leaves the run waiting on a queue forever, and whose flush
does not wait for the events still queued. So every event of a chunk or an epoch is on disk
before the next chunk starts, and before any checkpoint that covers it (`train._end_epoch`).

A resumed run starts its new event file with TensorBoard's purge marker (a SessionLog START
one step past its checkpoint): TensorBoard's readers drop whatever the interrupted session
wrote after that checkpoint, which the resumed run writes again, so every step shows once and
none is missing. A record that a kill cut in half only ends its file; readers go on to the
next one.
"""

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from digitjax.config import Config, UserError, reason
from digitjax.distributed import to_host
from digitjax.evaluate import Metrics
from digitjax.outputs import check_writable

if TYPE_CHECKING:  # train imports this module
    from digitjax.train import TrainingSetup

# The chunks traced by --profile: those after the first, which compiles.
PROFILED_CHUNKS = 3
# The scalars that TensorBoard's HParams tab shows beside each run's settings.
HPARAM_METRICS = ("test/accuracy", "test/loss", "test/ece")


class Trace:
    """A `jax.profiler` trace into `folder`, from now until `stop`, which writes it. A trace
    that cannot be written (a full disk) leaves none of its files and ends in one UserError:
    JAX's own error would be a traceback, and its half-written file a trace no viewer reads."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.existed = set(folder.rglob("*")) if folder.exists() else set()
        # The folders JAX will create (benchmark's --profile and its batch folder inside):
        # removed with a failed trace, deepest first.
        self.new_folders = [p for p in (folder, *folder.parents) if not p.exists()]
        jax.profiler.start_trace(str(folder), create_perfetto_trace=True)

    def stop(self) -> None:
        try:
            jax.profiler.stop_trace()
        except Exception as e:  # jax.errors.JaxRuntimeError: "<status>: <file>; <reason>"
            self._remove_what_it_wrote()
            why = reason(e).rsplit("; ", 1)[-1]
            raise UserError(f"--profile {self.folder}: cannot write the trace: {why}") from None

    def _remove_what_it_wrote(self) -> None:
        written = set(self.folder.rglob("*")) - self.existed
        for path in sorted(written, key=lambda p: len(p.parts), reverse=True):  # files first
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
        for folder in self.new_folders:
            with contextlib.suppress(OSError):
                folder.rmdir()


class RunTracker:
    """Writes a run's events into its folder and, into `profile`, a trace of chunks 2 to
    1 + PROFILED_CHUNKS of this session. `close` ends both, on every way out of the run;
    `check_trace` then tells of a trace that could not be written, once the run has ended."""

    def __init__(self, profile: Path | None = None):
        check_writable("--profile", profile, folder=True)
        self.profile = profile
        self.chunks = 0  # ended in this session
        self.trace: Trace | None = None  # while tracing
        self.trace_failure: str | None = None  # why the trace could not be written
        self.events: EventFile | None = None
        self.setup: TrainingSetup | None = None
        self.learning_rate: Any = None  # the optimizer's schedule, compiled
        self.last_chunk: tuple[int, float] | None = None  # its step, and when it ended
        self.timed_images, self.timed_seconds = 0, 0.0  # this epoch's, for images/s

    def on_start(self, setup: "TrainingSetup", config: Config, run_dir: Path, step: int) -> None:
        """Opens this session's event file in `run_dir`, whose run (`config`: its seed's, in
        a --seeds run) is at `step`."""
        self.setup = setup
        # Compiled: evaluated op by op, its first call costs ~0.3 s of CPU here; 0.05 s so.
        self.learning_rate = jax.jit(setup.learning_rate)
        self.events = EventFile(run_dir, purge_after=step if step else None)
        if not step:
            self.events.write_hparams(config.to_dict())

    def on_curve(self, point: dict) -> None:
        """Training loss and accuracy of the chunk, and the learning rate of its last step."""
        step, now = point["step"], time.perf_counter()
        setup, events = self._started()
        steps_per_epoch = setup.schedule.steps_per_epoch
        # Images/s counts the chunks that followed another of the same epoch in this session:
        # not the session's first (it compiles) nor an epoch's first (the previous epoch's
        # evaluation and checkpoint ran between it and its predecessor).
        if self.last_chunk is not None and self.last_chunk[0] % steps_per_epoch:
            self.timed_images += (step - self.last_chunk[0]) * setup.config.batch_size
            self.timed_seconds += now - self.last_chunk[1]
        self.last_chunk = (step, now)
        events.write_scalars(
            step,
            {
                "train/loss": point["train_loss"],
                "train/accuracy": point["train_accuracy"],
                "train/learning_rate": float(np.asarray(self.learning_rate(step - 1))),
            },
        )

    def on_chunk(self, done_steps: int) -> None:
        """Starts the trace after the session's first chunk and stops it PROFILED_CHUNKS
        later. The loop has read each chunk's results back (its epoch totals) before this
        runs, so the traced chunks' work is all inside the trace."""
        self.chunks += 1
        if self.profile is not None and self.chunks == 1:
            self.trace = Trace(self.profile)
        elif self.chunks == 1 + PROFILED_CHUNKS:
            self._stop_trace()

    def on_evaluated(self, record: dict, metrics: Metrics) -> None:
        """The epoch's test figures and training throughput; after the last epoch, the
        confusion matrix and the misclassified test digits as images."""
        scalars = {
            "test/loss": record["test_loss"],
            "test/accuracy": record["test_accuracy"],
            "test/ece": record["test_ece"],
        }
        if record["temperature"] is not None:
            scalars["test/temperature"] = record["temperature"]
        if self.timed_seconds:
            scalars["train/images_per_second"] = self.timed_images / self.timed_seconds
        self.timed_images, self.timed_seconds = 0, 0.0
        setup, events = self._started()
        events.write_scalars(record["step"], scalars)
        if record["step"] == setup.schedule.total_steps:
            from digitjax.plots import confusion_figure, misclassified_figure

            labels = setup.test_labels
            images = to_host(setup.test_images)[: len(labels)]
            events.write_figures(
                record["step"],
                {
                    "test/confusion_matrix": confusion_figure(metrics),
                    "test/misclassified": misclassified_figure(metrics, images, labels),
                },
            )

    def close(self) -> None:
        try:
            self._stop_trace()
        finally:
            if self.events is not None:
                self.events.close()

    def check_trace(self) -> None:
        """After a run that ended whole (and `close`): the trace's failure, if it had one. It
        is told then, not when it happened, so that a trace that cannot be written (a full
        disk under --profile) costs the run nothing."""
        if self.trace_failure is not None:
            raise UserError(f"{self.trace_failure}; the run itself is complete")

    def _stop_trace(self) -> None:
        """Writes the trace, if one is running; a failure is kept for `check_trace`."""
        trace, self.trace = self.trace, None
        if trace is not None:
            try:
                trace.stop()
            except UserError as e:
                self.trace_failure = str(e)

    def _started(self) -> tuple["TrainingSetup", "EventFile"]:
        if self.setup is None or self.events is None:
            raise RuntimeError("on_start comes before any chunk")
        return self.setup, self.events


class EventFile:
    """This session's event file in the run folder: events.out.tfevents.<time>.<host>.<n>,
    n counting the run's sessions. TensorBoard reads a folder's files in the order of their
    names, so two sessions started in the same second must sort by n (the process id they
    once ended with put a resumed run's last session before the one it resumed whenever its
    id was the smaller); the run's lock keeps two from counting at once."""

    def __init__(self, run_dir: Path, purge_after: int | None):
        from tensorboardX.event_file_writer import EventsWriter

        self.run_dir = run_dir
        session = len(list(run_dir.glob("events.out.tfevents.*"))) + 1
        self.writer = self._writing(EventsWriter, str(run_dir / "events"), f".{session:05d}")
        if purge_after is not None:
            from tensorboardX.proto.event_pb2 import (
                SessionLog,  # pyright: ignore[reportAttributeAccessIssue]
            )

            self._write(purge_after + 1, session_log=SessionLog(status=SessionLog.START))

    def write_hparams(self, config: dict[str, Any]) -> None:
        """The run's settings, for the HParams tab (a tuple as its flag writes it; data_dir
        None, the default dataset, as "")."""
        from tensorboardX.summary import hparams

        shown = {
            name: ",".join(map(str, value)) if isinstance(value, tuple) else value
            for name, value in config.items()
        }
        shown = {name: "" if value is None else value for name, value in shown.items()}
        experiment, session_start, _ = hparams(shown, dict.fromkeys(HPARAM_METRICS))
        self._write_summaries(0, [experiment, session_start])

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboardX.summary import scalar

        self._write_summaries(step, [scalar(tag, value) for tag, value in scalars.items()])

    def write_figures(self, step: int, figures: dict[str, Any]) -> None:
        """Matplotlib figures, as images (closed once drawn)."""
        from tensorboardX.summary import image
        from tensorboardX.utils import figure_to_image

        self._write_summaries(
            step, [image(tag, figure_to_image(figure)) for tag, figure in figures.items()]
        )

    def close(self) -> None:
        """Everything was flushed as it was written: a failure to close loses nothing, and
        must not hide the error that may be ending the run."""
        try:
            self.writer.close()
        except OSError:
            pass

    def _write_summaries(self, step: int, summaries: list[Any]) -> None:
        """Summaries of one step, as one event."""
        summary, *others = summaries
        for other in others:
            summary.value.extend(other.value)
        self._write(step, summary=summary)

    def _write(self, step: int, **content: Any) -> None:
        """An event, flushed: on disk before the loop goes on."""
        # A generated protobuf module, whose classes appear at run time, out of pyright's sight.
        from tensorboardX.proto.event_pb2 import (
            Event,  # pyright: ignore[reportAttributeAccessIssue]
        )

        self._writing(self.writer.write_event, Event(wall_time=time.time(), step=step, **content))
        self._writing(self.writer.flush)

    def _writing(self, write: Any, *args: Any) -> Any:
        try:
            return write(*args)
        except OSError as e:
            raise UserError(
                f"cannot write TensorBoard events in {self.run_dir}: {reason(e)}"
            ) from None

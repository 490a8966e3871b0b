"""Terminal output: the training progress bar and the tables of each command (rich, on
stdout for results and stderr for progress and messages)."""

import json
import math
import statistics
import sys
import time
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from digitjax.config import UserError

if TYPE_CHECKING:  # train imports JAX: not at start-up
    from digitjax.benchmark import BenchmarkResults
    from digitjax.evaluate import Evaluation
    from digitjax.seeds import SeedsResult
    from digitjax.train import RunSummary

out = Console()  # writes to sys.stdout as it is at each call: `GuardedStdout` in a command
err = Console(stderr=True, soft_wrap=True)  # messages stay whole lines, at any width


class GuardedStdout:
    """The command's sys.stdout: a write that fails (a full disk, a file size limit) ends the
    command with one `error:` line that names standard output, which the OSError alone does
    not ("[Errno 28] No space left on device"), and the rest of the output is dropped, so
    that the bytes left in the buffer do not fail again at the last flush. A reader that
    left (`| head`) still raises BrokenPipeError, which ends the command quietly."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._failed = False

    def write(self, text: str) -> int:
        return len(text) if self._failed else self._guarded(self._stream.write, text)

    def flush(self) -> None:
        if not self._failed:
            self._guarded(self._stream.flush)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the stream's
        return getattr(self._stream, name)

    def _guarded(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            self._failed = True
            raise UserError(f"cannot write to standard output: {e.strerror or e}") from None


def print_json(document: Any) -> None:
    try:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # its reader left (`| head`): end quietly, as rich ends a table
        out.on_broken_pipe()


def printable(text: str) -> str:
    """`text` with its control characters shown as `?`, as `ls` shows them: a file name can
    hold terminal escape sequences (recolouring, clearing the screen) or line breaks."""
    return "".join("?" if unicodedata.category(c) == "Cc" else c for c in text)


def as_markup(text: object) -> str:
    """`text` (a path, a message) inside a line of rich markup: its control characters as `?`
    (`printable`), its brackets not taken for markup."""
    return escape(printable(str(text)))


def note(message: str) -> None:
    err.print(printable(message), highlight=False, markup=False)


def error_line(message: str) -> None:
    # The message is plain text: `pip install 'digitjax[onnx]'` must not lose `[onnx]` as markup.
    err.print(f"[red]error:[/red] {as_markup(message)}", highlight=False, markup=True)


class TrainingProgress:
    """A progress bar over the steps and a line per epoch, on stderr (process 0 only)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=quiet,
        )
        self.task: TaskID | None = None  # added when training starts
        self.started = 0.0  # when training started: the epoch lines' clock, as the run's

    def __enter__(self) -> "TrainingProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        # Started only with the training: a bar stopped unstarted would leave a blank line
        # before an input error's line.
        if self.task is not None:
            self.progress.stop()

    def callbacks(self) -> Any:
        from digitjax.train import Callbacks

        return Callbacks(
            on_start=self.on_start,
            on_chunk=self.on_chunk,
            on_epoch=self.on_epoch,
            on_detector=self.on_detector,
        )

    def on_start(self, setup: Any, run_dir: Path, done_steps: int) -> None:
        import jax

        devices, processes = setup.mesh.size, jax.process_count()
        seeds = f"seeds {','.join(map(str, setup.seeds))} at once, " if setup.seeds else ""
        err.print(
            f"Training on {setup.config.dataset} → {as_markup(run_dir)} ({seeds}{devices} "
            f"{jax.default_backend()} device{'s' if devices > 1 else ''}, {processes} "
            f"process{'es' if processes > 1 else ''})",
            highlight=False,
        )
        if setup.config.dtype == "bfloat16" and jax.default_backend() == "cpu":
            err.print(
                "[yellow]note:[/yellow] bfloat16 runs ~2x slower than float32 on CPUs; "
                "it pays off on GPUs and TPUs",
                highlight=False,
            )
        total = setup.schedule.total_steps
        self.started = time.perf_counter()
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done_steps)

    def on_chunk(self, done_steps: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=done_steps)

    def on_epoch(self, record: dict) -> None:
        if not self.quiet:
            seed = f"seed {record['seed']} " if "seed" in record else ""  # with --seeds
            self.progress.console.print(
                f"{seed}epoch {record['epoch']:>3}  train loss {record['train_loss']:.4f} "
                f"acc {100 * record['train_accuracy']:.2f}%  test loss {record['test_loss']:.4f} "
                f"acc {100 * record['test_accuracy']:.2f}% ECE {100 * record['test_ece']:.2f}%  "
                f"[dim]{time.perf_counter() - self.started:.1f}s[/dim]",
                highlight=False,
            )

    def on_detector(self, run_dir: Path) -> None:
        if not self.quiet:
            self.progress.console.print(
                f"Fitting the non-digit detector of {as_markup(run_dir)} (~1 min; up to "
                "~10 min the first time on a machine, which draws its images and caches them)",
                highlight=False,
            )


def training_done(summary: "RunSummary | SeedsResult", run_dir: Path) -> None:
    if "seeds" in summary:
        seeds_done(summary, run_dir)
        return
    best = summary["best"] or {"test_accuracy": float("nan"), "epoch": None}
    err.print(
        f"Done: best test accuracy {100 * best['test_accuracy']:.2f}% "
        f"(epoch {best['epoch']}); checkpoints in {as_markup(run_dir)} "
        f"[dim]({summary['wall_seconds']:.1f}s)[/dim]",
        highlight=False,
    )


def seeds_done(summary: "SeedsResult", run_dir: Path) -> None:
    for seed, run in zip(summary["seeds"], summary["runs"], strict=True):
        best = run["best"] or {"test_accuracy": float("nan"), "epoch": None}
        err.print(
            f"seed {seed}: best test accuracy {100 * best['test_accuracy']:.2f}% "
            f"(epoch {best['epoch']})",
            highlight=False,
        )
    accuracy = summary["best_test_accuracy"]
    std = "" if accuracy["std"] is None else f" ± {100 * accuracy['std']:.2f}"
    err.print(
        f"Done: best test accuracy {100 * (accuracy['mean'] or float('nan')):.2f}%{std} "
        f"(mean{' ± std' if std else ''} of {len(summary['seeds'])} seeds); checkpoints in "
        f"{as_markup(run_dir)}, their ensemble: digitjax evaluate {as_markup(run_dir)} "
        f"[dim]({summary['wall_seconds']:.1f}s)[/dim]",
        highlight=False,
    )


def evaluation(report: "Evaluation") -> None:
    """A `--seeds` run's report: each seed's line, then the whole report of their ensemble."""
    for each in report.seeds:
        evaluation_line(each.step_dir, each.dataset, each.split, each.metrics)
    if report.seeds:
        accuracies = [each.metrics.accuracy for each in report.seeds]
        std = f" ± {100 * statistics.stdev(accuracies):.2f}" if len(accuracies) > 1 else ""
        calibrated = [each.metrics.temperature is not None for each in report.seeds]
        probabilities = (
            "calibrated probabilities"
            if all(calibrated)
            else "probabilities: plain softmax, they have no temperature"
            if not any(calibrated)
            else "probabilities, calibrated where a seed has a temperature"
        )
        out.print(
            f"{len(accuracies)} seeds: accuracy {100 * statistics.fmean(accuracies):.2f}%{std} "
            f"(mean ± std); their ensemble (the mean of their {probabilities}):",
            highlight=False,
        )
    metrics = report.metrics
    evaluation_line(report.step_dir, report.dataset, report.split, metrics)
    if metrics.temperature is None and report.seeds:
        calibration = "the ensemble's mean probabilities"
    elif metrics.temperature is None:
        calibration = "no temperature in this checkpoint: the plain softmax"
    else:
        calibration = (
            f"temperature {metrics.temperature:.4f}; without it ECE "
            f"{100 * metrics.uncalibrated_ece:.2f}%, loss {metrics.uncalibrated_loss:.4f}"
        )
    out.print(
        f"calibration: ECE [bold]{100 * metrics.ece:.2f}%[/bold] ({calibration})",
        highlight=False,
    )
    if report.non_digit_flagged is not None:
        out.print(
            f"non-digit detector: flags {100 * report.non_digit_flagged:.2f}% of these images",
            highlight=False,
        )
    per_class = Table("class", "precision", "recall", "F1", "support", title="Per class")
    for name, values in metrics.to_dict()["per_class"].items():
        per_class.add_row(
            name,
            *(f"{100 * values[k]:.2f}" for k in ("precision", "recall", "f1")),
            str(values["support"]),
        )
    out.print(per_class)
    confusion = Table("true \\ pred", *metrics.class_names, title="Confusion matrix")
    for i, (name, row) in enumerate(zip(metrics.class_names, metrics.confusion)):
        confusion.add_row(
            name,
            *(f"[bold]{n}[/bold]" if i == j else (str(n) if n else "·") for j, n in enumerate(row)),
        )
    out.print(confusion)


def evaluation_line(step_dir: Path, dataset: str, split: str, metrics: Any) -> None:
    out.print(
        f"[bold]{as_markup(step_dir)}[/bold] on {dataset} {split}: accuracy "
        f"[bold]{100 * metrics.accuracy:.2f}%[/bold], loss {metrics.loss:.4f} "
        f"({int(metrics.confusion.sum())} images)",
        highlight=False,
    )


def percent(probability: float) -> str:
    """To one decimal, rounded down: 99.97% reads 99.9%, not 100.0%, which would claim a
    certainty the model does not have (and read oddly beside "not sure"). The page does the
    same (static/app.js)."""
    return f"{math.floor(round(1000 * probability, 6)) / 10:.1f}%"


def predictions(
    source: Path,
    results: list,
    min_confidence: float | None,
    detects_non_digits: bool,
    missing: int = 0,
) -> None:
    """The table, then a line counting the digits, the flagged ones and the failures, and
    what the model cannot flag. The last `missing` results are paths that named no image (no
    such file, a folder without images): counted apart from the images."""
    names = [printable(p.name) for p in results]
    width, with_top = path_column_width(names, out.width)
    table = Table(title=as_markup(source))
    table.add_column("file", width=width, no_wrap=True)
    table.add_column("digit", no_wrap=True)
    table.add_column("confidence", no_wrap=True)
    if with_top:
        table.add_column("top 3")
    for p, name in zip(results, names, strict=True):
        path = path_tail(name, width)
        if p.error:
            error = f"[red]{as_markup(p.error)}[/red]"
            table.add_row(path, "[red]—[/red]", "", *[error] if with_top else [])
            continue
        top = "  ".join(f"{d}: {percent(prob)}" for d, prob in p.top())
        # A non-digit's confidence is its top digit's: beside "not a digit", it would read as
        # how sure the model is that it is none.
        confidence = "" if p.verdict == "not_a_digit" else percent(p.confidence)
        digit = {
            "digit": f"[bold]{p.digit}[/bold]",
            "not_sure": f"[yellow]{p.digit}?[/yellow]",
            "not_a_digit": "[yellow]not a digit[/yellow]",
        }[p.verdict]
        table.add_row(path, digit, confidence, *[top] if with_top else [])
    out.print(table)
    counts = {v: sum(p.verdict == v for p in results) for v in ("digit", "not_sure", "not_a_digit")}
    marked = (
        f"[yellow]{counts['not_sure']} not sure[/yellow] (?: confidence below "
        f"{100 * min_confidence:g}%), [yellow]{counts['not_a_digit']} not a digit[/yellow]"
        if min_confidence is not None
        else f"[yellow]{counts['not_a_digit']} not a digit[/yellow], none marked not sure "
        "(the model has no temperature; see --min-confidence)"
    )
    from digitjax.inference.preprocess import NO_DIGIT_FOUND

    images = len(results) - missing
    no_digit = sum(p.error == NO_DIGIT_FOUND for p in results)
    unreadable = sum(p.error not in (None, NO_DIGIT_FOUND) for p in results) - missing
    out.print(
        f"{images} image{'s' if images != 1 else ''}: {counts['digit']} "
        f"recognized, {marked}, {no_digit} without a digit found"
        + (f", [red]{unreadable} unreadable[/red]" if unreadable else "")
        + (
            f"; [red]{missing} path{'s' if missing != 1 else ''} naming no image[/red]"
            if missing
            else ""
        ),
        highlight=False,
    )
    if not detects_non_digits:
        out.print(
            "This model has no non-digit detector: it flags few images that hold no digit "
            '(give it one: docs/predicting.md, "Not a digit").',
            highlight=False,
        )


def path_column_width(paths: list[str], terminal_width: int) -> tuple[int, bool]:
    """Predict's file column, and whether the top 3 has room beside it: the longest path if it
    fits beside a whole top 3, else what the terminal leaves, but at least `…/name` while the
    top 3 keeps 12 cells to wrap in. A terminal too narrow for both shows the names and no
    top 3 (`--json` and `--csv` have it): a table of results no one can match to files is
    no use."""
    room = terminal_width - 28  # borders, padding, the digit and confidence columns
    longest = max(map(cell_len, paths), default=1)
    names = max((cell_len(Path(path).name) + 2 for path in paths), default=1)
    if room - 12 < min(names, longest):
        # Its three cells of border are room too, but "not a digit" takes six more than "digit".
        return max(1, min(longest, room - 3)), False
    return max(1, min(longest, max(names, room - 27), room - 12)), True


def path_tail(path: str, width: int) -> Text:
    """The path in `width` cells, cut at its start, not at the end that tells files apart:
    `…/photos/seven.png`, never `/home/me/pho…`."""
    if cell_len(path) <= width:
        return Text(path)
    start, cells = len(path), 1  # the ellipsis takes one cell
    while start > 0 and cells + cell_len(path[start - 1]) <= width:
        start -= 1
        cells += cell_len(path[start])
    return Text("…" + path[start:])


def cpu_details(machine: dict) -> str:
    """What tells a CPU from its namesakes, as "family 25 model 1 stepping 1; avx2, fma"."""
    return "; ".join(filter(None, [machine["cpu_model"], ", ".join(machine["cpu_vector_flags"])]))


def benchmark(results: "BenchmarkResults") -> None:
    machine = results["machine"]
    table = Table(
        "measurement",
        "value",
        title=f"digitjax benchmark: {machine['cpu']} ({cpu_details(machine)}), "
        f"{results['devices_used']} of {len(machine['all_devices'])} {machine['backend']} "
        f"device(s), jax {machine['versions']['jax']}",
    )
    table.add_row("float32 matmul peak", f"{results['matmul_peak']['gflops']:.0f} GFLOP/s")
    for run in results["training"]:
        for label, value in _training_rows(run):
            table.add_row(label, value)
    inference = results["inference"]
    table.add_row(
        "inference (test set)",
        f"{inference['images_per_s']:,.0f} img/s, compile {inference['compile_s']:.2f} s",
    )
    if "time_to_accuracy" in results:
        reached = results["time_to_accuracy"]
        epochs = reached["config"]["epochs"]  # its recipe's, not the preset's (benchmark.py)
        table.add_row(
            f"time to {100 * reached['target']:.1f}% test accuracy",
            f"{reached['seconds']:.1f} s (epoch {reached['epochs']:.2f} of {epochs})"
            if reached["reached"]
            else f"not reached in {reached['seconds']:.0f} s, {epochs} epoch(s) "
            f"(final {100 * reached['final_accuracy']:.2f}%)",
        )
    out.print(table)


def _training_rows(run: dict) -> list[tuple[str, str]]:
    low, high = run["images_per_s_range"]
    batch = run["batch_size"]
    rows = [
        (
            f"train, batch {batch}",
            f"{run['images_per_s']:,.0f} img/s ({low:,.0f}..{high:,.0f}), "
            f"{run['gflops']:.0f} GFLOP/s = {100 * run['fraction_of_peak']:.0f}% of peak",
        ),
        (f"train compile, batch {batch}", f"{run['compile_s']:.2f} s"),
    ]
    if "host_fed_baseline" in run:
        rows.append(
            (
                f"host-fed baseline, batch {batch}",
                f"{run['host_fed_baseline']['images_per_s']:,.0f} img/s "
                f"(digitjax {run['speedup_over_host_fed']:.1f}x faster)",
            )
        )
    return rows


def exported(written: dict, out_file: Path) -> None:
    accuracy = written["metadata"]["test_accuracy"]
    out.print(
        f"{as_markup(written['metadata']['checkpoint'])} → {as_markup(out_file)} "
        f"({written['format']}, "
        f"{written['bytes']:,} bytes"
        + (f", test accuracy {100 * accuracy:.2f}%)" if accuracy is not None else ")"),
        highlight=False,
    )

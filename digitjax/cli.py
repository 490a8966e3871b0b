"""The `digitjax` command: each command parses its flags, calls the library once and renders
the result. Heavy imports (JAX, Orbax) happen inside the commands, so `--help` is instant."""

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from typer.core import TyperCommand, TyperGroup

from digitjax import __version__, interrupts, render
from digitjax.compilation import enable_compilation_cache
from digitjax.config import Config, Interrupted, UserError, chosen_settings
from digitjax.flags import (
    CONFIG_FIELDS,
    BatchSizesFlag,
    CoordinatorFlag,
    DevicesFlag,
    DistributedFlag,
    ExportedModelFlag,
    JsonFlag,
    MinConfidenceFlag,
    ModelCheckpointFlag,
    NumProcessesFlag,
    OutFlag,
    OverwriteFlag,
    PresetFlag,
    ProcessIdFlag,
    ProfileFlag,
    ReplaceOutputsFlag,
    ResumeFlag,
    SeedsFlag,
    TargetFlag,
    positive_ints,
    setting,
)
from digitjax.outputs import (
    check_distinct,
    check_output,
    check_replaceable,
    check_writable,
    write_file,
    writing,
)

# Typer 0.26+ carries its own copy of click: take click's exception class from Typer.
CLICK_ERROR: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _flags_take_no_value(params: list[Any]) -> list[Any]:
    """Typer shows a `<bool>` beside a flag (--json, --help), which takes no value: none."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class PlainFlags(TyperCommand):
    """Every command's class: its --help shows flags without a type."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))


class OneLineErrors(TyperGroup):
    """Flag errors (`--epochs abc`, a typo) read like every other error: one `error:` line
    and exit status 2, instead of a boxed usage panel. Ctrl-C and SIGTERM, wherever they land
    (see digitjax/interrupts.py), end in one line and exit status 130 or 143."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        with interrupts.stop_on_signals():
            try:
                try:
                    result = super().main(*args, standalone_mode=False, **kwargs)
                except CLICK_ERROR as e:
                    ctx = getattr(e, "ctx", None)
                    hint = f"; see '{ctx.command_path} --help'" if ctx else ""
                    message = e.format_message().rstrip(".")
                    if message:  # none after `digitjax` alone: the help it printed says it all
                        render.error_line(f"{message}{hint}")
                    result = e.exit_code
                except typer.Abort:
                    result = 130
                except UserError as e:  # outside a command: --help or --version not written
                    render.error_line(str(e))
                    result = 1
            except interrupts.Stopped:  # one more, while the outcome above was being shown
                result = 130
            with interrupts.recorded_only():
                signum = interrupts.received()
                if signum is not None:  # Typer makes the interrupt exit status 130, silently
                    render.err.print("[yellow]interrupted[/yellow]")
                    result = 128 + signum
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, evaluate and use handwritten-digit CNNs with JAX.",
)


def _show_version(value: bool) -> None:
    if value:
        print(f"digitjax {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="Print the version.",
        ),
    ] = False,
) -> None:
    """Train, evaluate and use handwritten-digit CNNs with JAX."""


def user_errors(command: Callable) -> Callable:
    """Bad input ends in one line on stderr and a non-zero exit, never a traceback. A stop
    signal wins over whatever else happened, even where its exception was swallowed on the
    way (OneLineErrors reports it)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return command(*args, **kwargs)
            finally:
                interrupts.check()
        except Interrupted as e:
            render.err.print(f"[yellow]{render.as_markup(e)}[/yellow]", highlight=False)
            raise typer.Exit(e.exit_code) from None
        except (UserError, OSError) as e:
            render.error_line(str(e))
            raise typer.Exit(1) from None

    return wrapper


def write_output(flag: str, path: Path, what: str, write: Callable[..., Any], *args: Any) -> None:
    """A file the user asked for, written after the results are shown (so that a failed write
    loses nothing else) and named on stderr."""
    with writing(flag, path):
        write(*args)
    render.note(f"{what} written to {path}")


def check_plot_format(plot: Path | None) -> None:
    if plot is not None:
        from digitjax.plots import check_format  # matplotlib: only when a figure is asked for

        check_format("--plot", plot)


def chosen_model(checkpoint_path: Path | None, model: Path | None) -> Path | None:
    """The model of --checkpoint or --model (None: the default one)."""
    if model is not None and checkpoint_path is not None:
        raise UserError("pass --checkpoint or --model, not both")
    return model or checkpoint_path


@app.command(cls=PlainFlags)
@user_errors
def train(
    dataset: Annotated[str | None, setting("dataset")] = None,
    data_dir: Annotated[str | None, setting("data_dir")] = None,
    epochs: Annotated[int | None, setting("epochs")] = None,
    batch_size: Annotated[int | None, setting("batch_size")] = None,
    learning_rate: Annotated[float | None, setting("learning_rate")] = None,
    warmup_epochs: Annotated[float | None, setting("warmup_epochs")] = None,
    weight_decay: Annotated[float | None, setting("weight_decay")] = None,
    adam_beta2: Annotated[float | None, setting("adam_beta2")] = None,
    adam_nesterov: Annotated[bool | None, setting("adam_nesterov")] = None,
    label_smoothing: Annotated[float | None, setting("label_smoothing")] = None,
    ema_decay: Annotated[float | None, setting("ema_decay")] = None,
    seed: Annotated[int | None, setting("seed")] = None,
    seeds: SeedsFlag = None,
    augment_shift: Annotated[int | None, setting("augment_shift")] = None,
    augment_rotate: Annotated[float | None, setting("augment_rotate")] = None,
    augment_scale: Annotated[float | None, setting("augment_scale")] = None,
    augment_elastic: Annotated[float | None, setting("augment_elastic")] = None,
    augment_thickness: Annotated[float | None, setting("augment_thickness")] = None,
    augment_blur: Annotated[float | None, setting("augment_blur")] = None,
    augment_low_res: Annotated[float | None, setting("augment_low_res")] = None,
    calibration_fraction: Annotated[float | None, setting("calibration_fraction")] = None,
    non_digit_fraction: Annotated[float | None, setting("non_digit_fraction")] = None,
    non_digit_images: Annotated[int | None, setting("non_digit_images")] = None,
    non_digit_detector: Annotated[bool | None, setting("non_digit_detector")] = None,
    init_from: Annotated[str | None, setting("init_from")] = None,
    channels: Annotated[str | None, setting("channels", callback=positive_ints)] = None,
    dense: Annotated[int | None, setting("dense")] = None,
    dtype: Annotated[str | None, setting("dtype")] = None,
    quick_compile: Annotated[bool | None, setting("quick_compile")] = None,
    preset: PresetFlag = None,
    out_dir: OutFlag = None,
    resume: ResumeFlag = False,
    overwrite: OverwriteFlag = False,
    devices: DevicesFlag = None,
    distributed: DistributedFlag = False,
    coordinator: CoordinatorFlag = None,
    num_processes: NumProcessesFlag = None,
    process_id: ProcessIdFlag = None,
    profile: ProfileFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Train the CNN; writes Orbax checkpoints, metrics.jsonl, curves.png, TensorBoard events."""
    # The Config fields among the flags (None where not given), before any other local.
    flags = {name: value for name, value in locals().items() if name in CONFIG_FIELDS}
    from digitjax import checkpoint
    from digitjax import distributed as dist

    dist.initialize(distributed, coordinator, num_processes, process_id)
    enable_compilation_cache()
    from digitjax.seeds import train as run_training

    config = Config.from_flags(flags, preset)
    run_dir = checkpoint.choose_run_dir(out_dir, resume, config.dataset)
    main = dist.is_main_process()
    with dist.native_stdout_to_stderr(), render.TrainingProgress(quiet=as_json or not main) as bar:
        summary = run_training(config, run_dir, resume=resume, overwrite=overwrite,
                               given=frozenset(chosen_settings(flags, preset)), profile=profile,
                               callbacks=bar.callbacks(), mesh=dist.make_mesh(devices),
                               seeds=cast(tuple[int, ...] | None, seeds))  # fmt: skip
    if main and as_json:
        render.print_json({"run_dir": str(run_dir), **summary})
    elif main:
        render.training_done(summary, run_dir)


@app.command(cls=PlainFlags)
@user_errors
def evaluate(
    checkpoint_path: Annotated[
        Path | None,
        typer.Argument(
            metavar="CHECKPOINT",
            help="Run folder (its best step) or a step folder. "
            "\\[default: the newest run in checkpoints/, else the model bundled with digitjax]",
            show_default=False,
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="train or test.")] = "test",
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Evaluate on another dataset. \\[default: the run's]", show_default=False
        ),
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option(help="Folder with the four IDX files to evaluate on.")
    ] = None,
    latest: Annotated[bool, typer.Option(help="Use the latest step, not the best.")] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Write a figure (PNG, or the format its suffix names: PDF, SVG...): "
            "confusion matrix and misclassified digits."
        ),
    ] = None,
    overwrite: ReplaceOutputsFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Accuracy, loss, per-class precision/recall/F1 and the confusion matrix."""
    from digitjax.inference.classifier import BUNDLED_MODEL
    from digitjax.inference.predict import default_checkpoint
    from digitjax.seeds import evaluate_run

    check_output("--plot", plot, overwrite)
    check_plot_format(plot)
    enable_compilation_cache()
    if checkpoint_path is None:
        checkpoint_path = default_checkpoint(ensemble=True)
        if checkpoint_path == BUNDLED_MODEL:
            render.note(
                "no run in checkpoints/ has finished an epoch: evaluating the model bundled "
                "with digitjax"
            )
    report = evaluate_run(checkpoint_path, split, dataset, data_dir, latest)
    if as_json:
        render.print_json(report.to_dict())
    else:
        render.evaluation(report)
    if plot is not None:
        from digitjax.plots import plot_evaluation

        write_output("--plot", plot, "plot", plot_evaluation, report.metrics, report.images,
                     report.labels, plot)  # fmt: skip


@app.command(cls=PlainFlags)
@user_errors
def predict(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="PATHS", help="Image files, folders (searched recursively) or glob patterns."
        ),
    ],
    checkpoint_path: ModelCheckpointFlag = None,
    csv: Annotated[Path | None, typer.Option(help="Also write the results as CSV.")] = None,
    save_preprocessed: Annotated[
        Path | None,
        typer.Option(help="Write the 28x28 image the model saw for each input into this folder."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Write a figure (PNG, or the format its suffix names: PDF, SVG...): "
            "input, what the model saw, prediction."
        ),
    ] = None,
    model: ExportedModelFlag = None,
    min_confidence: MinConfidenceFlag = None,
    overwrite: ReplaceOutputsFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Recognize digits in your own images: photos, scans, drawings; any size or colours."""
    from digitjax.inference.classifier import default_min_confidence
    from digitjax.inference.predict import (
        NUMPY_UP_TO,
        collect_images,
        load_classifier,
        predict_files,
        preprocessed_names,
        save_seen,
        write_csv,
    )

    files, missing = collect_images(paths)
    check_output("--csv", csv, overwrite, files)
    check_writable("--save-preprocessed", save_preprocessed, folder=True)
    if save_preprocessed is not None:
        for name in preprocessed_names(save_preprocessed, files).values():
            check_replaceable("--save-preprocessed", name, overwrite, files)
    check_output("--plot", plot, overwrite, files)
    check_distinct({"--csv": csv, "--plot": plot})
    check_plot_format(plot)
    quick_start = len(files) <= NUMPY_UP_TO
    classifier = load_classifier(chosen_model(checkpoint_path, model), quick_start=quick_start)
    if min_confidence is None:
        min_confidence = default_min_confidence(classifier.info)
    predictions, seen = predict_files(classifier, files, min_confidence, previews=plot is not None)
    predictions += missing
    if as_json:
        render.print_json([p.to_dict() for p in predictions])
    else:
        info = classifier.info
        render.predictions(
            classifier.source, predictions, min_confidence, info.detects_non_digits, len(missing)
        )
    for p in predictions:
        if p.error:
            render.error_line(f"{p.name}: {p.error}")
    if csv is not None:
        write_output("--csv", csv, "CSV", write_csv, csv, predictions)
    if save_preprocessed is not None:
        what = f"{len(seen)} preprocessed 28x28 image{'s' if len(seen) != 1 else ''}"
        write_output("--save-preprocessed", save_preprocessed, what, save_seen,
                     save_preprocessed, files, seen)  # fmt: skip
    if plot is not None:
        from digitjax.plots import plot_predictions

        write_output("--plot", plot, "plot", plot_predictions, predictions, seen, plot)
    if any(p.error for p in predictions):
        raise typer.Exit(1)


@app.command(cls=PlainFlags)
@user_errors
def benchmark(
    batch_sizes: BatchSizesFlag = "128",
    steps: Annotated[int, typer.Option(min=1, help="Training steps per timed repeat.")] = 100,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats (median reported).")] = 5,
    target: TargetFlag = None,
    baseline: Annotated[
        bool, typer.Option(help="Also time a conventional host-fed training loop, for the speedup.")
    ] = False,
    devices: DevicesFlag = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write the JSON results to this file.")
    ] = None,
    profile: ProfileFlag = None,
    overwrite: ReplaceOutputsFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Training/inference throughput, compile time, FLOP/s vs. matmul peak, time to accuracy."""
    from digitjax.benchmark import BenchmarkPlan, run_benchmark

    sizes = cast(tuple[int, ...], batch_sizes)  # the callback turned the text into integers
    plan = BenchmarkPlan(sizes, steps, repeats, target, baseline, devices, profile)
    check_output("--out", out_file, overwrite)
    with render.err.status("benchmarking") as status:
        results = run_benchmark(plan, report=lambda what: status.update(f"measuring {what}"))
    if as_json:
        render.print_json(results)
    else:
        render.benchmark(results)
    if out_file is not None:
        data = (json.dumps(results, indent=2) + "\n").encode()
        write_output("--out", out_file, "results", write_file, out_file, data)


@app.command(cls=PlainFlags)
@user_errors
def export(
    out_file: Annotated[Path, typer.Option("--out", help="The file to write.")],
    checkpoint_path: Annotated[
        Path | None,
        typer.Argument(
            metavar="RUN_OR_CHECKPOINT",
            help="Run or checkpoint folder. \\[default: the newest run in checkpoints/, else the "
            "model bundled with digitjax]",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="stablehlo or onnx. \\[default: by the suffix of --out]",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Write the model as one file that runs without digitjax: StableHLO or ONNX."""
    from digitjax.inference.export import export_model
    from digitjax.inference.predict import default_checkpoint

    written = export_model(checkpoint_path or default_checkpoint(), fmt, out_file, overwrite)
    if as_json:
        render.print_json(written)
    else:
        render.exported(written, out_file)


@app.command(cls=PlainFlags)
@user_errors
def serve(
    checkpoint_path: ModelCheckpointFlag = None,
    model: ExportedModelFlag = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images per forward pass.")] = 256,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="How long a batch waits for more images.")
    ] = 0.0,
    max_queue: Annotated[
        int,
        typer.Option(
            min=1,
            help="Images in flight before requests get 503; also the most files per request.",
        ),
    ] = 1024,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds per request.")] = 10.0,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, help="Preprocessing processes. \\[default: one per core]", show_default=False
        ),
    ] = None,
) -> None:
    """Serve a page to draw digits on and a batched prediction API over HTTP."""
    try:
        from digitjax.serving.process import serve
        from digitjax.serving.server import Options
    except ModuleNotFoundError as e:
        raise UserError(
            f"digitjax serve needs the server's packages ({e.name} is missing): "
            "pip install 'digitjax[serve]'"
        ) from None
    from digitjax.inference.parallel import available_cores
    from digitjax.serving.uploads import Limits

    # A request of more images than the queue holds could never get in: 413, not 503 forever.
    files = min(Limits.max_files, max_queue)
    limits = Limits(max_files=files, max_in_flight=max_queue, timeout_s=timeout)
    options = Options(host, port, max_batch, max_wait_ms, workers or available_cores(), limits)
    serve(chosen_model(checkpoint_path, model), options, report=render.note)


def main() -> None:
    sys.stdout = render.GuardedStdout(sys.stdout)
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    else:
        code = 0
    # The command has ended and its exit status is decided: a signal now changes nothing.
    for number in interrupts.STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    try:
        sys.stdout.flush()
    except UserError as e:  # the output's last bytes could not be written
        render.error_line(str(e))
        code = code or 1
    sys.stderr.flush()
    distributed = sys.modules.get("digitjax.distributed")
    if distributed is not None and distributed.joined():
        sys.exit(code)  # a multi-process job's shutdown runs at exit
    # Every file is closed and every checkpoint committed by now. Interpreter teardown after
    # importing jax and flax costs a large share of a one-image `predict`: skip it.
    os._exit(code)


if __name__ == "__main__":
    main()

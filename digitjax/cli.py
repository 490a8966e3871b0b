"""The `digitjax` command: parses flags, calls the modules, renders their results."""

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from digitjax.config import PRESETS, Config, Interrupted, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, evaluate and use handwritten-digit CNNs with JAX.",
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # messages stay whole lines, at any width

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
DevicesFlag = Annotated[
    int | None,
    typer.Option(help="Use only the first N devices. \\[default: all]", show_default=False),
]


def user_errors(command: Callable) -> Callable:
    """Bad input ends in one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Interrupted as e:
            err.print(f"[yellow]{e}[/yellow]", highlight=False)
            raise typer.Exit(130) from None
        except (UserError, OSError) as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache: a fresh process loads the programs an earlier one
    compiled (default `digitjax train` 9.7 -> 8.5 s; predict's first forward pass ~3x
    faster). The thresholds are lowered to zero because predict's programs are small."""
    import jax

    from digitjax.data import default_cache_dir

    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _default(name: str) -> str:
    value = getattr(Config, name)
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _opt(name: str, help_text: str) -> Any:
    return typer.Option(help=f"{help_text} \\[default: {_default(name)}]", show_default=False)


@app.command()
@user_errors
def train(
    dataset: Annotated[str | None, _opt("dataset", "Dataset: mnist or fashion_mnist.")] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(help="Folder with the four MNIST-format IDX .gz files to train on instead."),
    ] = None,
    epochs: Annotated[int | None, _opt("epochs", "Training epochs.")] = None,
    batch_size: Annotated[int | None, _opt("batch_size", "Images per step.")] = None,
    learning_rate: Annotated[
        float | None, _opt("learning_rate", "Peak AdamW learning rate.")
    ] = None,
    warmup_epochs: Annotated[
        float | None, _opt("warmup_epochs", "Linear warmup, in epochs.")
    ] = None,
    weight_decay: Annotated[float | None, _opt("weight_decay", "AdamW weight decay.")] = None,
    label_smoothing: Annotated[float | None, _opt("label_smoothing", "Label smoothing.")] = None,
    augment_shift: Annotated[
        int | None, _opt("augment_shift", "Random translation in pixels (0: no augmentation).")
    ] = None,
    augment_rotate: Annotated[
        float | None, _opt("augment_rotate", "Random rotation, up to this many degrees.")
    ] = None,
    augment_scale: Annotated[
        float | None, _opt("augment_scale", "Random scaling, up to this fraction either way.")
    ] = None,
    ema_decay: Annotated[
        float | None,
        _opt(
            "ema_decay",
            "Evaluate and keep a moving average of the weights (0: the raw weights).",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Named settings: fast (the defaults, quickest to 99%) or best (most accurate, "
            "~11 min on 2 CPU cores); flags given beside it override it.",
            show_default=False,
        ),
    ] = None,
    channels: Annotated[str | None, _opt("channels", "Conv widths, comma-separated.")] = None,
    dense: Annotated[int | None, _opt("dense", "Width of the hidden dense layer.")] = None,
    seed: Annotated[int | None, _opt("seed", "Random seed (same seed, same metrics).")] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Run folder. \\[default: checkpoints/<dataset>-<time>]",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out (default: the newest in checkpoints/).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = False,
    dtype: Annotated[
        str | None, _opt("dtype", "Compute dtype: float32, or bfloat16 for GPU/TPU.")
    ] = None,
    devices: DevicesFlag = None,
    distributed: Annotated[
        bool,
        typer.Option(
            help="Join a multi-process job (automatic under SLURM or Open MPI, or "
            "when --coordinator is given)."
        ),
    ] = False,
    coordinator: Annotated[
        str | None, typer.Option(help="host:port of process 0, for --distributed.")
    ] = None,
    num_processes: Annotated[int | None, typer.Option(help="Processes in the job.")] = None,
    process_id: Annotated[int | None, typer.Option(help="This process's index.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Train the CNN; writes latest and best Orbax checkpoints, metrics.jsonl and curves.png."""
    from digitjax import checkpoint
    from digitjax import distributed as dist

    dist.initialize(distributed, coordinator, num_processes, process_id)
    import jax

    enable_compilation_cache()

    from digitjax.train import check_run_dir, resolve_config
    from digitjax.train import train as run_training

    flags = {
        "dataset": dataset,
        "data_dir": data_dir,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "warmup_epochs": warmup_epochs,
        "weight_decay": weight_decay,
        "label_smoothing": label_smoothing,
        "augment_shift": augment_shift,
        "augment_rotate": augment_rotate,
        "augment_scale": augment_scale,
        "ema_decay": ema_decay,
        "dense": dense,
        "seed": seed,
        "channels": _parse_ints(channels, "--channels") if channels is not None else None,
        "dtype": dtype,
    }
    given = {name: value for name, value in flags.items() if value is not None}
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        given = {**PRESETS[preset], **given}
    requested = Config(**given)
    main = dist.is_main_process()
    if out_dir is None and jax.process_count() > 1:
        raise UserError("a multi-process job needs --out: every process must name the same run")
    if out_dir is None:
        out_dir = checkpoint.newest_run() if resume else None
        if resume and out_dir is None:
            raise UserError(f"nothing to resume in {checkpoint.DEFAULT_ROOT}/; pass --out DIR")
        out_dir = (
            out_dir
            or checkpoint.DEFAULT_ROOT / f"{requested.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    check_run_dir(out_dir, resume, overwrite)
    config = resolve_config(out_dir, requested, resume, set(given))

    mesh = dist.make_mesh(devices)
    if main:
        err.print(
            f"Training on {config.dataset} → {out_dir} ({mesh.size} {jax.default_backend()} "
            f"device{'s' if mesh.size > 1 else ''}, {jax.process_count()} process"
            f"{'es' if jax.process_count() > 1 else ''})",
            highlight=False,
        )
    if config.dtype == "bfloat16" and jax.default_backend() == "cpu" and main:
        err.print(
            "[yellow]note:[/yellow] bfloat16 runs ~2x slower than float32 on CPUs; "
            "it pays off on GPUs and TPUs",
            highlight=False,
        )
    multi_process = dist.native_stdout_to_stderr() if jax.process_count() > 1 else nullcontext()
    with multi_process, TrainingProgress(quiet=as_json or not main) as progress:
        summary = run_training(
            config,
            out_dir,
            resume=resume,
            overwrite=overwrite,
            callbacks=progress.callbacks(),
            mesh=mesh,
        )
    best = summary["best"]
    if not main:
        return
    if as_json:
        print_json({"run_dir": str(out_dir), "config": config.to_dict(), **summary})
    else:
        err.print(
            f"Done: best test accuracy {100 * best['test_accuracy']:.2f}% "
            f"(epoch {best['epoch']}); checkpoints in {out_dir}",
            highlight=False,
        )


def _parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got '{text}'") from None
    if min(values) <= 0:
        raise UserError(f"{flag} takes positive integers, got '{text}'")
    return values


class TrainingProgress:
    """A rich progress bar per chunk of steps and a line per epoch, on stderr."""

    def __init__(self, quiet: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

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
        self.task = None
        self.started = time.perf_counter()

    def __enter__(self) -> "TrainingProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def callbacks(self) -> Any:
        from digitjax.train import Callbacks

        return Callbacks(on_start=self.on_start, on_chunk=self.on_chunk, on_epoch=self.on_epoch)

    def on_start(self, done_steps: int, total_steps: int) -> None:
        self.task = self.progress.add_task("train", total=total_steps, completed=done_steps)

    def on_chunk(self, done_steps: int) -> None:
        self.progress.update(self.task, completed=done_steps)

    def on_epoch(self, record: dict) -> None:
        if not self.quiet:
            self.progress.console.print(
                f"epoch {record['epoch']:>3}  train loss {record['train_loss']:.4f} "
                f"acc {100 * record['train_accuracy']:.2f}%  test loss {record['test_loss']:.4f} "
                f"acc {100 * record['test_accuracy']:.2f}%  "
                f"[dim]{time.perf_counter() - self.started:.1f}s[/dim]",
                highlight=False,
            )


def resolve_checkpoint(path: Path | None) -> Path:
    from digitjax import checkpoint

    if path is not None:
        return path
    newest = checkpoint.newest_run()
    if newest is None:
        raise UserError(
            f"no runs in {checkpoint.DEFAULT_ROOT}/: train one first or pass a checkpoint path"
        )
    return newest


@app.command()
@user_errors
def evaluate(
    checkpoint_path: Annotated[
        Path | None,
        typer.Argument(
            metavar="[CHECKPOINT]",
            help="Run folder (its best step) or a step folder. "
            "\\[default: newest run in checkpoints/]",
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
        Path | None, typer.Option(help="Write a PNG: confusion matrix and misclassified digits.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Accuracy, loss, per-class precision/recall/F1 and the confusion matrix."""
    from digitjax import checkpoint
    from digitjax.data import load_dataset
    from digitjax.evaluate import compute_logits, compute_metrics, make_logits_fn

    enable_compilation_cache()

    path = resolve_checkpoint(checkpoint_path)
    kind = checkpoint.LATEST if latest else checkpoint.BEST
    model = checkpoint.restore_model(path, kind)
    config, num_classes = model.config, model.summary["num_classes"]
    if dataset is None and data_dir is None:
        dataset, data_dir = config.dataset, config.data_dir
    data = load_dataset(dataset or config.dataset, data_dir)
    if len(data.class_names) != num_classes:
        raise UserError(f"{data.name} has {len(data.class_names)} classes, the model {num_classes}")
    images, labels = data.split(split)
    logits = compute_logits(make_logits_fn(model.graphdef), model.params, images)
    metrics = compute_metrics(logits, labels, data.class_names)
    if plot is not None:
        from digitjax.plots import plot_evaluation

        plot_evaluation(metrics, images, labels, plot)
    if as_json:
        print_json(
            {
                "checkpoint": str(model.step_dir),
                "dataset": data.name,
                "split": split,
                **metrics.to_dict(),
            }
        )
        return
    out.print(
        f"[bold]{model.step_dir}[/bold] on {data.name} {split}: accuracy "
        f"[bold]{100 * metrics.accuracy:.2f}%[/bold], loss {metrics.loss:.4f} "
        f"({len(labels)} images)",
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
    if plot is not None:
        out.print(f"plot written to {plot}")


@app.command()
@user_errors
def predict(
    paths: Annotated[
        list[str],
        typer.Argument(help="Image files, folders (searched recursively) or glob patterns."),
    ],
    checkpoint_path: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="Run or checkpoint folder. \\[default: the newest run in "
            "checkpoints/, else the model bundled with digitjax]",
            show_default=False,
        ),
    ] = None,
    csv: Annotated[Path | None, typer.Option(help="Also write the results as CSV.")] = None,
    save_preprocessed: Annotated[
        Path | None,
        typer.Option(help="Write the 28x28 image the model saw for each input into this folder."),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG grid: input, what the model saw, prediction.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Recognize digits in your own images: photos, scans, drawings; any size or colours."""
    from digitjax.predict import Predictor, collect_images, predict_files

    files, missing = collect_images(paths)
    enable_compilation_cache()
    predictor = Predictor(checkpoint_path)
    predictions, seen = predict_files(predictor, files)
    predictions += missing
    if csv is not None:
        write_csv(csv, predictions)
    if save_preprocessed is not None:
        save_digit_images(save_preprocessed, seen)
    if plot is not None:
        from digitjax.plots import plot_predictions

        plot_predictions(predictions, seen, plot)
    if as_json:
        print_json([p.to_dict() for p in predictions])
    else:
        table = Table("file", "digit", "confidence", "top 3", title=f"{predictor.step_dir}")
        for p in predictions:
            if p.error:
                table.add_row(p.path, "[red]—[/red]", "", f"[red]{p.error}[/red]")
            else:
                top = "  ".join(f"{d}: {100 * prob:.1f}%" for d, prob in p.top)
                table.add_row(p.path, f"[bold]{p.digit}[/bold]", f"{100 * p.confidence:.1f}%", top)
        out.print(table)
    for p in predictions:
        if p.error:
            err.print(f"error: {p.path}: {p.error}", highlight=False, soft_wrap=True)
    if any(p.error for p in predictions):
        raise typer.Exit(1)


def write_csv(path: Path, predictions: list) -> None:
    import csv as csv_module

    with path.open("w", newline="") as f:
        writer = csv_module.writer(f)
        writer.writerow(["path", "digit", "confidence", "top", "error"])
        for p in predictions:
            top = " ".join(f"{d}:{prob:.4f}" for d, prob in p.top)
            writer.writerow([p.path, p.digit, p.confidence, top, p.error or ""])


def save_digit_images(folder: Path, seen: dict) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for path, image in seen.items():
        name = path.stem
        while name in used:  # same file name in different folders
            name += "_"
        used.add(name)
        Image.fromarray((image * 255).round().astype("uint8")).save(folder / f"{name}.png")


@app.command()
@user_errors
def benchmark(
    batch_sizes: Annotated[
        str, typer.Option(help="Training batch sizes to measure, comma-separated.")
    ] = "128",
    steps: Annotated[int, typer.Option(min=1, help="Training steps per timed repeat.")] = 100,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats (median reported).")] = 5,
    target: Annotated[
        float | None,
        typer.Option(
            help="Also train the default recipe from scratch and time it to this test accuracy "
            "(e.g. 0.99).",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        bool, typer.Option(help="Also time a conventional host-fed training loop, for the speedup.")
    ] = False,
    devices: DevicesFlag = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write the JSON results to this file.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Training/inference throughput, compile time, FLOP/s vs. matmul peak, time to accuracy."""
    from digitjax.benchmark import BenchmarkPlan, run_benchmark
    from digitjax.data import load_dataset

    if target is not None and not 0 < target < 1:
        raise UserError(f"--target is an accuracy in (0, 1), got {target}")
    plan = BenchmarkPlan(
        _parse_ints(batch_sizes, "--batch-sizes"), steps, repeats, target, baseline, devices
    )
    config = Config()
    dataset = load_dataset(config.dataset)
    with err.status("benchmarking") as status:
        results = run_benchmark(
            config, dataset, plan, report=lambda what: status.update(f"measuring {what}")
        )
    if out_file is not None:
        out_file.write_text(json.dumps(results, indent=2) + "\n")
    if as_json:
        print_json(results)
        return
    machine = results["machine"]
    table = Table(
        "measurement",
        "value",
        title=f"digitjax benchmark: {machine['cpu']}, "
        f"{results['devices_used']} of {len(machine['devices'])} {machine['backend']} device(s), "
        f"jax {machine['versions']['jax']}",
    )
    table.add_row("float32 matmul peak", f"{results['matmul_peak']['gflops']:.0f} GFLOP/s")
    for run in results["training"]:
        low, high = run["images_per_s_range"]
        table.add_row(
            f"train, batch {run['batch_size']}",
            f"{run['images_per_s']:,.0f} img/s ({low:,.0f}..{high:,.0f}), "
            f"{run['gflops']:.0f} GFLOP/s = {100 * run['fraction_of_peak']:.0f}% of peak",
        )
        table.add_row(f"train compile, batch {run['batch_size']}", f"{run['compile_s']:.2f} s")
        if "host_fed_baseline" in run:
            table.add_row(
                f"host-fed baseline, batch {run['batch_size']}",
                f"{run['host_fed_baseline']['images_per_s']:,.0f} img/s "
                f"(digitjax {run['speedup_over_host_fed']:.1f}x faster)",
            )
    inference = results["inference"]
    table.add_row(
        "inference (test set)",
        f"{inference['images_per_s']:,.0f} img/s, compile {inference['compile_s']:.2f} s",
    )
    if "time_to_accuracy" in results:
        reached = results["time_to_accuracy"]
        label = f"time to {100 * reached['target']:.1f}% test accuracy"
        table.add_row(
            label,
            f"{reached['seconds']:.1f} s (epoch {reached['epochs']:.1f})"
            if reached["reached"]
            else f"not reached in {reached['seconds']:.0f} s "
            f"(best {100 * reached['best_accuracy']:.2f}%)",
        )
    out.print(table)
    if out_file is not None:
        out.print(f"results written to {out_file}")


@app.command()
@user_errors
def serve(
    checkpoint_path: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="Run or checkpoint folder. \\[default: the newest run in "
            "checkpoints/, else the model bundled with digitjax]",
            show_default=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images per forward pass.")] = 256,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="How long a batch waits for more images.")
    ] = 0.0,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Images in flight before requests get 503.")
    ] = 1024,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds per request.")] = 10.0,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Preprocessing processes. \\[default: one per core]",
                     show_default=False),
    ] = None,
) -> None:
    """Serve a page to draw digits on and a batched prediction API over HTTP."""
    from digitjax.parallel import available_cores
    from digitjax.serve import Options, serve
    from digitjax.uploads import Limits

    enable_compilation_cache()
    limits = Limits(max_in_flight=max_queue, timeout_s=timeout)
    options = Options(host, port, max_batch, max_wait_ms, workers or available_cores(), limits)
    serve(checkpoint_path, options, report=lambda message: err.print(message, highlight=False))


def main() -> None:
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    else:
        code = 0
    # Every file is closed and every checkpoint committed by now. Interpreter teardown after
    # importing jax and flax takes ~0.3 s, a third of a one-image `predict`: skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

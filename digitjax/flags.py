"""The flags several `digitjax` commands share, and the checks of flag values that typer
leaves to us. Each train flag for a Config field takes its help text from the field."""

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from digitjax.config import PRESET_PURPOSES, RECIPE, Config, UserError, check_seeds
from digitjax.inference.classifier import DEFAULT_MIN_CONFIDENCE

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
DevicesFlag = Annotated[
    int | None,
    typer.Option(help="Use only the first N devices. \\[default: all]", show_default=False),
]
RUN, HOSTS = "Run folder", "Multi-host"
ModelCheckpointFlag = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="Run or checkpoint folder. \\[default: the newest run in checkpoints/, else the "
        "model bundled with digitjax]",
        show_default=False,
    ),
]
ExportedModelFlag = Annotated[
    Path | None,
    typer.Option(help="Use a file written by `digitjax export` (.onnx runs without JAX)."),
]


PresetFlag = Annotated[
    str | None,
    typer.Option(
        help="Named settings: "
        + "; ".join(f"{name}, {purpose}" for name, purpose in PRESET_PURPOSES.items())
        + " (see the README). Flags given beside it override it.",
        show_default=False,
        rich_help_panel=RECIPE,
    ),
]
OutFlag = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Run folder. \\[default: checkpoints/<dataset>-<time>]",
        show_default=False,
        rich_help_panel=RUN,
    ),
]
ResumeFlag = Annotated[
    bool,
    typer.Option(
        help="Continue the run in --out (default: the newest in checkpoints/).",
        rich_help_panel=RUN,
    ),
]
OverwriteFlag = Annotated[
    bool, typer.Option(help="Replace a run already in --out.", rich_help_panel=RUN)
]
# Of the commands that write files the user names (predict, evaluate, benchmark).
ReplaceOutputsFlag = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace output files that exist."),
]
DistributedFlag = Annotated[
    bool,
    typer.Option(
        help="Join a multi-process job (automatic under SLURM or Open MPI, or when "
        "--coordinator is given).",
        rich_help_panel=HOSTS,
    ),
]
CoordinatorFlag = Annotated[
    str | None,
    typer.Option(help="host:port of process 0, for --distributed.", rich_help_panel=HOSTS),
]
NumProcessesFlag = Annotated[
    int | None, typer.Option(min=1, help="Processes in the job.", rich_help_panel=HOSTS)
]
ProcessIdFlag = Annotated[
    int | None, typer.Option(min=0, help="This process's index.", rich_help_panel=HOSTS)
]
ProfileFlag = Annotated[
    Path | None,
    typer.Option(
        help="Write a jax.profiler trace of a few training chunks, after the first (which "
        "compiles), into this folder: for TensorBoard's profile plugin (xprof) or Perfetto.",
        show_default=False,
    ),
]


def setting(name: str, **extra: Any) -> Any:
    """A `train` flag for a Config field: its help text and panel come from the field. A
    yes/no field is one flag that says yes (absent: the default or the preset's choice)."""
    field = next(f for f in dataclasses.fields(Config) if f.name == name)
    default = field.default
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
    yes_flag = ["--" + name.replace("_", "-")] if isinstance(default, bool) else []
    return typer.Option(
        *yes_flag,
        help=f"{field.metadata['help']} \\[default: {shown}]",
        show_default=False,
        rich_help_panel=field.metadata["panel"],
        **extra,
    )


def positive_ints(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"takes comma-separated integers, got '{text}'") from None
    if min(values) <= 0:
        raise typer.BadParameter(f"takes positive integers, got '{text}'")
    return values


def distinct_positive_ints(text: str | None) -> tuple[int, ...] | None:
    values = positive_ints(text)
    if values is not None and len(set(values)) < len(values):
        raise typer.BadParameter(f"takes distinct values, got '{text}'")
    return values


def seed_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return check_seeds(tuple(int(part) for part in text.split(",")))
    except ValueError:
        raise typer.BadParameter(f"takes comma-separated seeds, got '{text}'") from None
    except UserError as e:
        raise typer.BadParameter(str(e).removeprefix("--seeds ")) from None


SeedsFlag = Annotated[
    str | None,
    typer.Option(
        help="Train one model per seed at once, in one compiled program (e.g. 0,1,2,3): one "
        "run per seed in --out, whose `digitjax evaluate` reports their ensemble. "
        "Not with --seed.",
        callback=seed_list,
        show_default=False,
        rich_help_panel=RECIPE,
    ),
]


def probability(value: float | None) -> float | None:
    if value is not None and not 0 <= value <= 1:  # NaN fails both comparisons: refused too
        raise typer.BadParameter(f"must be in [0, 1], got {value}")
    return value


CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))


MinConfidenceFlag = Annotated[
    float | None,
    typer.Option(
        help="Mark answers whose confidence is below this as not sure (and, far below, "
        f"not a digit). \\[default: {DEFAULT_MIN_CONFIDENCE} with a calibrated model; none "
        "with a model that has no temperature, whose confidences are not probabilities]",
        show_default=False,
        callback=probability,
    ),
]


# `digitjax benchmark`'s.
BatchSizesFlag = Annotated[
    str,
    typer.Option(
        help="Training batch sizes to measure, comma-separated.", callback=distinct_positive_ints
    ),
]
TargetFlag = Annotated[
    float | None,
    typer.Option(
        help="Also train --preset fast --epochs 1 from scratch and time it to this test "
        "accuracy (e.g. 0.99).",
        show_default=False,
    ),
]

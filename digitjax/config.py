"""The one configuration of a run, saved with every checkpoint."""

import dataclasses
from typing import Any


class UserError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits non-zero."""


class Interrupted(UserError):
    """Ctrl-C during training, after the latest checkpoint was saved."""


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 5e-3
    warmup_epochs: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    augment_shift: int = 0
    augment_rotate: float = 0.0  # degrees, either way
    augment_scale: float = 0.0  # relative, either way
    ema_decay: float = 0.99  # 0: evaluate the trained weights; else their moving average
    channels: tuple[int, ...] = (8, 16, 32)
    dense: int = 64
    seed: int = 0
    chunks_per_epoch: int = 10
    dtype: str = "float32"  # compute dtype; params and optimizer state stay float32

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "learning_rate", "dense", "chunks_per_epoch")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(
                    f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}"
                )
        non_negative = (
            "warmup_epochs",
            "weight_decay",
            "augment_shift",
            "augment_rotate",
            "augment_scale",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.augment_scale >= 1:
            raise UserError(f"--augment-scale must be < 1, got {self.augment_scale}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"--dtype must be float32 or bfloat16, got {self.dtype}")
        if not 1 <= len(self.channels) <= 4 or min(self.channels) <= 0:
            raise UserError(f"--channels needs 1 to 4 positive widths, got {self.channels}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(
                f"checkpoint config has unknown fields {unknown}: not a digitjax checkpoint"
            )
        values = {**ADDED_LATER, **raw}
        if "channels" in values:
            values["channels"] = tuple(values["channels"])
        return cls(**values)


# Fields that older checkpoints lack, with the value that reproduces how those were trained
# (not today's default, which may differ).
ADDED_LATER: dict[str, Any] = {"augment_rotate": 0.0, "augment_scale": 0.0, "ema_decay": 0.0}

# Named sets of settings for `digitjax train --preset`; flags given beside one override it.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {},  # the defaults: the quickest to 99% (benchmarks/README.md)
    "best": {
        "channels": (32, 64, 128),
        "dense": 256,
        "batch_size": 128,
        "learning_rate": 3e-3,
        "epochs": 20,
        "warmup_epochs": 0.5,
        "augment_shift": 2,
        "augment_rotate": 15.0,
        "augment_scale": 0.15,
        "ema_decay": 0.999,
    },
}

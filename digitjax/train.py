"""Training: a pure train step, run on device in chunks of steps, and the loop around it.

The whole dataset lives on the device as uint8, and so does each epoch's order of it (drawn on
the host once per epoch). One compiled program runs any number of steps with `fori_loop`, so the
host only starts a chunk and reads back its running totals; the same program serves every chunk
length, so it compiles once.

`prepare_training` builds everything a run needs once (`TrainingSetup`); `run_chunks` drives
the compiled chunks; `train` adds what makes a run safe to lose: checkpoints at every epoch
end, resuming, Ctrl-C and SIGTERM saving at the next chunk boundary.
"""

import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from digitjax import checkpoint, interrupts
from digitjax.augment import augment, is_random
from digitjax.compilation import xla_options
from digitjax.config import Config, Interrupted, UserError, uses_ema
from digitjax.data import Dataset, load_dataset
from digitjax.distributed import (
    abstract_on,
    batch_sharded,
    check_batch_size,
    is_main_process,
    make_mesh,
    put_replicated,
    replicated,
    runtime_info,
    sync,
    to_host,
)
from digitjax.evaluate import (
    Metrics,
    fit_temperature,
    make_logits_fn,
    pad_to_batches,
    split_logits,
    split_metrics,
)
from digitjax.model import abstract_model, apply, conv_impls_for, initial_params, normalize
from digitjax.outputs import write_file
from digitjax.tracking import RunTracker


class EpochTotals(TypedDict):
    """Running sums over the current epoch, kept in the state so that a resumed epoch reports
    the same figures as an uninterrupted one."""

    loss: jax.Array
    correct: jax.Array
    count: jax.Array


class TrainState(TypedDict):
    """The training state as saved on disk (plain dicts, so plain Orbax restores it)."""

    params: dict[str, Any]
    opt_state: Any
    step: jax.Array
    epoch_totals: EpochTotals
    ema_params: NotRequired[dict[str, Any]]  # with uses_ema(config): the weights evaluated


class RunSummary(TypedDict):
    """A run's record: the `summary` item of every checkpoint, and what `train --json` prints."""

    num_classes: int
    history: list[dict[str, Any]]  # one record per epoch, as in metrics.jsonl
    last: dict[str, Any] | None
    best: dict[str, Any] | None  # the epoch best/ holds; ties keep the earlier one
    curve: list[dict[str, Any]]  # training loss and accuracy per chunk
    environment: dict[str, Any]  # where it ran: backend, devices, versions
    wall_seconds: float  # over all its sessions
    temperature: float | None  # that of the weights saved with this summary


class TrainResult(RunSummary):
    """What `train` returns: the run's summary and its config."""

    config: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Schedule:
    num_train: int
    batch_size: int
    epochs: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_train // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def learning_rate_schedule(config: Config, schedule: Schedule) -> optax.Schedule:
    """The learning rate of each step (counted from 0): linear warmup, then cosine decay."""
    warmup = int(config.warmup_epochs * schedule.steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=min(warmup, schedule.total_steps - 1),
        decay_steps=schedule.total_steps,
        end_value=config.learning_rate / 100,
    )


def make_optimizer(config: Config, schedule: Schedule) -> optax.GradientTransformation:
    learning_rate = learning_rate_schedule(config, schedule)
    # One vector for all parameters: one fused update instead of one per array, which
    # compiles and runs faster on CPU.
    return optax.flatten(
        optax.adamw(
            learning_rate,
            b2=config.adam_beta2,
            weight_decay=config.weight_decay,
            nesterov=config.adam_nesterov,
        )
    )


def init_state(
    config: Config,
    tx: optax.GradientTransformation,
    param_shapes: dict[str, Any],
    mesh: Mesh | None = None,
) -> TrainState:
    """A fresh state of a model with `param_shapes` (`abstract_model`), replicated over `mesh`
    if given: the initial parameters (drawn at random, or those of --init-from), the rest
    zeros. Made on the host and put on the device: no program to compile (one for `tx.init`
    took 0.05 s of a cold start)."""
    params = initial_params(param_shapes, config.seed)
    if config.init_from is not None:
        params = checkpoint.initial_params(Path(config.init_from), params)
    # AdamW's state starts at zero: its step counts and both moments (a test holds it).
    opt_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tx.init, params))
    host_state: dict[str, Any] = {
        "params": params,
        "opt_state": opt_state,
        "step": np.zeros((), np.int32),
        "epoch_totals": {
            "loss": np.zeros((), np.float32),
            "correct": np.zeros((), np.float32),
            "count": np.zeros((), np.float32),
        },
    }
    if uses_ema(config):
        host_state["ema_params"] = params
    state: TrainState = jax.tree.map(
        lambda leaf: jax.device_put(leaf) if mesh is None else put_replicated(leaf, mesh),
        host_state,
    )
    return state


def training_conv_impls(config: Config) -> tuple[str, ...]:
    return conv_impls_for(jax.default_backend(), training=True, num_layers=len(config.channels))


def non_digits_per_batch(config: Config) -> int:
    """How many generated non-digit images each step adds to its batch of digits."""
    return round(config.non_digit_fraction * config.batch_size)


def make_train_step(
    config: Config,
    graphdef: Any,
    tx: optax.GradientTransformation,
    conv_impls: tuple[str, ...] | None = None,
) -> Callable[..., TrainState]:
    """The pure step: fn(state, images (B, 28, 28) floats, labels (B,), non_digits (K, 28, 28)
    floats or None) -> state."""

    compute_dtype = jnp.dtype(config.dtype)

    def logits_of(params: Any, images: jax.Array) -> jax.Array:
        # Mixed precision: float32 params and optimizer, the forward and backward in
        # `compute_dtype`, the loss in float32.
        compute_params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        logits = apply(graphdef, compute_params, images.astype(compute_dtype), conv_impls)
        return logits.astype(jnp.float32)

    def loss_fn(
        params: Any, images: jax.Array, labels: jax.Array, non_digits: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        logits = logits_of(params, images)
        targets = optax.smooth_labels(
            jax.nn.one_hot(labels, logits.shape[-1]), config.label_smoothing
        )
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        if non_digits is not None:
            loss = loss + outlier_exposure_loss(logits_of(params, non_digits), images.shape[0])
        return loss, logits

    def train_step(
        state: TrainState,
        images: jax.Array,
        labels: jax.Array,
        non_digits: jax.Array | None = None,
    ) -> TrainState:
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], images, labels, non_digits
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params: Any = optax.apply_updates(state["params"], updates)
        totals = state["epoch_totals"]
        new_state: TrainState = {
            "params": params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "epoch_totals": {
                "loss": totals["loss"] + loss * labels.shape[0],
                "correct": totals["correct"] + (logits.argmax(-1) == labels).sum(),
                "count": totals["count"] + labels.shape[0],
            },
        }
        if uses_ema(config):
            new_state["ema_params"] = moving_average(
                state["ema_params"], params, state["step"], config.ema_decay
            )
        return new_state

    return train_step


def outlier_exposure_loss(non_digit_logits: jax.Array, num_digits: int) -> jax.Array:
    """An image of no digit should get the same probability for every class, so that a low top
    probability is what refuses it: the cross-entropy to equal probabilities less its floor,
    log(classes), 0 when they are equal. Summed over the non-digits and divided by the digits'
    count: the digits' own gradient stays what it is without them, and the non-digits weigh
    `non_digit_fraction` (outlier exposure)."""
    classes = non_digit_logits.shape[-1]
    uniform = jnp.full((non_digit_logits.shape[0], classes), 1 / classes)
    outlier_loss = optax.softmax_cross_entropy(non_digit_logits, uniform)
    return (outlier_loss - jnp.log(classes)).sum() / num_digits


def moving_average(average: Any, params: Any, step: jax.Array, max_decay: float) -> Any:
    """The weights' moving average after one more step, with the usual warm-up of the decay,
    so that the average does not start out all initialization."""
    step = step.astype(jnp.float32)
    decay = jnp.minimum(max_decay, (1 + step) / (10 + step))
    return jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, average, params)


def make_train_chunk(
    config: Config,
    schedule: Schedule,
    graphdef: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh | None = None,
    seeds: tuple[int, ...] | None = None,
    seed_batching: str | None = None,
) -> Callable:
    """A jitted fn(state, images, labels, order, num_steps, non_digits=None) -> state running
    `num_steps` steps of the epoch whose example order (`epoch_order`) is `order`. With a mesh,
    every device computes its slice of each global batch. With `non_digits` (uint8 images of
    no digit), each step adds `non_digits_per_batch` of them, drawn at random and augmented
    like the digits, to its batch. With `seeds`, the state and the order are those of every
    seed stacked along a leading axis (`TrainingSetup.seeds`), and each seed's steps draw its
    own random numbers: one program trains them all on the one copy of the data."""
    train_step = make_train_step(config, graphdef, tx, training_conv_impls(config))
    batch_size, steps_per_epoch = schedule.batch_size, schedule.steps_per_epoch
    non_digit_count = non_digits_per_batch(config)

    def train_chunk(
        state: TrainState,
        images: jax.Array,
        labels: jax.Array,
        order: jax.Array,
        num_steps: jax.Array,
        non_digits: jax.Array | None,
        seed: jax.Array | np.ndarray | int,
    ) -> TrainState:
        # Without augmentation or non-digits nothing is random: no keys. JAX lowers a key's
        # hash even where nothing reads it: 0.09 s of the chunk's lowering at each cold start.
        epoch_key = None
        if non_digits is not None or is_random(config):
            epoch = state["step"] // steps_per_epoch
            epoch_key = jax.random.fold_in(jax.random.key(seed), epoch)
        starts_epoch = state["step"] % steps_per_epoch == 0
        totals = jax.tree.map(lambda t: jnp.where(starts_epoch, 0, t), state["epoch_totals"])

        def body(_, state: TrainState) -> TrainState:
            position = state["step"] % steps_per_epoch
            batch = jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,))
            batch_images, batch_labels = images[batch], labels[batch]
            if mesh is not None:
                batch_images, batch_labels = jax.lax.with_sharding_constraint(
                    (batch_images, batch_labels), batch_sharded(mesh)
                )
            batch_images = normalize(batch_images)
            if epoch_key is None:
                return train_step(state, batch_images, batch_labels)
            key = jax.random.fold_in(epoch_key, position)
            batch_images = augment(key, batch_images, config)
            if non_digits is None:
                return train_step(state, batch_images, batch_labels)
            # A key stream of their own: the digits' augmentation draws what it draws without.
            pick_key, augment_key = jax.random.split(jax.random.fold_in(key, NON_DIGIT_STREAM))
            picked = jax.random.randint(pick_key, (non_digit_count,), 0, non_digits.shape[0])
            extra = augment(augment_key, normalize(non_digits[picked]), config)
            return train_step(state, batch_images, batch_labels, extra)

        return jax.lax.fori_loop(0, num_steps, body, {**state, "epoch_totals": totals})

    seed_array = None if seeds is None else np.asarray(seeds, np.int32)

    def train_chunk_of(
        state: TrainState,
        images: jax.Array,
        labels: jax.Array,
        order: jax.Array,
        num_steps: jax.Array,
        non_digits: jax.Array | None = None,
    ) -> TrainState:
        if seed_array is None:
            return train_chunk(state, images, labels, order, num_steps, non_digits, config.seed)
        # The data and the step count are shared; the state, the order and the seed are not.
        if (seed_batching or seed_batching_for(jax.default_backend())) == "vmap":
            each_seed = jax.vmap(train_chunk, in_axes=(0, None, None, 0, None, None, 0))
            return each_seed(state, images, labels, order, num_steps, non_digits, seed_array)

        def one_seed(seed_args: tuple) -> TrainState:
            seed_state, seed_order, seed = seed_args
            return train_chunk(seed_state, images, labels, seed_order, num_steps, non_digits, seed)

        return jax.lax.map(one_seed, (state, order, seed_array))

    return jax.jit(
        train_chunk_of, donate_argnums=0, compiler_options=xla_options(config.quick_compile)
    )


def seed_batching_for(backend: str) -> str:
    """How one `--seeds` program trains its seeds: "vmap", all at once (every matmul batched
    over the seeds: wider work, which fills a GPU or TPU), or "map", one after another (each
    seed's steps are a single seed's program)."""
    return "vmap" if backend != "cpu" else "map"


# fold_in data for the non-digits' random numbers; `augment` folds in 1 to 4.
NON_DIGIT_STREAM = 100


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order in which an epoch visits the training examples. Drawn on the host once per
    epoch: shuffling inside the training chunk added to its compile time at every start."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


def chunk_lengths(start_step: int, schedule: Schedule, chunks_per_epoch: int) -> list[int]:
    """Step counts of the chunks that finish the epoch containing `start_step`."""
    steps_per_epoch = schedule.steps_per_epoch
    chunk = math.ceil(steps_per_epoch / min(chunks_per_epoch, steps_per_epoch))
    position, lengths = start_step % steps_per_epoch, []
    while position < steps_per_epoch:
        lengths.append(min(chunk, steps_per_epoch - position))
        position += lengths[-1]
    return lengths


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """Everything a run needs, built once by `prepare_training`: the compiled chunk and
    evaluation functions and the data on device. Used by `train` and the benchmarks."""

    config: Config
    schedule: Schedule
    mesh: Mesh
    num_classes: int
    graphdef: Any
    param_shapes: dict[str, Any]  # the model's, as `abstract_model` gives them
    tx: optax.GradientTransformation
    learning_rate: optax.Schedule  # tx's, per step
    train_chunk: Any  # jax.jit-compiled: called, and lowered by the benchmarks
    logits_fn: Callable
    train_images: jax.Array
    train_labels: jax.Array
    test_images: jax.Array  # padded to whole evaluation batches
    test_labels: np.ndarray
    calibration_images: jax.Array  # held out of training; padded to whole evaluation batches
    calibration_labels: np.ndarray
    class_names: tuple[str, ...]
    non_digit_images: jax.Array | None = None  # with --non-digit-fraction: (N, 28, 28) uint8
    # With `digitjax train --seeds`: the state holds one run per seed, stacked along a leading
    # axis, each with `config` but for its seed. None: one run, of `config.seed`.
    seeds: tuple[int, ...] | None = None

    def run_configs(self) -> list[Config]:
        """The config of each run the state holds, in the order it holds them."""
        if self.seeds is None:
            return [self.config]
        return [dataclasses.replace(self.config, seed=seed) for seed in self.seeds]

    def init_state(self) -> TrainState:
        return self.stack_states(
            [init_state(c, self.tx, self.param_shapes, self.mesh) for c in self.run_configs()]
        )

    def stack_states(self, states: list[TrainState]) -> TrainState:
        """The state of the runs in `run_configs` order, from each run's own state."""
        if self.seeds is None:
            return states[0]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def run_state(self, state: TrainState, index: int) -> TrainState:
        """The state of run `index` (in `run_configs` order) alone."""
        return state if self.seeds is None else jax.tree.map(lambda leaf: leaf[index], state)

    def epoch_orders(self, epoch: int) -> np.ndarray:
        """The example order of `epoch` (`epoch_order`): (N,), or (seeds, N) with seeds."""
        num_train = self.schedule.num_train
        orders = [epoch_order(c.seed, epoch, num_train) for c in self.run_configs()]
        return orders[0] if self.seeds is None else np.stack(orders)

    def restore_target(self) -> Any:
        """One run's state's shapes, dtypes and placements, for restoring a checkpoint onto.
        Not read from --init-from's run (its shapes are this run's): a resumed run needs only
        its own checkpoint, and that run may be gone."""
        fresh = dataclasses.replace(self.config, init_from=None)
        abstract = jax.eval_shape(lambda: init_state(fresh, self.tx, self.param_shapes))
        return abstract_on(abstract, replicated(self.mesh))

    def eval_params(self, state: TrainState) -> dict[str, Any]:
        """The weights that are evaluated and saved as the model: the average if kept."""
        return state["ema_params"] if uses_ema(self.config) else state["params"]

    def test_metrics(self, state: TrainState, temperature: float | None = None) -> Metrics:
        return split_metrics(
            self.logits_fn,
            self.eval_params(state),
            self.test_images,
            self.test_labels,
            self.class_names,
            temperature,
        )

    def temperature(self, state: TrainState) -> float | None:
        """The temperature that calibrates the evaluated weights' probabilities, fitted on the
        held-out training images; None when none were held out."""
        count = len(self.calibration_labels)
        if count == 0:
            return None
        logits = split_logits(
            self.logits_fn, self.eval_params(state), self.calibration_images, count
        )
        return fit_temperature(logits, self.calibration_labels)


# The fewest held-out images a temperature is fitted on: with fewer, one image moves it.
MIN_CALIBRATION_IMAGES = 100


def prepare_training(
    config: Config, dataset: Dataset, mesh: Mesh, seeds: tuple[int, ...] | None = None
) -> TrainingSetup:
    check_batch_size(config.batch_size, mesh)
    if seeds is not None and mesh.size > 1:
        raise UserError(
            f"--seeds trains on one device ({mesh.size} are in use): pass --devices 1, or "
            "train one seed per run to use them all"
        )
    num_images = len(dataset.train_images)
    dataset, calibration_images, calibration_labels = dataset.hold_out(config.calibration_fraction)
    if config.calibration_fraction and len(calibration_labels) < MIN_CALIBRATION_IMAGES:
        raise UserError(
            f"--calibration-fraction {config.calibration_fraction} holds out "
            f"{len(calibration_labels)} of the {num_images} training images; a temperature "
            f"fitted on fewer than {MIN_CALIBRATION_IMAGES} is noise: raise it, or pass 0 "
            "to train without calibration"
        )
    schedule = Schedule(len(dataset.train_images), config.batch_size, config.epochs)
    if schedule.steps_per_epoch == 0:
        raise UserError(
            f"--batch-size {config.batch_size} exceeds the {schedule.num_train} training images"
        )
    num_classes = len(dataset.class_names)
    graphdef, param_shapes = abstract_model(config, num_classes)
    tx = make_optimizer(config, schedule)
    non_digits = None
    if non_digits_per_batch(config):
        from digitjax.synthetic.non_digits import training_set

        non_digits = put_replicated(training_set(config.non_digit_images), mesh)
    return TrainingSetup(
        config=config,
        schedule=schedule,
        mesh=mesh,
        num_classes=num_classes,
        graphdef=graphdef,
        param_shapes=param_shapes,
        tx=tx,
        learning_rate=learning_rate_schedule(config, schedule),
        train_chunk=make_train_chunk(config, schedule, graphdef, tx, mesh, seeds),
        logits_fn=make_logits_fn(graphdef, mesh),
        train_images=put_replicated(dataset.train_images, mesh),
        train_labels=put_replicated(dataset.train_labels, mesh),
        test_images=put_replicated(pad_to_batches(dataset.test_images), mesh),
        test_labels=dataset.test_labels,
        calibration_images=put_replicated(pad_to_batches(calibration_images), mesh),
        calibration_labels=calibration_labels,
        class_names=dataset.class_names,
        non_digit_images=non_digits,
        seeds=seeds,
    )


def prepare_stoppable(
    config: Config, dataset: Dataset, mesh: Mesh, seeds: tuple[int, ...] | None = None
) -> TrainingSetup:
    """`prepare_training` in a run, whose stop signals wait for a chunk's end: its work has
    no point to stop at and leaves nothing half-written (making the non-digit images takes
    minutes the first time, on worker processes), so a signal ends it at once instead."""
    setup = None
    with interrupts.at_once() as received, contextlib.suppress(interrupts.Stopped):
        setup = prepare_training(config, dataset, mesh, seeds)
    signum = received()  # also one whose exception was swallowed (a GC callback)
    if signum is not None:
        raise Interrupted(
            f"{signal.Signals(signum).name} before training began: nothing was written",
            exit_code=128 + signum,
        )
    assert setup is not None  # a stop signal is the only way out without one
    return setup


def run_chunks(
    setup: TrainingSetup, state: TrainState, step: int
) -> Iterator[tuple[TrainState, int]]:
    """Trains from `step` to the end of the schedule, yielding the state and step after
    every chunk (the state passed in is donated to the first chunk)."""
    schedule = setup.schedule
    while step < schedule.total_steps:
        order = put_replicated(setup.epoch_orders(step // schedule.steps_per_epoch), setup.mesh)
        for length in chunk_lengths(step, schedule, setup.config.chunks_per_epoch):
            state = setup.train_chunk(
                state,
                setup.train_images,
                setup.train_labels,
                order,
                length,
                setup.non_digit_images,
            )
            step += length
            yield state, step


# --- A run: checkpoints, resuming, signals ------------------------------------------------


@dataclasses.dataclass
class Callbacks:
    """How the loop reports progress (process 0 only); the CLI renders these."""

    on_start: Callable[[TrainingSetup, Path, int], None] = lambda setup, run_dir, step: None
    on_chunk: Callable[[int], None] = lambda done_steps: None
    on_epoch: Callable[[dict], None] = lambda record: None  # after the epoch's checkpoint
    on_detector: Callable[[Path], None] = lambda run_dir: None  # before fitting it


@dataclasses.dataclass
class RunLog:
    """What a run has measured, saved in every checkpoint's summary so that a resumed run
    reports exactly as an uninterrupted one: a record per epoch, the training curve per
    chunk, where it ran and its wall time over all its sessions."""

    num_classes: int
    steps_per_epoch: int
    environment: dict
    history: list[dict] = dataclasses.field(default_factory=list)
    curve: list[dict] = dataclasses.field(default_factory=list)
    earlier_seconds: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    step: int = 0
    totals: dict = dataclasses.field(default_factory=dict)  # epoch totals at `step`

    @classmethod
    def resumed(cls, summary: dict, state: TrainState, **kwargs: Any) -> "RunLog":
        return cls(
            **kwargs,
            history=summary["history"],
            curve=summary.get("curve", []),
            earlier_seconds=summary.get("wall_seconds", 0.0),
            step=int(to_host(state["step"])),
            totals=jax.tree.map(lambda t: float(to_host(t)), state["epoch_totals"]),
        )

    def add_chunk(self, step: int, state: TrainState) -> None:
        """Records the chunk that ended at `step`; a loss gone NaN stops the run unsaved."""
        totals = jax.tree.map(lambda t: float(to_host(t)), state["epoch_totals"])
        if not math.isfinite(totals["loss"]):
            raise Diverged(step)
        starts_epoch = self.step % self.steps_per_epoch == 0
        before = {k: 0.0 for k in totals} if starts_epoch else self.totals
        count = totals["count"] - before["count"]
        self.curve.append(
            {
                "step": step,
                "epoch": step / self.steps_per_epoch,
                "train_loss": (totals["loss"] - before["loss"]) / count,
                "train_accuracy": (totals["correct"] - before["correct"]) / count,
            }
        )
        self.step, self.totals = step, totals

    def add_epoch(self, metrics: Metrics) -> dict:
        """The test loss and ECE are those of the calibrated probabilities, as `evaluate`
        reports them."""
        record = {
            "epoch": self.step // self.steps_per_epoch,
            "step": self.step,
            "train_loss": self.totals["loss"] / self.totals["count"],
            "train_accuracy": self.totals["correct"] / self.totals["count"],
            "test_loss": metrics.loss,
            "test_accuracy": metrics.accuracy,
            "temperature": metrics.temperature,
            "test_ece": metrics.ece,
        }
        self.history.append(record)
        return record

    def epoch_recorded(self) -> bool:
        return bool(self.history) and self.history[-1]["step"] == self.step

    def summary(self, temperature: float | None) -> RunSummary:
        """`temperature`: that of the weights saved with this summary."""
        return {
            "num_classes": self.num_classes,
            "history": self.history,
            "last": self.history[-1] if self.history else None,
            "best": max(self.history, key=lambda r: r["test_accuracy"], default=None),
            "curve": self.curve,
            "environment": self.environment,
            "wall_seconds": self.earlier_seconds + time.perf_counter() - self.started,
            "temperature": temperature,
        }

    def last_temperature(self) -> float | None:
        """The temperature of the weights at the last epoch's end (older runs have none)."""
        return self.history[-1].get("temperature") if self.history else None


class Diverged(Exception):
    def __init__(self, step: int):
        self.step = step


def train(
    requested: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    given: frozenset[str] = frozenset(),
    callbacks: Callbacks | None = None,
    dataset: Dataset | None = None,
    mesh: Mesh | None = None,
    profile: Path | None = None,
) -> TrainResult:
    """Trains (or resumes) the run in `run_dir` on `mesh` (default: all devices) and returns
    its summary and config. `given` names the settings the user chose, which must agree with
    a resumed run's. In a multi-process job every process calls this; process 0 reports,
    locks the folder and writes its TensorBoard events (and, into `profile`, a trace of a
    few chunks). (Many seeds at once: digitjax/seeds.py.)"""
    mesh = mesh or make_mesh()
    tracker = RunTracker(profile)  # checks --profile before any work
    with run_session(run_dir) as received_signal:
        checkpoint.check_run_dir(run_dir, resume, overwrite)
        config = resolve_config(run_dir, requested, resume, given)
        setup = prepare_stoppable(
            config, dataset or load_dataset(config.dataset, config.data_dir), mesh
        )
        # Read before the run folder is touched: a bad --init-from is an input error.
        fresh_state = None if resume else setup.init_state()
        # Only now, with every input checked, may --overwrite remove the previous run.
        sync("run dir checked")
        if is_main_process():
            checkpoint.prepare_run_dir(run_dir, resume)
        sync("run dir ready")
        runs = [(run_dir, tracker)]
        return train_runs(setup, run_dir, runs, fresh_state, callbacks, received_signal)[0]


@contextlib.contextmanager
def run_session(run_dir: Path) -> Iterator[Callable[[], int | None]]:
    """The run folder locked for this process (process 0) and stop signals deferred; yields
    the function that says which signal arrived. Ctrl-C and SIGTERM (what `timeout`, SLURM
    and Kubernetes send) stop the run at the end of the current chunk, where the state is
    whole and can be saved; an exception could land inside Orbax mid-write instead. One that
    arrives once the last chunk is done lets the run finish. A second signal acts at once."""
    lock = checkpoint.run_lock(run_dir) if is_main_process() else contextlib.nullcontext()
    with lock, interrupts.deferred() as received_signal:
        yield received_signal


def resolve_config(run_dir: Path, requested: Config, resume: bool, given: frozenset[str]) -> Config:
    """On resume the saved config rules; flags that contradict it are an error, not ignored."""
    if not resume:
        return requested
    saved, _ = checkpoint.read_config(run_dir, checkpoint.LATEST)
    clashes = [name for name in sorted(given) if getattr(saved, name) != getattr(requested, name)]
    if clashes:

        def shown(value: object) -> str:  # as the flag takes it
            return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

        differ = ", ".join(
            f"--{name.replace('_', '-')} {shown(getattr(requested, name))} "
            f"(the run's: {shown(getattr(saved, name))})"
            for name in clashes
        )
        raise UserError(
            f"cannot resume with other settings than the run's: {differ}; a run resumes with "
            "its own: drop these flags"
        )
    return saved


@dataclasses.dataclass
class SeedRun:
    """One of the runs a training program advances (one per seed with `--seeds`, else the
    run itself): its config, folder, checkpoints, log and TensorBoard events."""

    config: Config
    run_dir: Path
    checkpointer: checkpoint.RunCheckpointer
    log: RunLog
    tracker: RunTracker  # started on process 0 only


def train_runs(
    setup: TrainingSetup,
    run_dir: Path,
    folders: list[tuple[Path, RunTracker]],
    fresh_state: TrainState | None,
    callbacks: Callbacks | None,
    received_signal: Callable[[], int | None],
) -> list[TrainResult]:
    """Trains the runs of `setup` (`run_configs`), each in its folder with its tracker
    (`folders`), in the run folder the user named, `run_dir`: from `fresh_state` (a new run),
    or (None) each from its latest checkpoint, all of which must be at one step. A `--seeds`
    run keeps two of each kind: see digitjax/seeds.py."""
    keep = 1 if setup.seeds is None else 2
    try:
        with contextlib.ExitStack() as stack:
            checkpointers = [checkpoint.RunCheckpointer(folder, keep) for folder, _ in folders]
            for checkpointer, (_, tracker) in zip(checkpointers, folders, strict=True):
                stack.callback(checkpointer.close)
                stack.callback(tracker.close)
            state, runs = _start(setup, folders, fresh_state, checkpointers)
            results = _run(setup, run_dir, state, runs, callbacks or Callbacks(), received_signal)
    except Interrupted as e:
        # The interrupt's line is the command's last: a trace that failed is told in it.
        failures = [tracker.trace_failure for _, tracker in folders if tracker.trace_failure]
        if not failures:
            raise
        raise Interrupted("; ".join([str(e), *failures]), e.exit_code) from None
    for _, tracker in folders:
        tracker.check_trace()
    return results


def _run(
    setup: TrainingSetup,
    run_dir: Path,
    initial_state: TrainState,
    runs: list[SeedRun],
    callbacks: Callbacks,
    received_signal: Callable[[], int | None],
) -> list[TrainResult]:
    """The loop: chunks, an evaluation and checkpoint at each epoch end, and a checkpoint
    at the first chunk end after a stop signal."""
    main, start_step = is_main_process(), runs[0].log.step
    if main:
        for run in runs:
            write_metrics_file(run.run_dir, run.log.history)
        callbacks.on_start(setup, run_dir, start_step)
    schedule = setup.schedule
    for state, step in run_chunks(setup, initial_state, start_step):
        if main:  # first: a bar left where the run diverged shows where that was
            callbacks.on_chunk(step)
        for index, run in enumerate(runs):
            try:
                run.log.add_chunk(step, setup.run_state(state, index))
            except Diverged:
                message = _diverged_message(step, run.checkpointer, run_dir)
                raise UserError(message) from None
        if main:
            for run in runs:
                run.tracker.on_curve(run.log.curve[-1])
                run.tracker.on_chunk(step)
        if step % schedule.steps_per_epoch == 0:
            for index, run in enumerate(runs):
                _end_epoch(setup, run, setup.run_state(state, index), callbacks)
        signum = received_signal()
        if signum is not None and step < schedule.total_steps:
            for index, run in enumerate(runs):
                _save_interrupted(setup, run, setup.run_state(state, index))
            saved = run_dir / checkpoint.LATEST if setup.seeds is None else run_dir
            raise Interrupted(
                f"{signal.Signals(signum).name} at step {step}: saved to {saved}; continue "
                "with --resume",
                exit_code=128 + signum,
            )
    if main:
        from digitjax.plots import plot_curves

        for run in runs:
            if run.log.history:
                curves = run.run_dir / checkpoint.CURVES_FILE
                try:
                    plot_curves(run.log.history, run.log.curve, curves)
                except OSError as e:  # a full disk: the training itself is safe, say so
                    raise UserError(
                        f"cannot write {curves}: {e.strerror or e}; the run's checkpoints are "
                        "complete (--resume draws the curves)"
                    ) from None
        for run in runs:
            if run.config.non_digit_detector:
                _fit_detector(run.run_dir, callbacks, received_signal)
    return [
        {"config": run.config.to_dict(), **run.log.summary(run.log.last_temperature())}
        for run in runs
    ]


def _start(
    setup: TrainingSetup,
    folders: list[tuple[Path, RunTracker]],
    fresh_state: TrainState | None,
    checkpointers: list[checkpoint.RunCheckpointer],
) -> tuple[TrainState, list[SeedRun]]:
    """`fresh_state` with new logs, or (None) each run's latest checkpoint's state with its
    log, after repairing what a kill during an epoch end may have left undone; each run's
    events started at its step."""
    info = {
        "num_classes": setup.num_classes,
        "steps_per_epoch": setup.schedule.steps_per_epoch,
        "environment": runtime_info(setup.mesh),
    }
    each = zip(setup.run_configs(), folders, checkpointers, strict=True)
    runs = [
        SeedRun(config, folder, saver, RunLog(**info), tracker)
        for config, (folder, tracker), saver in each
    ]
    if fresh_state is not None:
        for run in runs:
            _start_tracking(setup, run)
        return fresh_state, runs
    states = []
    for run in runs:
        state, summary = checkpoint.restore_state(run.run_dir, setup.restore_target())
        run.log = RunLog.resumed(summary, state, **info)
        states.append(state)
    if len({run.log.step for run in runs}) > 1:
        steps = ", ".join(f"{run.run_dir}: step {run.log.step}" for run in runs)
        raise UserError(f"cannot resume: the runs' latest checkpoints disagree ({steps})")
    for run, state in zip(runs, states, strict=True):
        _start_tracking(setup, run)
        _repair(setup, run, state)
    return setup.stack_states(states), runs


def _start_tracking(setup: TrainingSetup, run: SeedRun) -> None:
    if is_main_process():
        run.tracker.on_start(setup, run.config, run.run_dir, run.log.step)


def _repair(setup: TrainingSetup, run: SeedRun, state: TrainState) -> None:
    """Completes an epoch end that a kill cut short in a resumed run."""
    log = run.log
    if log.step % setup.schedule.steps_per_epoch == 0 and log.step and not log.epoch_recorded():
        # Saved at an epoch's end before its evaluation (digitjax before 2026-11-29).
        _end_epoch(setup, run, state, Callbacks())
    summary = log.summary(log.last_temperature())
    best = summary["best"]
    if best is not None and best["step"] == log.step and run.checkpointer.best_step() != log.step:
        # Killed after the latest checkpoint of a new best epoch, before its best/ copy.
        run.checkpointer.save(checkpoint.BEST, state, run.config, summary)


def _end_epoch(setup: TrainingSetup, run: SeedRun, state: TrainState, callbacks: Callbacks) -> None:
    """Calibrates and evaluates, then saves latest/ and, for a new best epoch, best/ (in that
    order: a kill between the two is repaired on resume), then the metrics file."""
    metrics = setup.test_metrics(state, setup.temperature(state))
    record = run.log.add_epoch(metrics)
    if is_main_process():
        run.tracker.on_evaluated(record, metrics)
    summary = run.log.summary(record["temperature"])
    run.checkpointer.save(checkpoint.LATEST, state, run.config, summary)
    if summary["best"] is record:
        run.checkpointer.save(checkpoint.BEST, state, run.config, summary)
    if is_main_process():
        write_metrics_file(run.run_dir, run.log.history)
        callbacks.on_epoch(record if setup.seeds is None else {**record, "seed": run.config.seed})


def _save_interrupted(setup: TrainingSetup, run: SeedRun, state: TrainState) -> None:
    """The latest checkpoint of a run stopped mid-epoch or at an epoch end."""
    # Mid-epoch weights are not those of the last record: they get their own fit.
    recorded = run.log.epoch_recorded()
    temperature = run.log.last_temperature() if recorded else setup.temperature(state)
    run.checkpointer.save(checkpoint.LATEST, state, run.config, run.log.summary(temperature))


def _fit_detector(
    run_dir: Path, callbacks: Callbacks, received_signal: Callable[[], int | None]
) -> None:
    """The non-digit detector of the finished run's best checkpoint (`--non-digit-detector`).
    A stop signal now, or one that came after the last chunk, ends the command with the run
    complete and the detector fitted whole or not at all: `--resume` fits a missing one."""
    from digitjax import detector

    signum = received_signal()
    if signum is None:
        callbacks.on_detector(run_dir)
        with interrupts.at_once() as received_now:
            with contextlib.suppress(interrupts.Stopped):
                detector.fit_for_run(run_dir)
        signum = received_now()
    if signum is not None:
        raise Interrupted(
            f"{signal.Signals(signum).name} while fitting the non-digit detector: the "
            f"training in {run_dir} is complete; --resume fits the detector if it is missing",
            exit_code=128 + signum,
        )


def _diverged_message(step: int, checkpointer: checkpoint.RunCheckpointer, run_dir: Path) -> str:
    saved = checkpointer.managers[checkpoint.LATEST].latest_step()
    kept = (
        f"The last good checkpoint (step {saved}) is kept in {run_dir}; resume it with "
        "--resume, or start again with --overwrite"
        if saved is not None
        else "No checkpoint had been written yet; the same command starts the run again"
    )
    return (
        f"loss became NaN/inf at step {step}; stopped without saving it. {kept}. "
        "Try a lower --learning-rate"
    )


def write_metrics_file(run_dir: Path, history: list[dict]) -> None:
    """Rewritten whole from the history, so it always agrees with the checkpoints."""
    lines = "".join(json.dumps(record) + "\n" for record in history)
    write_file(run_dir / checkpoint.METRICS_FILE, lines.encode())

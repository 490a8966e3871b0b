"""Where the time of `digitjax train --seeds` goes, against one seed: the compile, one chunk of
training steps (wall and CPU seconds, GFLOP/s against the matmul peak measured in the same
run) and one epoch end's evaluation, for each seed count, interleaved (the machine is shared).

    python benchmarks/seeds_profile.py --seed-counts 1,4 --repeats 5

One chunk is what `digitjax train` runs between two host round trips (a tenth of an epoch).
"""

import argparse
import dataclasses
import statistics
import time

import jax

from digitjax.benchmark import flops_of, matmul_peak
from digitjax.config import Config
from digitjax.data import load_dataset
from digitjax.distributed import make_mesh, put_replicated
from digitjax.model import normalize
from digitjax.train import (
    TrainingSetup,
    chunk_lengths,
    make_train_chunk,
    make_train_step,
    prepare_training,
)


@dataclasses.dataclass
class Profile:
    setup: TrainingSetup
    compile_s: float
    chunk: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {"wall": [], "cpu": []}
    )
    evaluation: list[float] = dataclasses.field(default_factory=list)


def prepared(config: Config, count: int, batching: str) -> Profile:
    dataset = load_dataset(config.dataset, config.data_dir)
    seeds = None if count == 1 else tuple(range(count))
    setup = prepare_training(config, dataset, make_mesh(1), seeds)
    chunk = make_train_chunk(
        config, setup.schedule, setup.graphdef, setup.tx, None, seeds, batching
    )
    setup = dataclasses.replace(setup, train_chunk=chunk)
    state, steps = setup.init_state(), chunk_lengths(0, setup.schedule, config.chunks_per_epoch)[0]
    order = put_replicated(setup.epoch_orders(0), setup.mesh)
    start = time.perf_counter()
    setup.train_chunk.lower(state, setup.train_images, setup.train_labels, order, steps).compile()
    return Profile(setup, time.perf_counter() - start)


def measure(profile: Profile) -> None:
    """One timed chunk (after a warm-up one) and one epoch end's evaluation of every seed."""
    setup = profile.setup
    steps = chunk_lengths(0, setup.schedule, setup.config.chunks_per_epoch)[0]
    state = setup.init_state()
    order = put_replicated(setup.epoch_orders(0), setup.mesh)
    args = (setup.train_images, setup.train_labels, order, steps)
    state = jax.block_until_ready(setup.train_chunk(state, *args))
    wall, cpu = time.perf_counter(), time.process_time()
    state = jax.block_until_ready(setup.train_chunk(state, *args))
    profile.chunk["wall"].append(time.perf_counter() - wall)
    profile.chunk["cpu"].append(time.process_time() - cpu)
    start = time.perf_counter()
    for index in range(len(setup.run_configs())):
        seed_state = setup.run_state(state, index)
        setup.test_metrics(seed_state, setup.temperature(seed_state))
    profile.evaluation.append(time.perf_counter() - start)


def step_flops(setup: TrainingSetup) -> float:
    """Useful FLOPs of one seed's step: the reference model's (as `digitjax benchmark`)."""
    config = setup.config
    step = jax.jit(make_train_step(config, setup.graphdef, setup.tx))
    state = setup.run_state(setup.init_state(), 0)
    batch = normalize(setup.train_images[: config.batch_size])
    return flops_of(step.lower(state, batch, setup.train_labels[: config.batch_size]).compile())


def main() -> None:
    parser = argparse.ArgumentParser(description="Where the time of train --seeds goes.")
    parser.add_argument("--runs", default="1,4:vmap,4:map", help="seed count[:batching]")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = Config()
    runs = [(int(run.split(":")[0]), (run.split(":") + ["map"])[1]) for run in args.runs.split(",")]
    profiles = {run: prepared(config, *run) for run in runs}
    for _ in range(args.repeats):
        for run in runs:
            measure(profiles[run])
    peak = matmul_peak()["gflops"]
    flops = step_flops(profiles[runs[0]].setup)
    print(f"matmul peak {peak:.1f} GFLOP/s; {flops / 1e6:.1f} MFLOP per seed per step")
    print("| seeds | batching | compile s | chunk wall s | chunk CPU s | cores busy "
          "| per seed-step | GFLOP/s | % of peak | epoch-end evaluation s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (count, batching), profile in profiles.items():
        setup = profile.setup
        steps = chunk_lengths(0, setup.schedule, config.chunks_per_epoch)[0]
        wall, cpu = (statistics.median(profile.chunk[k]) for k in ("wall", "cpu"))
        gflops = flops * count * steps / wall / 1e9
        print(
            f"| {count} | {batching if count > 1 else '-'} | {profile.compile_s:.1f} "
            f"| {wall:.2f} | {cpu:.2f} | {cpu / wall:.2f} "
            f"| {wall / (steps * count) * 1e3:.2f} ms | {gflops:.1f} | {100 * gflops / peak:.0f}% "
            f"| {statistics.median(profile.evaluation):.2f} |"
        )
    print(f"chunks of a tenth of an epoch, batch {config.batch_size}; medians of {args.repeats}")


if __name__ == "__main__":
    main()

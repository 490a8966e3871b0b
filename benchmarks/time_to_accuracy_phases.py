"""Where the start of `digitjax benchmark --target` goes, in several versions of digitjax, in
fresh processes run alternately (ABBA: the shared machine's drift falls on all alike): the
set-up (data on the device, the initial state, the test set's check), then the training
chunk's tracing, lowering and XLA compile, and its first and second runs (the first pays
one-time costs of its own). Medians (min..max) of the wall seconds, and the process CPU seconds.

    git worktree add /tmp/before <commit>
    python benchmarks/time_to_accuracy_phases.py before=/tmp/before now=. --rounds 8

Versions from 2026-12-07 on (`time_to_accuracy_recipe`).
"""

import argparse
import statistics
from pathlib import Path

from time_to_accuracy_ab import run_in_tree

PHASES = """
import dataclasses, json, time
import jax
from digitjax.benchmark import CHECKS_PER_EPOCH, make_target_check, time_to_accuracy_recipe
from digitjax.config import Config
from digitjax.data import load_dataset
from digitjax.distributed import make_mesh, put_replicated
from digitjax.train import chunk_lengths, epoch_order, prepare_training
config = time_to_accuracy_recipe(Config.from_flags({}, "fast"))
dataset, mesh = load_dataset("mnist"), make_mesh()
config = dataclasses.replace(config, chunks_per_epoch=CHECKS_PER_EPOCH)
times, cpu_start = [time.perf_counter()], time.process_time()
setup = prepare_training(config, dataset, mesh)
state = setup.init_state()
make_target_check(setup, dataset, 0.99, setup.eval_params(state))
times.append(time.perf_counter())
order = put_replicated(epoch_order(config.seed, 0, setup.schedule.num_train), mesh)
steps = chunk_lengths(0, setup.schedule, CHECKS_PER_EPOCH)[0]  # as run_chunks runs it
inputs = (setup.train_images, setup.train_labels, order, steps, None)
traced = setup.train_chunk.trace(state, *inputs)
times.append(time.perf_counter())
lowered = traced.lower()
times.append(time.perf_counter())
compiled = lowered.compile()
times.append(time.perf_counter())
for _ in range(2):
    state = jax.block_until_ready(compiled(state, *inputs))
    times.append(time.perf_counter())
names = ("set-up", "trace", "lower", "compile", "first chunk", "second chunk")
phases = {name: b - a for name, a, b in zip(names, times, times[1:])}
print(json.dumps({**phases, "total": times[-1] - times[0], "cpu": time.process_time() - cpu_start}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("versions", nargs="+", help="NAME=SOURCE_TREE")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    versions = [(name, Path(tree)) for name, tree in (v.split("=", 1) for v in args.versions)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in versions}
    for round_number in range(args.rounds):
        for name, source in versions if round_number % 2 == 0 else versions[::-1]:
            runs[name].append(run_in_tree(PHASES, source))
    for name, measured in runs.items():
        cells = []
        for phase in measured[0]:
            values = [run[phase] for run in measured]
            cells.append(
                f"{phase} {statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"
            )
        print(f"{name}: " + ", ".join(cells))


if __name__ == "__main__":
    main()

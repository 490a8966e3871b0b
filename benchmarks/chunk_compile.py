"""Compile time of `--preset fast`'s training chunk, and the speed of the program compiled, with
XLA compiler options given as KEY=VALUE (none: the preset's, its quick compile; XLA's own
defaults: xla_cpu_use_fusion_emitters=true). Process CPU seconds, steadier than wall seconds
on a shared machine.

    python benchmarks/chunk_compile.py [xla_backend_optimization_level=1 ...]
"""

import json
import sys
import time

import jax

from digitjax.config import Config
from digitjax.data import load_dataset
from digitjax.distributed import make_mesh, put_replicated
from digitjax.train import epoch_order, prepare_training


def main() -> None:
    options = dict(arg.split("=", 1) for arg in sys.argv[1:])
    options = {k: json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
               for k, v in options.items()}  # fmt: skip
    setup = prepare_training(Config.from_flags({}, "fast"), load_dataset("mnist"), make_mesh())
    state = setup.init_state()
    order = put_replicated(epoch_order(0, 0, setup.schedule.num_train), setup.mesh)
    inputs = (setup.train_images, setup.train_labels, order, setup.schedule.steps_per_epoch // 10)
    started = time.process_time()
    lowered = setup.train_chunk.lower(state, *inputs)
    lowered_at = time.process_time()
    compiled = lowered.compile(options) if options else lowered.compile()
    compiled_at = time.process_time()
    state = jax.block_until_ready(compiled(state, *inputs))  # the first run: warm-up
    chunk_seconds = []
    for _ in range(3):
        start = time.perf_counter()
        state = jax.block_until_ready(compiled(state, *inputs))
        chunk_seconds.append(round(time.perf_counter() - start, 3))
    print(
        json.dumps(
            {
                "options": options,
                "lowering_cpu_s": round(lowered_at - started, 3),
                "compile_cpu_s": round(compiled_at - lowered_at, 3),
                "chunk_wall_s": chunk_seconds,
            }
        )
    )


if __name__ == "__main__":
    main()

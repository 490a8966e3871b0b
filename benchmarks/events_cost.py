"""What writing TensorBoard events costs a `digitjax train` run: the wall and CPU seconds spent
inside the run's `RunTracker` callbacks (every chunk's scalars, every epoch's, the final
figures), measured in the run itself, beside the run's own wall time.

    python benchmarks/events_cost.py EPOCHS    # the default recipe, for EPOCHS epochs
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from digitjax import tracking
from digitjax.config import Config
from digitjax.train import train

spent = {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0}


def timed(method):
    def call(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            spent["wall_s"] += time.perf_counter() - wall
            spent["cpu_s"] += time.process_time() - cpu
            spent["calls"] += 1

    return call


def main() -> None:
    config = Config(epochs=int(sys.argv[1]))
    for name in ("on_start", "on_curve", "on_evaluated", "close"):
        setattr(tracking.RunTracker, name, timed(getattr(tracking.RunTracker, name)))
    with tempfile.TemporaryDirectory() as folder:
        wall, cpu = time.perf_counter(), time.process_time()
        summary = train(config, Path(folder) / "run")
        run = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    print(json.dumps({"run": run, "events": spent, "epochs": len(summary["history"])}))


if __name__ == "__main__":
    main()

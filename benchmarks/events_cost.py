"""What writing TensorBoard events costs a `digitjax train` run: the wall and CPU seconds spent
inside the run's `RunTracker` callbacks (every chunk's scalars, every epoch's, the final
figures), measured in the run itself, beside the run's own wall time. Matplotlib is imported
before the run: the run imports it at its end anyway, for curves.png.

    python benchmarks/events_cost.py EPOCHS    # the default recipe, for EPOCHS epochs
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import digitjax.plots  # noqa: F401  (see above)
from digitjax import tracking
from digitjax.config import Config
from digitjax.train import train

METHODS = ("on_start", "on_curve", "on_evaluated", "close")
spent = {name: {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0} for name in METHODS}


def timed(name, method):
    def call(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            spent[name]["wall_s"] += time.perf_counter() - wall
            spent[name]["cpu_s"] += time.process_time() - cpu
            spent[name]["calls"] += 1

    return call


def main() -> None:
    config = Config(epochs=int(sys.argv[1]))
    for name in METHODS:
        setattr(tracking.RunTracker, name, timed(name, getattr(tracking.RunTracker, name)))
    with tempfile.TemporaryDirectory() as folder:
        wall, cpu = time.perf_counter(), time.process_time()
        summary = train(config, Path(folder) / "run")
        run = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    total = {key: sum(method[key] for method in spent.values()) for key in ("wall_s", "cpu_s")}
    events = {"total": total, **spent}
    print(json.dumps({"run": run, "events": events, "epochs": len(summary["history"])}, indent=1))


if __name__ == "__main__":
    main()

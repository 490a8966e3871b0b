#!/usr/bin/env bash
# benchmarks/device_check.py on a GPU/TPU machine whose Python has jax for its device but not
# digitjax's other needs: installs the wheels of the repository's ignored .whl/ folder (made
# with `pip download`, see benchmarks/README.md, "Device check") into /tmp/site without
# touching the preinstalled packages (no jax from there), then runs the check from the root.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 benchmarks/device_check.py "$@"

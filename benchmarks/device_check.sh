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
# The `digitjax` command, which tests start as a process, without installing the package.
mkdir -p /tmp/digitjax-bin
printf '#!/bin/sh\nexec python3 -c "from digitjax.launch import main; main()" "$@"\n' \
    > /tmp/digitjax-bin/digitjax
chmod +x /tmp/digitjax-bin/digitjax
export PATH="/tmp/digitjax-bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec python3 benchmarks/device_check.py "$@"

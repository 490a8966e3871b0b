"""The run and data-cache locks: cross-platform (nothing imports fcntl, which Windows lacks),
naming their holder, and released by the operating system when the holder dies."""

import pkgutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import digitjax
from digitjax import filelocks

HOLD_UNTIL_KILLED = """
import sys, time
from pathlib import Path
from digitjax import filelocks
with filelocks.locked(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_holder_is_named_and_a_killed_holder_leaves_no_stale_lock(tmp_path: Path):
    lock_file = tmp_path / "lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_UNTIL_KILLED, str(lock_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(filelocks.Held) as held:
            with filelocks.locked(lock_file, wait=False):
                pass
        assert held.value.holder.startswith(f"{holder.pid} on ")
    finally:
        holder.send_signal(getattr(signal, "SIGKILL", signal.SIGTERM))
        holder.wait()
    with filelocks.locked(lock_file, wait=False):  # released with the process
        pass


def test_every_module_imports_without_fcntl():
    """As on Windows, where JAX runs on CPU: fcntl cannot be imported at all."""
    modules = [m.name for m in pkgutil.walk_packages(digitjax.__path__, "digitjax.")]
    script = textwrap.dedent(f"""
        import importlib, sys
        class NoFcntl:
            def find_spec(self, name, path=None, target=None):
                if name == "fcntl":
                    raise ImportError("no fcntl on this platform")
        sys.meta_path.insert(0, NoFcntl())
        for name in {modules!r}:
            importlib.import_module(name)
    """)
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr

"""The run and data-cache locks: cross-platform (nothing imports fcntl, which Windows lacks),
naming their holder, and released by the operating system when the holder dies."""

import os
import pkgutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from filelock import lock_descriptor

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


def test_a_process_refused_the_lock_waits_for_the_holder_to_write_its_name(tmp_path: Path):
    """Two processes starting at once: the second, refused between the first's lock and its
    name, named the holder "unknown"; it now waits for the name."""
    lock_file = tmp_path / "lock"
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT)
    try:
        assert lock_descriptor(fd, blocking=False)  # locked, no name written yet
        naming = threading.Timer(0.2, filelocks._write_holder, (fd, "4242 on elsewhere\n"))
        naming.start()
        with pytest.raises(filelocks.Held) as held:
            with filelocks.locked(lock_file, wait=False):
                pass
        naming.join()
        assert held.value.holder == "4242 on elsewhere"
    finally:
        os.close(fd)


def test_a_holder_that_ends_leaves_no_name_behind(tmp_path: Path):
    lock_file = tmp_path / "lock"
    with filelocks.locked(lock_file):
        assert str(os.getpid()) in lock_file.read_bytes()[filelocks.HOLDER_OFFSET :].decode()
    assert lock_file.read_bytes()[filelocks.HOLDER_OFFSET :] == b""

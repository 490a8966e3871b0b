import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_check_quick_mode_on_cpu(tiny_mnist, tmp_path):
    """benchmarks/device_check.py is run on a GPU once in a while, by hand: its quick mode
    runs every step of it here, so that it does not break between those runs."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "benchmarks/device_check.py", "--quick", "--out", str(tmp_path)]
        + ["--data-dir", str(tiny_mnist)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "device_check.json").read_text())
    assert results["device"].startswith("cpu") and results["jax"]
    assert results["benchmark"]["json"]["training"][0]["images_per_s"] > 0
    assert results["train"]["json"]["config"]["epochs"] == 1
    exported = results["exported_model"]
    # The exported file gives every test image the digit evaluation gave it.
    assert exported["accuracy"] == exported["checkpoint_accuracy"]
    table = (tmp_path / "device_check.txt").read_text()
    assert table == done.stdout
    assert "StableHLO file on the device" in table and "training, batch 128" in table

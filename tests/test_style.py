import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_clean(command: list[str]):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr

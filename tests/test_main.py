"""`python -m brnpa_triton --self-check`, the operator check the README points to."""

import os
import subprocess
import sys


def test_self_check_runs_and_passes():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "brnpa_triton", "--self-check"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cpu: backends available: torch" in result.stdout
    assert "torch: ok" in result.stdout

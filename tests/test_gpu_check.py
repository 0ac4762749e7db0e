"""scripts/gpu_check.py is what a session with a GPU runs in its few minutes of device time: its
own logic (cases, poisoning, tolerances, fp16 saturation, strided views, ranking by activity) is
rehearsed here under the interpreter."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_rehearsal_passes_under_the_interpreter():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--interpret"],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu_check --interpret: 7 passed, 0 failed" in result.stdout

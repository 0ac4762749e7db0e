"""`python -m brnpa_triton`: the --self-check operator check the README points to, and --help."""

import os
import subprocess
import sys

import pytest

from brnpa_triton.__main__ import main


def test_self_check_runs_and_passes():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "brnpa_triton", "--self-check"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cpu: backends available: torch" in result.stdout
    assert "torch: ok" in result.stdout


def test_help_lists_the_demo_options_and_self_check(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python -m brnpa_triton" in text and "--out OUT" in text  # the demo's options
    assert "python -m brnpa_triton --self-check" in text and "--self-check  " in text


def test_self_check_takes_no_other_argument(capsys):
    assert main(["--self-check", "--out", "x"]) == 2
    assert "takes no other argument" in capsys.readouterr().err

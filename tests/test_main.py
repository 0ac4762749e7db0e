"""`python -m brnpa_triton`: the --self-check operator check the README points to, --help, and
the demo options it passes on."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

import brnpa_triton.__main__ as cli
from brnpa_triton.__main__ import main


def test_self_check_runs_passes_and_names_triton():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "brnpa_triton", "--self-check"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "cpu: backends available: torch" in out
    assert "torch: ok" in out
    if importlib.util.find_spec("triton") is not None:
        import triton

        assert f"triton {triton.__version__}" in out.splitlines()[0]
        assert "triton: skipped on cpu: the fused kernels run on CUDA tensors" in out
    if torch.cuda.is_available():
        assert "cuda: backends available: torch, triton" in out and "  triton: ok" in out
    else:
        assert "cuda: skipped: no CUDA device (torch.cuda.is_available() is False)" in out


def test_self_check_says_why_triton_is_skipped_when_it_is_not_installed(monkeypatch, capsys):
    monkeypatch.setattr(cli, "triton_installed", lambda: False)
    monkeypatch.setattr("brnpa_triton.dispatch.TRITON_INTERPRETER", False)
    assert cli.self_check() == 0
    out = capsys.readouterr().out
    assert "triton is not installed (pip install 'brnpa-triton[triton]'" in out.splitlines()[0]
    assert "  triton: skipped on cpu: triton is not installed" in out


def test_help_lists_the_self_check_once_and_every_option_with_help_and_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m brnpa_triton")
    assert len(re.findall(r"^\s+--self-check", text, flags=re.M)) == 1
    for action in cli.build_parser()._actions:
        if action.dest != "help":
            assert action.help, action.option_strings
    options = re.findall(r"^\s+(--[a-z-]+)", text, flags=re.M)
    assert len(options) == 10 and text.count("(default:") == len(options)  # every option but -h, --help


def test_the_demo_options_are_those_of_the_demo_itself(capsys):
    from brnpa_triton.demo import main as demo_main

    with pytest.raises(SystemExit):
        demo_main(["--help"])
    demo_options = set(re.findall(r"^\s+(--[a-z-]+)", capsys.readouterr().out, flags=re.M))
    ours = {o for a in cli.build_parser()._actions for o in a.option_strings if o.startswith("--")}
    assert ours - {"--help", "--self-check"} == demo_options - {"--help"}


def test_demo_options_reach_the_demo(monkeypatch):
    import brnpa_triton.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert main(["--epochs", "2", "--seeds", "4", "5", "--no-progress", "--out", "somewhere"]) == 0
    (config,) = seen
    assert (config.epochs, config.seeds, config.progress, config.out) == (2, (4, 5), False, "somewhere")
    assert config.num_parts == demo.DemoConfig().num_parts


def test_self_check_takes_no_other_argument(capsys):
    assert main(["--self-check", "--out", "x"]) == 2
    assert "takes no other argument" in capsys.readouterr().err

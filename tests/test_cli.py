"""`python -m brnpa_triton --help` names both modes."""

import pytest

from brnpa_triton.__main__ import main


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

"""A tiny smoke run of the demo (seconds): it trains, evaluates, writes PNGs and JSON, reproducibly."""

import json
import os

import pytest

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the 'demo' extra)")

from brnpa_triton.demo import DemoConfig, run_demo  # noqa: E402


def tiny(out):
    return DemoConfig(
        out=os.fspath(out), epochs=1, copies=1, max_train=48, max_test=12, batch_size=16, width=4,
        di_images=3, di_step=16, overlays=2, progress=False,
    )


def test_demo_smoke_and_reproducible(tmp_path):
    res = run_demo(tiny(tmp_path / "a"), verbose=False)
    files = set(os.listdir(tmp_path / "a"))
    assert {"results.json", "overlays.png", "overlay_0.png", "overlay_1.png", "model.pt"} <= files
    with open(tmp_path / "a" / "results.json") as f:
        saved = json.load(f)
    for key in ("test_accuracy", "pointing", "sparsity_brnpa", "deletion_auc", "insertion_auc", "seconds"):
        assert key in saved
    assert set(saved["deletion_auc"]) == {"brnpa", "gradcam", "random"}
    assert set(saved["pointing"]) == {"brnpa_map0", "brnpa", "gradcam", "random"}
    assert saved["feature_map"] == [12, 12] and saved["test_images"] == 12
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    with open(tmp_path / "a" / "overlays.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    again = run_demo(tiny(tmp_path / "b"), verbose=False)
    for key in ("test_accuracy", "pointing", "sparsity_brnpa", "deletion_auc", "insertion_auc", "train_log"):
        if key == "train_log":
            assert again[key]["epoch_loss"] == res[key]["epoch_loss"]
        else:
            assert again[key] == res[key]


def test_module_entry_point_arguments(capsys):
    from brnpa_triton.__main__ import main

    assert main(["--self-check", "--extra"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--out" in capsys.readouterr().out

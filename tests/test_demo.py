"""A tiny smoke run of the demo (seconds): it trains, evaluates every method, writes the figure and
the JSON, and repeats its figures exactly on the same machine."""

import json
import os

import pytest

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the 'demo' extra)")

from brnpa_triton.demo import DemoConfig, run_demo, scaled_kernel  # noqa: E402
from brnpa_triton.demo.report import METHODS  # noqa: E402


def tiny(out, **kw):
    settings = dict(
        out=os.fspath(out), seeds=(0, 1), epochs=1, copies=1, max_train=40, max_test=8, batch_size=20, width=4,
        eval_images=3, di_step=48, rise_masks=8, overlays=2, progress=False,
    )
    return DemoConfig(**(settings | kw))


def test_demo_smoke_and_reproducible(tmp_path):
    res = run_demo(tiny(tmp_path / "a"), verbose=False)
    files = set(os.listdir(tmp_path / "a"))
    assert {"results.json", "summary.md", "overlays.png", "model.pt"} <= files
    with open(tmp_path / "a" / "results.json") as f:
        saved = json.load(f)
    assert saved["seeds"] == [0, 1] and len(saved["per_seed"]) == 2
    summary = saved["summary"]
    for key in ("pointing_quantus", "pointing_strict", "deletion_auc", "insertion_auc"):
        assert set(summary[key]) == set(METHODS)
        for method in METHODS:
            d = summary[key][method]
            values = [r[key][method] for r in saved["per_seed"]]
            assert d["mean"] == pytest.approx(sum(values) / 2) and d["std"] >= 0
            assert all(0.0 <= v <= 1.0 for v in values)
    first = saved["per_seed"][0]
    assert first["feature_map"] == [12, 12] and first["test_images"] == 8 and first["eval_images"] == 3
    assert first["insertion_start"]["kernel"] == scaled_kernel(48) == 13
    assert "box blur 13x13" in first["insertion_start"]["kind"]
    assert set(first["brnpa_protocols"]) == {"library_scaled_blur", "library_blur_121_clamped", "authors"}
    with open(tmp_path / "a" / "overlays.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    again = run_demo(tiny(tmp_path / "b", overlays=0, seeds=(1,)), verbose=False)  # seed 1 again, no figure
    assert not os.path.exists(tmp_path / "b" / "overlays.png")
    for a, b in zip(res["per_seed"][1:], again["per_seed"], strict=True):
        for key in (
            "test_accuracy",
            "pointing_quantus",
            "pointing_strict",
            "sparsity_brnpa",
            "deletion_auc",
            "insertion_auc",
        ):
            assert a[key] == b[key]
        assert a["train_log"]["epoch_loss"] == b["train_log"]["epoch_loss"]


def test_pointing_counts_ties_both_ways():
    import torch

    from brnpa_triton.demo.report import pointing

    boxes = torch.tensor([[0, 0, 24, 24]] * 3)  # the top-left quarter of a 48x48 image
    maps = torch.zeros(3, 4, 4)
    maps[1, 0, 0] = 1.0  # a single peak inside
    maps[2, 0, 0] = maps[2, 3, 3] = 1.0  # tied peaks, one inside, one outside
    hits = pointing(maps, boxes, (48, 48))
    assert hits["quantus"].tolist() == [True, True, True]  # a constant map "hits" under Quantus's rule
    assert hits["strict"].tolist() == [False, True, False]
    # NaN is no maximum: such a map has no peak, and would pass the strict test vacuously
    maps[1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"maps contain NaN \(images \[1\]\)"):
        pointing(maps, boxes, (48, 48))


def test_module_entry_point_arguments(capsys):
    from brnpa_triton.__main__ import main

    assert main(["--self-check", "--extra"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and "--seeds" in out

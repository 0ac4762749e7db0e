"""bench.evaluation's per-image loop (the paper's way of running deletion / insertion) gives the
same curves as the batched protocol="authors", and the benchmark writes where it is told."""

import json

import torch

from bench.evaluation import main, per_image_loop, small_cnn
from brnpa_triton.metrics import deletion_insertion


def test_loop_equals_authors_protocol_on_uneven_sizes():
    torch.manual_seed(0)
    model = small_cnn().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 40, 35, generator=g)  # 35 // 3 = 11 px patches; the last 2 columns never change
    sal = torch.rand(2, 1, 3, 3, generator=g)
    sal[1, 0, 1:3, 1:3] = sal[1, 0, 0, 0]  # ties: order decided by repeated topk in both
    r = deletion_insertion(model, x, sal, protocol="authors", blur_kernel=9)
    for i in (1,):
        torch.testing.assert_close(r.deletion[i], torch.tensor(per_image_loop(model, x[i], sal[i, 0], "deletion")))
        torch.testing.assert_close(r.insertion[i], torch.tensor(per_image_loop(model, x[i], sal[i, 0], "insertion", 9)))


def test_cli_writes_to_out(tmp_path):
    res = main(
        ["--images", "1", "--loop-images", "1", "--repeats", "1", "--size", "32", "--grid", "2", "--out", str(tmp_path)]
    )
    saved = json.loads((tmp_path / "evaluation-cpu.json").read_text())
    assert saved["shape"]["steps_per_metric"] == 4 and saved["speedup"]["median"] == res["speedup"]["median"] > 0
    assert saved["max_abs_curve_difference_loop_vs_authors_protocol"] < 1e-5
    assert "Speed-up" in (tmp_path / "evaluation-cpu.md").read_text()

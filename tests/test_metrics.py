import math

import pytest
import torch
import torch.nn.functional as F

import brnpa_triton as bt
from brnpa_triton.metrics import box_blur, deletion_insertion, gaussian_blur, sparsity


class MeanModel:
    """Two classes with softmax exactly ((s + 2) / 4, (2 - s) / 4), s = the image mean."""

    def __init__(self):
        self.calls = []

    def __call__(self, x):
        self.calls.append(x.clone())
        s = x.double().mean(dim=(1, 2, 3))
        return torch.stack([torch.log(s + 2), torch.log(2 - s)], dim=1)


IMAGE = torch.tensor([[[[1.0, 0.5], [0.25, 0.0]]]], dtype=torch.float64)
SAL = torch.tensor([[[[0.1, 0.4], [0.3, 0.2]]]])  # order: cell 1, 2, 3, 0


def test_hand_computed_deletion_and_insertion():
    r = deletion_insertion(MeanModel(), IMAGE, SAL, insertion_start=torch.zeros_like(IMAGE))
    torch.testing.assert_close(r.fractions, torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    # deletion: image means 0.4375, 0.3125, 0.25, 0.25, 0 -> scores (s + 2) / 4
    torch.testing.assert_close(r.deletion[0], torch.tensor([0.609375, 0.578125, 0.5625, 0.5625, 0.5]))
    assert float(r.deletion_auc[0]) == pytest.approx(0.25 * (0.59375 + 0.5703125 + 0.5625 + 0.53125))
    # insertion from zeros: means 0, 0.125, 0.1875, 0.1875, 0.4375
    torch.testing.assert_close(r.insertion[0], torch.tensor([0.5, 0.53125, 0.546875, 0.546875, 0.609375]))
    assert float(r.insertion_auc[0]) == pytest.approx(0.25 * (0.515625 + 0.5390625 + 0.546875 + 0.578125))
    assert r.target.tolist() == [0]
    # two cells per step
    r2 = deletion_insertion(MeanModel(), IMAGE, SAL[:, 0], step=2, metrics="deletion")
    torch.testing.assert_close(r2.fractions, torch.tensor([0, 0.5, 1.0]))
    torch.testing.assert_close(r2.deletion[0], torch.tensor([0.609375, 0.5625, 0.5]))
    assert r2.insertion is None and r2.insertion_auc is None


def test_target_label_instead_of_prediction():
    r = deletion_insertion(MeanModel(), IMAGE, SAL, metrics="deletion", target=torch.tensor([1]))
    torch.testing.assert_close(r.deletion[0], 1 - torch.tensor([0.609375, 0.578125, 0.5625, 0.5625, 0.5]))


def test_cells_cover_image_patches_and_batches_are_bounded():
    images = torch.ones(2, 1, 4, 4)
    sal = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).expand(2, 1, 2, 2).clone()
    sal[1, 0] = torch.tensor([[0.0, 0.0], [5.0, 0.0]])
    model = MeanModel()
    r = deletion_insertion(model, images, sal, metrics="deletion", batch_size=3)
    # 1 prediction call, then ceil(2 images * 5 steps / 3) = 4 calls of at most 3 images
    assert [len(c) for c in model.calls] == [2, 3, 3, 3, 1]
    step1 = torch.cat(model.calls[1:])[[1, 6]]  # image 0 and image 1 after one step
    expected0, expected1 = torch.ones(1, 4, 4), torch.ones(1, 4, 4)
    expected0[:, :2, 2:] = 0  # top-right patch
    expected1[:, 2:, :2] = 0  # bottom-left patch
    torch.testing.assert_close(step1[0], expected0)
    torch.testing.assert_close(step1[1], expected1)
    # same numbers whatever the batch size
    again = deletion_insertion(MeanModel(), images, sal, metrics="deletion", batch_size=64)
    torch.testing.assert_close(again.deletion, r.deletion)


def test_uneven_cells_partition_the_image():
    images = torch.ones(1, 1, 5, 7)
    sal = torch.rand(1, 1, 2, 3, generator=torch.Generator().manual_seed(0))
    r = deletion_insertion(MeanModel(), images, sal, metrics="deletion")
    assert r.deletion.shape == (1, 7)
    assert float(r.deletion[0, -1]) == pytest.approx(0.5)  # everything deleted in the end
    means = 4 * r.deletion[0].double() - 2
    assert (means.diff() < 0).all()  # each cell removes some pixels


def test_pixel_unit_equals_full_resolution_cells():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 1, 4, 4, generator=g)
    sal = torch.rand(2, 1, 4, 4, generator=g)
    pix = deletion_insertion(MeanModel(), images, sal, unit="pixel")  # step = width = 4 pixels
    cell = deletion_insertion(MeanModel(), images, sal, unit="cell", step=4)
    assert pix.fractions.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    torch.testing.assert_close(pix.deletion, cell.deletion)
    torch.testing.assert_close(pix.insertion, cell.insertion)


def test_box_blur_hand_case_and_clamping():
    x = torch.tensor([[[[3.0, 0.0, 0.0]]]])
    torch.testing.assert_close(box_blur(x, 3), torch.tensor([[[[1.5, 1.0, 0.0]]]]))
    y = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # kernel 121 clamps to 5 on both axes (6 -> 5); in-image mean == avg_pool without padding counts
    ref = F.avg_pool2d(y, 5, stride=1, padding=2, count_include_pad=False)
    torch.testing.assert_close(box_blur(y), ref)
    with pytest.raises(ValueError):
        box_blur(y, 4)


def test_gaussian_blur():
    c = torch.full((1, 1, 9, 9), 0.7)
    torch.testing.assert_close(gaussian_blur(c), c)  # normalised edges: constants stay constant
    y = torch.rand(1, 1, 20, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.arange(-5, 6, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / 5.0) ** 2)
    w2 = torch.outer(w, w) / w.sum() ** 2
    ref = F.conv2d(y, w2[None, None])
    torch.testing.assert_close(gaussian_blur(y)[..., 5:-5, 5:-5], ref)


def test_insertion_default_starts_from_box_blur():
    model = MeanModel()
    images = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    deletion_insertion(model, images, torch.rand(1, 1, 3, 3), metrics="insertion")
    torch.testing.assert_close(model.calls[1][0], box_blur(images)[0])


def test_sparsity_hand_computed():
    maps = torch.tensor([[[[0.5, 0.5], [0.0, 0.0]], [[0.25, 0.25], [0.25, 0.25]]]])
    norms = torch.tensor([[[2.0, 1.0], [1.0, 0.0]]])
    e = 1e-5
    part0 = [0.5 / (0.5 + e), 0.25 / (0.5 + e), 0.0, 0.0]
    part1 = [0.25 / (0.25 + e), 0.125 / (0.25 + e), 0.125 / (0.25 + e), 0.0]
    expected = sum((a + b) / 2 for a, b in zip(part0, part1, strict=True)) / 4
    torch.testing.assert_close(sparsity(maps, norms), torch.tensor([expected]))
    # one-hot is as sparse as it gets, uniform as dense
    N = 16
    onehot = torch.zeros(1, 1, 4, 4)
    onehot[0, 0, 1, 2] = 1
    assert float(sparsity(onehot, onehot[:, 0])) == pytest.approx(1 / (1 + e) / N)
    uniform = torch.full((1, 3, 4, 4), 1 / N)
    assert float(sparsity(uniform, torch.ones(1, 4, 4))) == pytest.approx((1 / N) / (1 / N + e))
    assert float(sparsity(uniform, torch.zeros(1, 4, 4))) == 0.0  # no NaN for all-zero norms


def test_sparsity_of_brnpa_outputs_maps_and_tokens():
    x = torch.rand(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    out = bt.brnpa(x, 3)
    s = sparsity(out.maps, out.norms)
    assert s.shape == (3,) and ((s > 0) & (s <= 1)).all()
    tok = bt.brnpa_tokens(x.flatten(2).transpose(1, 2), 3)
    torch.testing.assert_close(sparsity(tok.maps, tok.norms), s)
    with pytest.raises(ValueError):
        sparsity(out.maps, out.norms[:, :2])


def test_with_a_brnpa_model_and_random_saliency():
    from torch import nn

    from brnpa_triton.explain import saliency
    from brnpa_triton.nn import BRNPAClassifier

    torch.manual_seed(0)
    model = BRNPAClassifier(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU()), 4, 3).eval()
    images = torch.rand(3, 1, 12, 12)
    _, out = model(images, return_output=True)
    for sal in (saliency(out).detach(), torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))):
        r = deletion_insertion(model, images, sal, step=5, batch_size=7)
        assert r.deletion.shape == (3, 1 + math.ceil(36 / 5))
        probs = torch.softmax(model(images), 1).max(1).values
        torch.testing.assert_close(r.deletion[:, 0], probs.detach())
        assert ((r.deletion_auc >= 0) & (r.deletion_auc <= 1)).all()
        torch.testing.assert_close(r.insertion[:, -1], probs.detach())


# ---- the two protocols, the authors' blur, argument checks -------------------------------------

from brnpa_triton.metrics import box_blur_zero_padded  # noqa: E402


def test_authors_protocol_hand_computed():
    r = deletion_insertion(MeanModel(), IMAGE, SAL, protocol="authors", insertion_start=torch.zeros_like(IMAGE))
    # scores only after each step; the 4 points are stretched over [0, 1]
    torch.testing.assert_close(r.fractions, torch.tensor([0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(r.deletion_x, torch.tensor([0, 1 / 3, 2 / 3, 1.0]))
    torch.testing.assert_close(r.deletion[0], torch.tensor([0.578125, 0.5625, 0.5625, 0.5]))
    torch.testing.assert_close(r.insertion[0], torch.tensor([0.53125, 0.546875, 0.546875, 0.609375]))
    assert float(r.deletion_auc[0]) == pytest.approx((0.578125 / 2 + 0.5625 + 0.5625 + 0.5 / 2) / 3)
    assert float(r.insertion_auc[0]) == pytest.approx((0.53125 / 2 + 0.546875 + 0.546875 + 0.609375 / 2) / 3)
    # step 3 does not divide 4 cells: left = 1, -2 -> deletion x = 0, 1; insertion x = 1 - left / 1 = 0, 3
    r3 = deletion_insertion(
        MeanModel(), IMAGE, SAL, protocol="authors", step=3, insertion_start=torch.zeros_like(IMAGE)
    )
    torch.testing.assert_close(r3.deletion_x, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(r3.insertion_x, torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(r3.deletion[0], torch.tensor([0.5625, 0.5]))


class EvidenceModel:
    """Two classes; logit 0 is 4 x the sum of the pixels in rows/cols ``region``, logit 1 is 0."""

    def __init__(self, region):
        self.region = region

    def __call__(self, x):
        (r0, r1), (c0, c1) = self.region
        e = 4 * x[:, :, r0:r1, c0:c1].double().sum(dim=(1, 2, 3))
        return torch.stack([e, torch.zeros_like(e)], dim=1)


def test_both_protocols_on_a_model_whose_answer_is_known():
    # a 6x6 image on a 2x2 map: cells are 3x3 patches; all the evidence lies in cell 3 (bottom right)
    images = torch.zeros(1, 1, 6, 6)
    images[..., 3:, 3:] = 1.0
    model = EvidenceModel(((3, 6), (3, 6)))
    p0 = 1 / (1 + math.exp(-36.0))  # softmax of class 0 on the intact image
    right = torch.tensor([[[0.0, 0.1], [0.2, 0.9]]])  # the evidence cell first
    wrong = torch.tensor([[[0.9, 0.2], [0.1, 0.0]]])  # the evidence cell last
    zeros = torch.zeros_like(images)
    lib = deletion_insertion(model, images, right, insertion_start=zeros)
    # library: [p0, 0.5, 0.5, 0.5, 0.5] over 0, .25, .., 1; insertion mirrored
    assert float(lib.deletion_auc[0]) == pytest.approx(0.25 * (p0 + 0.5) / 2 + 0.75 * 0.5, abs=1e-6)
    assert float(lib.insertion_auc[0]) == pytest.approx(0.25 * (0.5 + p0) / 2 + 0.75 * p0, abs=1e-6)
    aut = deletion_insertion(model, images, right, protocol="authors", insertion_start=zeros)
    # authors: [0.5, 0.5, 0.5, 0.5] and [p0] * 4 over linspace(0, 1, 4)
    assert float(aut.deletion_auc[0]) == pytest.approx(0.5, abs=1e-6)
    assert float(aut.insertion_auc[0]) == pytest.approx(p0, abs=1e-6)
    bad = deletion_insertion(model, images, wrong, protocol="authors", insertion_start=zeros)
    # evidence last: [p0, p0, p0, 0.5] and [0.5, 0.5, 0.5, p0]
    assert float(bad.deletion_auc[0]) == pytest.approx((p0 / 2 + p0 + p0 + 0.5 / 2) / 3, abs=1e-6)
    assert float(bad.insertion_auc[0]) == pytest.approx((0.5 / 2 + 0.5 + 0.5 + p0 / 2) / 3, abs=1e-6)


def test_authors_patches_anchor_top_left_and_leave_the_rest():
    # 7x7 image, 2x2 map: patches of side 7 // 2 = 3 from the top-left; row 6 and column 6 never change
    images = torch.ones(1, 1, 7, 7)
    model = EvidenceModel(((6, 7), (0, 7)))  # evidence only in the last row
    sal = torch.rand(1, 2, 2, generator=torch.Generator().manual_seed(0))
    aut = deletion_insertion(model, images, sal, protocol="authors", metrics="deletion")
    p = 1 / (1 + math.exp(-28.0))
    torch.testing.assert_close(aut.deletion[0], torch.full((4,), p))  # the evidence is never deleted
    lib = deletion_insertion(model, images, sal, metrics="deletion")
    assert float(lib.deletion[0, -1]) == pytest.approx(0.5)  # the library's cells cover every pixel


def test_authors_tie_order_is_repeated_topk():
    sal = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9, 0.3]])
    from brnpa_triton.metrics import _authors_order

    rank = _authors_order(sal.clone(), 1)
    work, expected = sal.clone(), []
    for _ in range(6):
        i = int(work[0].topk(1).indices)
        expected.append(i)
        work[0, i] = -1
    assert rank[0].argsort().tolist() == expected


def test_zero_padded_box_blur_is_the_authors_convolution():
    y = torch.rand(2, 3, 10, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = 7
    weight = torch.full((3, 1, k, k), 1.0 / k**2, dtype=torch.float64)
    torch.testing.assert_close(box_blur_zero_padded(y, k), F.conv2d(y, weight, padding=k // 2, groups=3))
    big = box_blur_zero_padded(y)  # 121 on a 10x9 image: every output is the image sum / 121^2
    torch.testing.assert_close(big, y.sum(dim=(2, 3), keepdim=True).expand_as(y) / 121**2)


def test_logit_tracking():
    r = deletion_insertion(MeanModel(), IMAGE, SAL, metrics="deletion", softmax=False)
    means = torch.tensor([0.4375, 0.3125, 0.25, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(r.deletion[0], torch.log(means + 2).float())


class TupleModel:
    def __call__(self, x):
        return MeanModel()(x), None


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(step=1.5), TypeError, "step"),
        (dict(step=0), ValueError, "step"),
        (dict(step=True), TypeError, "step"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(target=torch.tensor([0, 1])), ValueError, "target"),
        (dict(target=torch.tensor([0.0])), TypeError, "target"),
        (dict(target=torch.tensor([2])), ValueError, "target"),
        (dict(protocol="paper"), ValueError, "protocol"),
        (dict(protocol="authors", unit="pixel"), ValueError, "unit"),
        (dict(softmax="yes"), TypeError, "softmax"),
    ],
)
def test_argument_errors_name_the_argument(kwargs, error, words):
    with pytest.raises(error, match=words):
        deletion_insertion(MeanModel(), IMAGE, SAL, **kwargs)


def test_input_errors_name_the_argument():
    with pytest.raises(ValueError, match="images"):
        deletion_insertion(MeanModel(), IMAGE[:0], SAL[:0])
    with pytest.raises(TypeError, match="model"):
        deletion_insertion(TupleModel(), IMAGE, SAL)
    with pytest.raises(ValueError, match="model"):
        deletion_insertion(lambda x: x, IMAGE, SAL)
    nan = SAL.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="saliency"):
        deletion_insertion(MeanModel(), IMAGE, nan)
    import numpy as np

    r = deletion_insertion(MeanModel(), IMAGE, SAL, step=np.int64(2), target=torch.tensor(0), metrics="deletion")
    assert r.deletion.shape == (1, 3)
    flat = deletion_insertion(MeanModel(), IMAGE, torch.zeros_like(SAL), protocol="authors")  # constant map
    assert torch.isfinite(flat.deletion_auc).all() and torch.isfinite(flat.insertion_auc).all()


# ---- which pixels a cell owns (library protocol) -----------------------------------------------


def _deleted_after_first_step(sal: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool: the pixels the library's deletion has zeroed after its first step (one cell)."""
    model = MeanModel()
    deletion_insertion(model, torch.ones(1, 1, *size), sal, metrics="deletion")
    return model.calls[1][1, 0] == 0  # call 0 predicts the target; call 1 holds every step, in order


def test_pixels_go_to_the_cell_nearest_to_their_centre():
    # 7 rows on 3 cells: pixel centres 0.5 .. 6.5 lie in cells [0, 7/3), [7/3, 14/3), [14/3, 7)
    for cell, rows in ((0, [0, 1]), (1, [2, 3, 4]), (2, [5, 6])):
        sal = torch.zeros(1, 1, 3, 1)
        sal[0, 0, cell] = 1.0
        deleted = _deleted_after_first_step(sal, (7, 2))
        assert deleted.any(dim=1).nonzero().flatten().tolist() == rows
        assert deleted[rows].all()  # whole rows: the one column of cells covers both image columns
    # the same along the width
    sal = torch.tensor([[[0.0, 1.0, 0.0]]])
    assert _deleted_after_first_step(sal, (1, 7))[0].nonzero().flatten().tolist() == [2, 3, 4]


def test_nearest_cells_against_the_distance_to_every_cell_centre():
    from brnpa_triton.metrics import nearest_cells

    for pixels in range(1, 13):
        for cells in range(1, 13):
            centre = torch.arange(pixels, dtype=torch.float64) + 0.5
            cell_centre = (torch.arange(cells, dtype=torch.float64) + 0.5) * pixels / cells
            dist = (centre[:, None] - cell_centre[None, :]).abs()
            nearest = dist <= dist.min(dim=1, keepdim=True).values + 1e-9
            # ties (a centre on a border, only when the map is finer than the image): the later cell
            expected = (nearest * torch.arange(1, cells + 1)).argmax(dim=1)
            assert nearest_cells(pixels, cells).tolist() == expected.tolist(), (pixels, cells)
    assert nearest_cells(2, 4).tolist() == [1, 3]  # both centres lie on borders

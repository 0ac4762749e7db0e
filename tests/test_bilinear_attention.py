"""The authors' B-CNN attention variant of BilinearAttentionPooling, against its definition."""

import pytest
import torch
import torch.nn.functional as F

from brnpa_triton.nn import BilinearAttentionPooling


def test_authors_variant_is_residual_block_then_biasless_1x1_to_k_plus_1_maps():
    torch.manual_seed(0)
    bap = BilinearAttentionPooling(6, num_maps=3, variant="authors").double().eval()
    block, conv, _ = bap.attention
    assert conv.bias is None and conv.out_channels == 4 and conv.kernel_size == (1, 1)
    assert block.conv1.kernel_size == (3, 3) and block.conv2.kernel_size == (3, 3)
    for bn in (block.bn1, block.bn2):  # non-trivial batch-norm statistics, used in eval mode
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 6, 5, 4, dtype=torch.float64)
    y = F.relu(F.batch_norm(F.conv2d(x, block.conv1.weight, padding=1), block.bn1.running_mean, block.bn1.running_var,
                            block.bn1.weight, block.bn1.bias, False, 0.0, block.bn1.eps))
    y = F.batch_norm(F.conv2d(y, block.conv2.weight, padding=1), block.bn2.running_mean, block.bn2.running_var,
                     block.bn2.weight, block.bn2.bias, False, 0.0, block.bn2.eps)
    maps = F.relu(F.conv2d(F.relu(y + x), conv.weight))[:, :3]  # the extra (4th) map is discarded
    out = bap(x)
    torch.testing.assert_close(out.maps, maps)
    vectors = torch.einsum("bmhw,bchw->bmc", maps, x) / 20
    torch.testing.assert_close(out.vectors, vectors)
    assert "variant='authors'" in repr(bap)


def test_variant_errors():
    with pytest.raises(ValueError, match="variant"):
        BilinearAttentionPooling(6, 3, variant="bcnn")
    with pytest.raises(ValueError, match="tokens"):
        BilinearAttentionPooling(6, 3, variant="authors")(torch.rand(2, 7, 6))
    with pytest.raises(ValueError, match="num_maps"):
        BilinearAttentionPooling(6, 0)
    default = BilinearAttentionPooling(6, 3)
    assert default.attention[0].kernel_size == (1, 1) and default.attention[0].bias is not None

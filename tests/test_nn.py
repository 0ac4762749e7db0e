import numpy as np
import pytest
import torch
from torch import nn

import brnpa_triton as bt
from brnpa_triton.nn import BilinearAttentionPooling, BRNPAClassifier, BRNPAHead, BRNPAPool


def feats(B=2, C=6, H=5, W=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, W, generator=g, dtype=torch.float64)


def test_pool_matches_functional_maps_and_tokens():
    x = feats()
    out = BRNPAPool(3)(x)
    ref = bt.brnpa(x, 3)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b)
    tokens = x.flatten(2).transpose(1, 2)
    out_t = BRNPAPool(2, refine=False)(tokens)
    ref_t = bt.brnpa_tokens(tokens, 2, refine=False)
    assert out_t.maps.shape == (2, 2, 20)
    torch.testing.assert_close(out_t.vectors, ref_t.vectors)


def test_pool_random_seeds_need_explicit_randomness():
    x = feats()
    with pytest.raises(ValueError, match="explicit randomness"):
        BRNPAPool(3, seeds="random")(x)
    with pytest.raises(ValueError):
        BRNPAPool(3, generator=torch.Generator())
    a = BRNPAPool(3, seeds="random", generator=torch.Generator().manual_seed(1))(x)
    b = BRNPAPool(3, seeds="random")(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.indices, b.indices)
    noise = torch.rand(2, 3, 5, 4, dtype=torch.float64)
    c = BRNPAPool(3, seeds="random")(x, noise=noise)
    torch.testing.assert_close(c.indices, noise.flatten(2).argmax(2))
    state = torch.get_rng_state()
    BRNPAPool(3, seeds="random", generator=torch.Generator().manual_seed(2))(x)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def test_head_logits_output_and_gradients():
    torch.manual_seed(0)
    head = BRNPAHead(6, 7, num_parts=3, dropout=0.2).double()
    x = feats().requires_grad_(True)
    logits, out = head(x, return_output=True)
    assert logits.shape == (2, 7) and out.vectors.shape == (2, 3, 6) and out.maps.shape == (2, 3, 5, 4)
    head.eval()
    torch.testing.assert_close(head(x), head.fc(out.vectors.flatten(1)))
    head(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert head.fc.weight.grad.shape == (7, 18)
    with pytest.raises(ValueError, match="channels"):
        head(feats(C=5))


def test_classifier_with_cnn_and_token_backbones():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    model = BRNPAClassifier(cnn, 8, 4, num_parts=2)
    img = torch.randn(3, 3, 8, 8)
    logits, out = model(img, return_output=True)
    assert logits.shape == (3, 4) and out.maps.shape == (3, 2, 4, 4)
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    class Tokens(nn.Module):
        def forward(self, x):  # (B, C, H, W) -> (B, N, C)
            return torch.relu(x).flatten(2).transpose(1, 2)

    model_t = BRNPAClassifier(Tokens(), 3, 4, num_parts=2)
    logits_t, out_t = model_t(img, return_output=True)
    assert logits_t.shape == (3, 4) and out_t.maps.shape == (3, 2, 64)


def test_bilinear_attention_pooling():
    torch.manual_seed(0)
    bap = BilinearAttentionPooling(6, num_maps=4).double()
    x = feats().requires_grad_(True)
    v, a = bap(x)
    assert v.shape == (2, 4, 6) and a.shape == (2, 4, 5, 4) and (a >= 0).all()
    conv = bap.attention[0]
    manual = torch.relu(torch.einsum("mc,bchw->bmhw", conv.weight[:, :, 0, 0], x) + conv.bias[:, None, None])
    torch.testing.assert_close(a, manual)
    torch.testing.assert_close(v, torch.einsum("bmhw,bchw->bmc", manual, x) / 20)
    v.sum().backward()
    assert torch.isfinite(x.grad).all()
    # tokens give the same as the equivalent maps
    vt, at = bap(x.flatten(2).transpose(1, 2))
    torch.testing.assert_close(vt, v)
    torch.testing.assert_close(at, a.flatten(2))


def test_bilinear_attention_wsdan_normalisation():
    torch.manual_seed(0)
    bap = BilinearAttentionPooling(6, num_maps=3, wsdan_normalize=True).double()
    plain = BilinearAttentionPooling(6, num_maps=3).double()
    plain.load_state_dict(bap.state_dict())
    x = feats()
    v = bap(x).vectors
    raw = plain(x).vectors.flatten(1)
    expected = torch.sign(raw) * torch.sqrt(raw.abs() + 1e-12)
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(v.flatten(1), expected)
    torch.testing.assert_close(v.flatten(1).norm(dim=1), torch.ones(2, dtype=torch.float64))
    # zero features: finite values and gradients
    z = torch.zeros(1, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    bap(z).vectors.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_bilinear_attention_pooling_takes_integers_and_flags_as_the_other_modules_do():
    bap = BilinearAttentionPooling(np.int64(6), torch.tensor(3), wsdan_normalize=np.bool_(True))
    assert (bap.in_channels, bap.num_maps, bap.wsdan_normalize) == (6, 3, True)
    assert isinstance(bap.in_channels, int) and isinstance(bap.num_maps, int) and bap.wsdan_normalize is True
    assert bap(feats().float()).vectors.shape == (2, 3, 6)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: BilinearAttentionPooling(6, 3, wsdan_normalize="yes"), TypeError,
         r"wsdan_normalize must be True or False; got str 'yes'"),
        (lambda: BilinearAttentionPooling(6, 3, wsdan_normalize=1), TypeError, r"wsdan_normalize must be True or"),
        (lambda: BilinearAttentionPooling(6.0, 3), TypeError, r"in_channels must be an int; got float 6.0"),
        (lambda: BilinearAttentionPooling(True, 3), TypeError, r"in_channels must be an int; got bool"),
        (lambda: BilinearAttentionPooling(6, 0), ValueError, r"num_maps must be an int >= 1; got 0"),
        (lambda: BilinearAttentionPooling(6, 3, variant=None), ValueError, r"variant must be one of '1x1', 'authors'"),
        (lambda: BilinearAttentionPooling(6, 3, attention=lambda x: x), TypeError,
         r"attention must be a torch.nn.Module or None; got function"),
    ],
)
def test_bilinear_attention_pooling_refuses_bad_options(build, error, message):
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize(
    "features, error, message",
    [
        (torch.rand(2, 5, 7), ValueError,
         r"BilinearAttentionPooling expects 6 channels; got \(B, N, C\) tokens of shape \(2, 5, 7\) \(7 channels\)"),
        (torch.rand(2, 7, 3, 3), ValueError,
         r"BilinearAttentionPooling expects 6 channels; got \(B, C, H, W\) features of shape \(2, 7, 3, 3\)"),
        (torch.rand(2, 6, 0, 3), ValueError, r"features must have no empty dimension; got .* \(H=0\)"),
        (torch.rand(2, 0, 6), ValueError, r"tokens must have no empty dimension"),
        (torch.rand(2, 6), ValueError, r"features must be \(B, C, H, W\) feature maps or \(B, N, C\) tokens"),
        (torch.rand(2, 6, 3, 3).to_sparse(), TypeError, r"features must be a dense \(strided\) tensor"),
        (np.zeros((2, 6, 3, 3), dtype=np.float32), TypeError, r"features must be a torch.Tensor; got ndarray"),
        (torch.ones(2, 6, 3, 3, dtype=torch.int64), TypeError, r"features must be float16, bfloat16, float32 or"),
    ],
)
def test_bilinear_attention_pooling_input_errors_say_what_is_wrong(features, error, message):
    with pytest.raises(error, match=message):
        BilinearAttentionPooling(6, 3)(features)


def test_bilinear_attention_pooling_needs_num_maps_maps_from_a_custom_attention():
    bap = BilinearAttentionPooling(6, 4, attention=nn.Conv2d(6, 2, 1))
    with pytest.raises(ValueError, match=r"attention must map .* to \(B, M', H, W\) maps with M' >= num_maps=4; "
                                         r"got shape \(2, 2, 5, 4\)"):
        bap(feats().float())


def test_head_return_output_is_a_flag():
    with pytest.raises(TypeError, match=r"return_output must be True or False; got str 'yes'"):
        BRNPAHead(6, 3, 2)(feats().float(), return_output="yes")

import pytest
import torch
import torch.nn.functional as F

from brnpa_triton.distill import DistillationLoss, distillation_loss


def logits(seed, B=5, K=4, dtype=torch.float64):
    return torch.randn(B, K, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("alpha,T", [(0.0, 1.0), (1.0, 1.0), (0.3, 4.0), (0.9, 0.5)])
def test_matches_torch_kl_and_cross_entropy(alpha, T):
    s, t = logits(0), logits(1)
    y = torch.tensor([0, 3, 1, 2, 2])
    p_t = F.softmax(t / T, dim=1)
    # KL(p_t || p_s) summed over classes, mean over the batch, from its definition
    kl_def = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(1).mean()
    kl_torch = F.kl_div(F.log_softmax(s / T, 1), p_t, reduction="batchmean")
    torch.testing.assert_close(kl_def, kl_torch)
    expected = alpha * T**2 * kl_def + (1 - alpha) * F.cross_entropy(s, y)
    torch.testing.assert_close(distillation_loss(s, t, y, alpha, T), expected)
    torch.testing.assert_close(DistillationLoss(alpha, T)(s, t, y), expected)


def test_gradient_reaches_student_only_and_vanishes_when_equal():
    s = logits(0).requires_grad_(True)
    t = logits(0).requires_grad_(True)
    y = torch.zeros(5, dtype=torch.long)
    distillation_loss(s, t, y, alpha=1.0, temperature=3.0).backward()
    assert t.grad is None
    torch.testing.assert_close(s.grad, torch.zeros_like(s))  # KL minimal at s == t
    assert float(distillation_loss(s, t, y, 1.0, 3.0).detach()) == pytest.approx(0.0, abs=1e-12)


def test_soft_targets_half_precision_and_errors():
    s, t = logits(0, dtype=torch.float16), logits(1, dtype=torch.float16)
    probs = F.softmax(logits(2), 1)
    out = distillation_loss(s, t, probs, 0.5, 2.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    with pytest.raises(ValueError):
        distillation_loss(logits(0), logits(1, K=3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        distillation_loss(logits(0), logits(1), torch.zeros(5, dtype=torch.long), alpha=1.5)
    with pytest.raises(ValueError):
        distillation_loss(logits(0), logits(1), torch.zeros(5, dtype=torch.long), temperature=0)

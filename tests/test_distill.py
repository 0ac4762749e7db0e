import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brnpa_triton.distill import DistillationLoss, distillation_loss, tempered_kl


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


def kl_float64(s, t, T):
    """KL(softmax(t/T) || softmax(s/T)) per row in float64; classes with a -inf teacher logit add 0."""
    s, t = s.double() / T, t.double() / T
    lt, ls = F.log_softmax(t, 1), F.log_softmax(s, 1)
    return torch.where(t > float("-inf"), lt.exp() * (lt - ls), torch.zeros_like(lt)).sum(1)


@pytest.mark.parametrize("T", [1.0, 20.0, 100.0])
@pytest.mark.parametrize("gap", [1e-2, 1.0])
def test_float32_matches_float64_at_high_temperature(T, gap):

    g = torch.Generator().manual_seed(0)
    s = torch.randn(32, 200, generator=g) * 5
    t = s + gap * torch.randn(32, 200, generator=g)  # a student close to its teacher: tiny KL
    ref = kl_float64(s, t, T)
    torch.testing.assert_close(tempered_kl(s, t, T).double(), ref, rtol=2e-4, atol=0)
    y = torch.zeros(32, dtype=torch.long)
    loss = distillation_loss(s, t, y, alpha=1.0, temperature=T)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), T**2 * ref.mean(), rtol=2e-4, atol=0)


def test_masked_teacher_logits():

    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 10, generator=g)
    for gap in (1e-2, 3.0):
        t = s + gap * torch.randn(8, 10, generator=g)
        t[:, [2, 5]] = float("-inf")
        t[0, :] = float("-inf")
        t[0, 4] = 0.0  # a one-class teacher
        for T in (1.0, 20.0, 100.0):
            kl = tempered_kl(s, t, T)
            assert torch.isfinite(kl).all()
            torch.testing.assert_close(kl.double(), kl_float64(s, t, T), rtol=2e-4, atol=1e-7)
        ss = s.clone().requires_grad_(True)
        loss = distillation_loss(ss, t, torch.zeros(8, dtype=torch.long), 0.5, 20.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(ss.grad).all()
    # the student gives 0 probability where the teacher does not: the KL is +inf, not NaN
    s2 = s.clone()
    s2[1, 3] = float("-inf")
    assert tempered_kl(s2, s, 2.0)[1] == float("inf")
    with pytest.raises(ValueError, match="teacher_logits"):
        tempered_kl(s, torch.full_like(s, float("-inf")), 1.0)


def test_empty_batch_is_refused_not_nan():
    # torch's mean-reduced losses give NaN here; a clear error instead (see the docstring).
    empty = torch.zeros(0, 4)
    with pytest.raises(ValueError, match=r"B >= 1 rows .* an empty batch has none\); got shape \(0, 4\)"):
        distillation_loss(empty, empty, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got shape \(0, 4\)"):
        DistillationLoss()(empty, empty, torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"got shape \(3, 0\)"):
        tempered_kl(torch.zeros(3, 0), torch.zeros(3, 0))


Y = torch.tensor([0, 3, 1, 2, 2])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: distillation_loss(logits(0), logits(1), Y, alpha="0.5"), TypeError, r"alpha must be a float; got str"),
        (lambda: distillation_loss(logits(0), logits(1), Y, alpha=True), TypeError, r"alpha must be a float; got bool"),
        (lambda: distillation_loss(logits(0), logits(1), Y, alpha=float("nan")), ValueError,
         r"alpha must be in \[0, 1\]; got nan"),
        (lambda: distillation_loss(logits(0), logits(1), Y, temperature=float("inf")), ValueError,
         r"temperature must be a finite float > 0; got inf"),
        (lambda: distillation_loss(logits(0), logits(1), Y, temperature=None), TypeError,
         r"temperature must be a float; got NoneType"),
        (lambda: DistillationLoss(alpha=2.0), ValueError, r"alpha must be in \[0, 1\]; got 2.0"),
        (lambda: DistillationLoss(temperature=-1), ValueError, r"temperature must be a finite float > 0; got -1.0"),
        (lambda: tempered_kl(logits(0), logits(1), float("nan")), ValueError, r"temperature must be a finite float"),
        (lambda: distillation_loss(logits(0).numpy(), logits(1), Y), TypeError,
         r"student_logits must be a floating-point torch.Tensor \(B, classes\); got ndarray"),
        (lambda: distillation_loss(logits(0), logits(1).long(), Y), TypeError,
         r"teacher_logits must be a floating-point torch.Tensor \(B, classes\); got torch.int64"),
        (lambda: distillation_loss(logits(0).to_sparse(), logits(1), Y), TypeError,
         r"student_logits must be a dense \(strided\) tensor"),
        (lambda: distillation_loss(logits(0), logits(1), Y[:4]), ValueError,
         r"target class indices must have shape \(B,\) = \(5,\); got \(4,\)"),
        (lambda: distillation_loss(logits(0), logits(1), Y + 2), ValueError,
         r"target class indices must lie in \[0, classes=4\); got values from 2 to 5"),
        (lambda: distillation_loss(logits(0), logits(1), torch.full((5,), -100)), ValueError,
         r"target class indices must lie in \[0, classes=4\); got values from -100 to -100"),
        (lambda: distillation_loss(logits(0), logits(1), torch.rand(5, 3)), ValueError,
         r"target probabilities must have shape \(B, classes\) = \(5, 4\); got \(5, 3\)"),
        (lambda: distillation_loss(logits(0), logits(1), Y > 1), TypeError,
         r"target must be integer class indices \(B,\) or floating probabilities \(B, classes\); got torch.bool"),
        (lambda: distillation_loss(logits(0), logits(1), Y.tolist()), TypeError,
         r"target must be a torch.Tensor; got list"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_numpy_numbers_and_small_integer_targets_are_accepted():
    s, t = logits(0), logits(1)
    expected = distillation_loss(s, t, Y, 0.25, 2.0)
    torch.testing.assert_close(distillation_loss(s, t, Y.int(), np.float32(0.25), np.int64(2)), expected)
    assert DistillationLoss(np.float64(0.25), 2).temperature == 2.0

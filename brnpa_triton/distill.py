"""Knowledge distillation, used by the paper to train the high-resolution (stride-1) student from
the low-resolution teacher."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from brnpa_triton import _validation as check

__all__ = ["distillation_loss", "DistillationLoss", "tempered_kl"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, target)``.

    Both terms are means over the batch (the KL summed over classes, i.e. ``batchmean``).
    ``teacher_logits`` are detached: no gradient reaches the teacher. ``target`` is what
    :func:`torch.nn.functional.cross_entropy` takes (class indices (B,) or probabilities (B, classes)).
    Computed in float32 at least (half-precision logits are upcast); returns a scalar. The KL term
    is evaluated by :func:`tempered_kl`, which stays accurate at large temperatures and accepts
    masked (``-inf``) teacher logits.

    An empty batch (B = 0) is rejected, where torch's own mean-reduced losses return NaN: a
    mean over no rows has no value, and a NaN (or a made-up 0) loss would let an empty loader
    or a mask that dropped every row train on silently.
    """
    _check_logits(student_logits, teacher_logits)
    alpha, temperature = _check_weights(alpha, temperature)
    _check_target(target, student_logits.shape, student_logits.device)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype)
    t = teacher_logits.detach().to(dtype)
    kl = tempered_kl(s, t, temperature).mean()
    ce = F.cross_entropy(s, target.to(dtype) if target.is_floating_point() else target.long())
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


def _check_logits(student_logits, teacher_logits) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a floating-point torch.Tensor (B, classes); got {type(t).__name__}")
        check.check_dense(name, t)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor (B, classes); got {t.dtype}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            "student_logits and teacher_logits must both be (B, classes); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.numel() == 0:
        raise ValueError(
            "student_logits and teacher_logits must have B >= 1 rows and at least one class (the loss is a "
            f"mean over the batch: an empty batch has none); got shape {tuple(student_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"teacher_logits must be on student_logits' device ({student_logits.device}); got {teacher_logits.device}"
        )


def _check_temperature(temperature) -> float:
    temperature = check.as_float("temperature", temperature)
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite float > 0; got {temperature}")
    return temperature


def _check_weights(alpha, temperature) -> tuple[float, float]:
    alpha = check.as_float("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    return alpha, _check_temperature(temperature)


def _check_target(target, shape, device) -> None:
    """Class indices (B,) in [0, classes), or probabilities (B, classes): what cross_entropy takes."""
    B, classes = shape
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor; got {type(target).__name__}")
    check.check_dense("target", target)
    if target.device != device:
        raise ValueError(f"target must be on the logits' device ({device}); got {target.device}")
    if target.is_floating_point():
        if tuple(target.shape) != (B, classes):
            raise ValueError(f"target probabilities must have shape (B, classes) = {(B, classes)}; got "
                             f"{tuple(target.shape)}")
    elif target.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        if tuple(target.shape) != (B,):
            raise ValueError(f"target class indices must have shape (B,) = ({B},); got {tuple(target.shape)}")
        # One host read (tempered_kl reads its checks too): an index out of range would be a
        # device-side assert on CUDA, and cross_entropy's ignore_index (-100) would drop rows.
        if not bool(((target >= 0) & (target < classes)).all()):
            raise ValueError(
                f"target class indices must lie in [0, classes={classes}); got values from {int(target.min())} "
                f"to {int(target.max())}"
            )
    else:
        raise TypeError(f"target must be integer class indices (B,) or floating probabilities (B, classes); "
                        f"got {target.dtype}")


# Rows whose tempered logit differences stay within this range use the cancellation-free form.
_SMALL_GAP = 1.0


def tempered_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row ``KL(softmax(t/T) || softmax(s/T))``, (B,), from log-softmaxes, accurate in float32.

    At large T both distributions approach uniform and the KL shrinks like 1/T^2, while
    ``sum p (log p - log q)`` subtracts two numbers of size log(classes): float32 loses the
    result in that cancellation. Rows whose tempered differences ``(t - s)/T`` are small are
    therefore computed from those differences directly (centred under the student, with
    ``expm1``/``log1p``), which keeps the relative error near float32's epsilon; other rows use
    the log-softmax form, which is accurate there.

    Masked classes: a teacher logit of ``-inf`` is a class of probability 0; it contributes
    nothing (not NaN). A student logit of ``-inf`` where the teacher's is finite gives ``inf``
    (the true KL). A row whose teacher logits are all ``-inf`` is not a distribution: rejected.
    """
    _check_logits(student_logits, teacher_logits)
    temperature = _check_temperature(temperature)
    s, t = student_logits / temperature, teacher_logits / temperature
    support = t > float("-inf")  # classes the teacher gives a positive probability
    if not bool(support.any(dim=1).all()):
        raise ValueError(
            "teacher_logits: every row needs at least one finite logit (a row of -inf has no distribution)"
        )
    if bool(torch.isnan(s).any() | torch.isnan(t).any() | (s == float("inf")).any() | (t == float("inf")).any()):
        raise ValueError("student_logits and teacher_logits must not contain NaN or +inf")
    ls, lt = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
    p = lt.exp()
    direct = torch.where(support, p * (lt - torch.where(support, ls, torch.zeros_like(ls))), torch.zeros_like(p)).sum(1)
    direct = torch.where((support & (ls == float("-inf"))).any(1), torch.full_like(direct, float("inf")), direct)

    # Cancellation-free form on rows with small gaps (inputs made safe elsewhere so that no
    # NaN or inf reaches the gradient of the branch not taken).
    q = ls.exp()
    d = torch.where(support, t - torch.where(support, s, torch.zeros_like(s)), torch.zeros_like(s))
    q_in = torch.where(support, q, torch.zeros_like(q))
    q_support = q_in.sum(1, keepdim=True)
    c = (q_in * d).sum(1, keepdim=True) / q_support.clamp_min(torch.finfo(q.dtype).tiny)
    x = torch.where(support, d - c, torch.zeros_like(d))
    small = (x.abs().amax(1) <= _SMALL_GAP) & (q_support[:, 0] > 0.5) & torch.isfinite(d).all(1)
    x = torch.where(small[:, None], x, torch.zeros_like(x))
    r = (q_in * (torch.expm1(x) - x)).sum(1)  # >= 0, second order in x
    q_off = torch.where(support, torch.zeros_like(q), q).sum(1)  # exactly 0 without masking
    log_z = torch.log1p(r - q_off)  # log sum_support q e^x
    centred = (q_in * torch.expm1(x - log_z[:, None]) * x).sum(1) - log_z
    return torch.where(small, centred, direct).clamp_min(0.0)


class DistillationLoss(nn.Module):
    """Module form of :func:`distillation_loss`: ``DistillationLoss(alpha, T)(s, t, target)``."""

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__()
        self.alpha, self.temperature = _check_weights(alpha, temperature)  # fail at construction

    def forward(self, student_logits, teacher_logits, target):
        return distillation_loss(student_logits, teacher_logits, target, self.alpha, self.temperature)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}"

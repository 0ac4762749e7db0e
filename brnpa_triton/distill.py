"""Knowledge distillation, used by the paper to train the high-resolution (stride-1) student from
the low-resolution teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["distillation_loss", "DistillationLoss"]


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
    Computed in float32 at least (half-precision logits are upcast); returns a scalar.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            "student_logits and teacher_logits must both be (B, classes); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype)
    t = teacher_logits.detach().to(dtype)
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=1),
        F.log_softmax(t / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    ce = F.cross_entropy(s, target.to(dtype) if target.is_floating_point() else target)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


class DistillationLoss(nn.Module):
    """Module form of :func:`distillation_loss`: ``DistillationLoss(alpha, T)(s, t, target)``."""

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.temperature = temperature

    def forward(self, student_logits, teacher_logits, target):
        return distillation_loss(student_logits, teacher_logits, target, self.alpha, self.temperature)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}"

"""High-resolution feature maps: ResNet stages with stride 1 instead of 2 (the paper's "high
resolution" models, e.g. a 56x56 instead of a 14x14 final map for 448x448 ResNet-50 input when
``layer3`` and ``layer4`` are changed). Weights are unchanged, so a pretrained low-resolution model
is a natural initialisation and teacher (see :func:`brnpa_triton.distill.distillation_loss`)."""

from __future__ import annotations

import copy as _copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from brnpa_triton import _validation as check

__all__ = ["make_high_resolution"]


def make_high_resolution(
    resnet: nn.Module,
    stages: str | int | Iterable[str | int] = ("layer3", "layer4"),
    *,
    copy: bool = False,
) -> nn.Module:
    """Set the stride of the given ResNet stages to 1 and return the model.

    ``stages`` are child names (``"layer4"``) or stage numbers (``4`` -> ``"layer4"``), as in
    torchvision's ResNet, or a single one of them. In each stage, the first block is the only
    strided one: the stride of its strided convolution (``conv1`` of a BasicBlock, ``conv2`` of a
    torchvision Bottleneck) and of its downsample convolution becomes 1; a strided
    ``nn.AvgPool2d`` / ``nn.MaxPool2d`` in that block (ResNet-D style
    ``downsample = AvgPool2d(2) + conv``) is replaced by ``nn.Identity``.
    No dilation is added (the paper only removes the stride), so the receptive field shrinks.
    The model is changed in place unless ``copy=True``, which changes and returns a deep copy.
    Raises if a stage is missing or has no stride to remove.
    """
    if not isinstance(resnet, nn.Module):
        raise TypeError(f"make_high_resolution: resnet must be a torch.nn.Module; got {type(resnet).__name__}")
    names = [_stage_name(stage) for stage in _as_sequence(stages)]
    model = _copy.deepcopy(resnet) if copy else resnet
    for name in names:
        module = getattr(model, name, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"make_high_resolution: the model has no stage {name!r}")
        blocks = list(module.children()) if isinstance(module, nn.Sequential) else [module]
        if not blocks or not _remove_strides(blocks[0]):
            raise ValueError(f"make_high_resolution: stage {name!r} has no strided convolution in its first block")
    return model


def _as_sequence(stages) -> list:
    """One stage ("layer4", 4) or an iterable of them; a string is one stage, not its letters."""
    if isinstance(stages, (str, int, np.integer)) or (isinstance(stages, torch.Tensor) and stages.dim() == 0):
        return [stages]
    try:
        stages = list(stages)
    except TypeError:
        raise TypeError(
            f"make_high_resolution: stages must be a stage name or number, or an iterable of them; "
            f"got {type(stages).__name__}"
        ) from None
    if not stages:
        raise ValueError("make_high_resolution: stages is empty; name at least one stage, e.g. ('layer3', 'layer4')")
    return stages


def _stage_name(stage) -> str:
    if isinstance(stage, str):
        return stage
    try:
        return f"layer{check.as_int('stages', stage)}"
    except TypeError:
        raise TypeError(
            f"make_high_resolution: each stage must be a child name like 'layer4' or a stage number like 4; "
            f"got {type(stage).__name__} {stage!r}"
        ) from None


def _strided(m: nn.Module) -> bool:
    s = m.stride if isinstance(m.stride, tuple) else (m.stride, m.stride)
    return any(v != 1 for v in s)


def _remove_strides(block: nn.Module) -> bool:
    changed = False
    for parent in block.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and _strided(child):
                child.stride = (1, 1)
                changed = True
            elif isinstance(child, (nn.AvgPool2d, nn.MaxPool2d)) and child.stride is not None and _strided(child):
                setattr(parent, child_name, nn.Identity())
                changed = True
    return changed

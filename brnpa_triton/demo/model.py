"""The demo's model: a small all-convolutional backbone with a stride-4 (12x12 for 48x48 input)
final feature map, followed by the paper's BR-NPA head."""

from __future__ import annotations

from torch import nn

from brnpa_triton.nn import BRNPAClassifier


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def make_backbone(width: int = 16) -> nn.Sequential:
    """(B, 1, S, S) -> (B, 4 * width, S / 4, S / 4); ends with a ReLU (non-negative features)."""
    w = width
    return nn.Sequential(
        conv_bn(1, w),
        conv_bn(w, 2 * w, stride=2),
        conv_bn(2 * w, 2 * w),
        conv_bn(2 * w, 4 * w, stride=2),
        conv_bn(4 * w, 4 * w),
        conv_bn(4 * w, 4 * w),
    )


def make_model(width: int = 16, num_parts: int = 3, num_classes: int = 10, dropout: float = 0.1) -> BRNPAClassifier:
    return BRNPAClassifier(make_backbone(width), 4 * width, num_classes, num_parts, dropout=dropout)


def last_layer(model: BRNPAClassifier) -> nn.Module:
    """The module whose output is the feature map fed to BR-NPA (Grad-CAM's layer)."""
    return model.backbone[-1]

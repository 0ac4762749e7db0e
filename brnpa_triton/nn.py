"""nn.Modules: the BR-NPA pooling layer, the paper's classification head and the parametric baseline.

``BRNPAPool`` has no parameters: it wraps :func:`brnpa_triton.brnpa` (feature maps (B, C, H, W))
and :func:`brnpa_triton.brnpa_tokens` (tokens (B, N, C)), chosen by the input's number of dims.
``BRNPAHead`` is the paper's model on top of any backbone: BR-NPA pooling, dropout, and a Linear
layer over the K*C vector ``out.vectors.flatten(1)`` (part-major). ``BRNPAClassifier`` joins a
backbone and that head. ``BilinearAttentionPooling`` is the parametric baseline (B-CNN / WS-DAN
bilinear attention pooling) the paper compares with.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from brnpa_triton import _validation as check
from brnpa_triton.api import BRNPAOutput, brnpa, brnpa_tokens

__all__ = [
    "BRNPAPool",
    "BRNPAHead",
    "BRNPAClassifier",
    "BilinearAttentionPooling",
    "BilinearAttentionOutput",
]


class BRNPAPool(nn.Module):
    """BR-NPA pooling as a module: (B, C, H, W) maps or (B, N, C) tokens -> :class:`BRNPAOutput`.

    ``seeds="random"`` (the paper's ablation) needs randomness passed in explicitly, never the
    global RNG: either a ``generator`` given here (kept by the module, not part of its state dict,
    and used on every call; it must live on the features' device) or ``generator=`` / ``noise=``
    given to ``forward``, which take precedence. Without either, ``forward`` raises.
    The same seed mode is used in training and evaluation.
    """

    def __init__(
        self,
        num_parts: int = 3,
        *,
        refine: bool = True,
        seeds: str = "norm",
        order: str = "selection",
        backend: str = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        # Fail at construction, with the functional API's messages, not at the first forward.
        check.check_choice("seeds", seeds, check.SEED_MODES)
        check.check_choice("order", order, check.ORDERS)
        check.check_choice("backend", backend, check.BACKENDS)
        if seeds == "norm" and generator is not None:
            raise ValueError("generator is only used with seeds='random'; got seeds='norm'")
        self.num_parts = num_parts
        self.refine = refine
        self.seeds = seeds
        self.order = order
        self.backend = backend
        self.generator = generator

    def forward(
        self,
        features: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> BRNPAOutput:
        if self.seeds == "random" and generator is None and noise is None:
            generator = self.generator
            if generator is None:
                raise ValueError(
                    "BRNPAPool(seeds='random') needs explicit randomness: BRNPAPool(..., generator=g) "
                    "or forward(x, generator=g) / forward(x, noise=u); the global RNG is never used"
                )
        fn = _pick(features)
        return fn(
            features, self.num_parts, refine=self.refine, seeds=self.seeds, generator=generator,
            noise=noise, order=self.order, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"num_parts={self.num_parts}, refine={self.refine}, seeds={self.seeds!r}, order={self.order!r}"


def _pick(features: torch.Tensor):
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor; got {type(features).__name__}")
    if features.dim() == 4:
        return brnpa
    if features.dim() == 3:
        return brnpa_tokens
    raise ValueError(
        f"features must be (B, C, H, W) feature maps or (B, N, C) tokens; got shape {tuple(features.shape)}"
    )


class BRNPAHead(nn.Module):
    """The paper's classifier: BR-NPA pooling -> dropout -> Linear(K*C, num_classes).

    ``forward(features)`` returns logits (B, num_classes); ``forward(features, return_output=True)``
    returns ``(logits, BRNPAOutput)`` so that maps and norms are at hand for explanations.
    ``generator`` / ``noise`` are passed to the pool (``seeds="random"`` only).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_parts: int = 3,
        *,
        dropout: float = 0.0,
        refine: bool = True,
        seeds: str = "norm",
        order: str = "selection",
        backend: str = "auto",
        generator: torch.Generator | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.pool = BRNPAPool(num_parts, refine=refine, seeds=seeds, order=order, backend=backend, generator=generator)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_parts * in_channels, num_classes, bias=bias)

    @property
    def num_parts(self) -> int:
        return self.pool.num_parts

    def forward(self, features, *, return_output: bool = False, generator=None, noise=None):
        channels = features.shape[1] if features.dim() == 4 else features.shape[-1]
        if channels != self.in_channels:
            raise ValueError(f"BRNPAHead expects {self.in_channels} channels; got features of shape {tuple(features.shape)}")
        out = self.pool(features, generator=generator, noise=noise)
        logits = self.fc(self.dropout(out.vectors.flatten(1)))
        return (logits, out) if return_output else logits


class BRNPAClassifier(nn.Module):
    """``backbone`` (images -> (B, C, H, W) maps or (B, N, C) tokens) followed by a :class:`BRNPAHead`.

    ``model(images)`` returns logits, so the model plugs into losses, DDP and the metrics of
    :mod:`brnpa_triton.metrics`; ``model(images, return_output=True)`` also returns the
    :class:`BRNPAOutput` (maps, norms, ...) for :func:`brnpa_triton.explain.saliency`.
    """

    def __init__(self, backbone: nn.Module, in_channels: int, num_classes: int, num_parts: int = 3, **head_kwargs) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = BRNPAHead(in_channels, num_classes, num_parts, **head_kwargs)

    def forward(self, images, *, return_output: bool = False, generator=None, noise=None):
        return self.head(self.backbone(images), return_output=return_output, generator=generator, noise=noise)


class BilinearAttentionOutput(NamedTuple):
    vectors: torch.Tensor  # (B, M, C) attention-weighted average-pooled features
    maps: torch.Tensor  # (B, M, H, W) (or (B, M, N) for tokens) non-negative attention maps


class BilinearAttentionPooling(nn.Module):
    """Parametric baseline (B-CNN / WS-DAN bilinear attention pooling), in two variants.

    M non-negative attention maps A weight the features; each weighted map is average-pooled over
    positions into a C-vector: ``vectors[b, m] = mean_n A[b, m, n] * F[b, :, n]`` (part-major, as
    BR-NPA's ``vectors``).

    - ``variant="1x1"`` (default): ``A = ReLU(conv1x1(F))``, a learned (M, C) projection plus bias.
      Token inputs (B, N, C) work too (the projection is applied per token).
    - ``variant="authors"``: the attention branch of the paper's B-CNN baseline: a 3x3 residual
      block on the features (conv3x3-BN-ReLU-conv3x3-BN, plus the input, ReLU), then a 1x1 conv
      without bias to M + 1 maps, ReLU; the first M maps are used (the extra one is discarded).
      Feature maps (B, C, H, W) only.

    With ``wsdan_normalize=True`` the (M*C)-vector gets WS-DAN's signed square root
    ``sign(x) * sqrt(|x| + 1e-12)`` and L2 normalisation (over the M*C entries of each image).
    ``attention`` replaces the branch by any module mapping (B, C, H, W) -> (B, M', H, W)
    non-negative maps (the first M are used).
    """

    class ResidualBlock(nn.Module):
        """conv3x3-BN-ReLU-conv3x3-BN plus the input, then ReLU (channels unchanged)."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(y)) + x)

    def __init__(
        self,
        in_channels: int,
        num_maps: int = 32,
        *,
        wsdan_normalize: bool = False,
        attention: nn.Module | None = None,
        variant: str = "1x1",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_maps", num_maps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if variant not in ("1x1", "authors"):
            raise ValueError(f"variant must be '1x1' or 'authors'; got {variant!r}")
        self.in_channels = in_channels
        self.num_maps = num_maps
        self.wsdan_normalize = wsdan_normalize
        self.variant = variant
        if attention is not None:
            self.attention = attention
        elif variant == "authors":
            self.attention = nn.Sequential(
                self.ResidualBlock(in_channels), nn.Conv2d(in_channels, num_maps + 1, kernel_size=1, bias=False), nn.ReLU()
            )
        else:
            self.attention = nn.Sequential(nn.Conv2d(in_channels, num_maps, kernel_size=1), nn.ReLU())

    def _maps(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 4:
            return self.attention(features)[:, : self.num_maps]
        if self.variant == "authors":
            raise ValueError("variant='authors' needs feature maps (B, C, H, W), not tokens (its 3x3 convs need a grid)")
        conv = self.attention[0] if isinstance(self.attention, nn.Sequential) else None
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1):
            raise ValueError("token inputs (B, N, C) need the default 1x1-conv attention")
        weight = conv.weight.flatten(1)  # (M, C)
        return F.relu(F.linear(features, weight, conv.bias)).transpose(1, 2)  # (B, M, N)

    def forward(self, features: torch.Tensor) -> BilinearAttentionOutput:
        if features.dim() not in (3, 4):
            raise ValueError(
                f"features must be (B, C, H, W) feature maps or (B, N, C) tokens; got shape {tuple(features.shape)}"
            )
        maps = self._maps(features)
        x = features.flatten(2) if features.dim() == 4 else features.transpose(1, 2)  # (B, C, N)
        a = maps.flatten(2)  # (B, M, N)
        vectors = torch.einsum("bmn,bcn->bmc", a, x) / x.shape[2]
        if self.wsdan_normalize:
            flat = vectors.flatten(1)
            flat = torch.sign(flat) * torch.sqrt(flat.abs() + 1e-12)
            vectors = F.normalize(flat, dim=1).view_as(vectors)
        return BilinearAttentionOutput(vectors, maps)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_maps={self.num_maps}, variant={self.variant!r}, "
                f"wsdan_normalize={self.wsdan_normalize}")

"""nn.Modules: the BR-NPA pooling layer, the paper's classification head and the parametric baseline.

``BRNPAPool`` has no parameters: it wraps :func:`brnpa_triton.brnpa` (feature maps (B, C, H, W))
and :func:`brnpa_triton.brnpa_tokens` (tokens (B, N, C)), chosen by the input's number of dims.
``BRNPAHead`` is the paper's model on top of any backbone: BR-NPA pooling, dropout, and a Linear
layer over the K*C vector of the parts' vectors laid end to end (part-major). ``BRNPAClassifier``
joins a backbone and that head. ``BilinearAttentionPooling`` is the parametric baseline (B-CNN / WS-DAN
bilinear attention pooling) the paper compares with.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from brnpa_triton import _validation as check
from brnpa_triton.api import BRNPAOutput, run

__all__ = [
    "BRNPAPool",
    "BRNPAHead",
    "BRNPAClassifier",
    "BilinearAttentionPooling",
    "BilinearAttentionOutput",
]


class BRNPAPool(nn.Module):
    """BR-NPA pooling as a module: (B, C, H, W) maps or (B, N, C) tokens -> :class:`BRNPAOutput`.

    The options are those of :func:`brnpa_triton.brnpa`, checked here at construction.
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
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        # Fail at construction, with the functional API's messages, not at the first forward.
        self.options = check.make_options(
            num_parts, refine=refine, seeds=seeds, order=order, backend=backend, check_finite=check_finite
        )
        if generator is not None:
            if seeds == "norm":
                raise ValueError("generator is only used with seeds='random'; got seeds='norm'")
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        self.generator = generator

    # Read-only views of the checked options (change them by building a new module).
    num_parts = property(lambda self: self.options.num_parts)
    refine = property(lambda self: self.options.refine)
    seeds = property(lambda self: self.options.seeds)
    order = property(lambda self: self.options.order)
    backend = property(lambda self: self.options.backend)

    def forward(
        self,
        features: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> BRNPAOutput:
        if self.options.seeds == "random" and generator is None and noise is None:
            generator = self.generator
            if generator is None:
                raise ValueError(
                    "BRNPAPool(seeds='random') needs explicit randomness: BRNPAPool(..., generator=g) "
                    "or forward(x, generator=g) / forward(x, noise=u); the global RNG is never used"
                )
        _check_input(features)
        return run(features, self.options, generator=generator, noise=noise)

    def extra_repr(self) -> str:
        return f"num_parts={self.num_parts}, refine={self.refine}, seeds={self.seeds!r}, order={self.order!r}"


def _check_input(features) -> None:
    """(B, C, H, W) feature maps or (B, N, C) tokens, each checked as brnpa / brnpa_tokens do."""
    if isinstance(features, torch.Tensor) and features.dim() == 4:
        check.check_features("features", features, "BCHW")
    elif isinstance(features, torch.Tensor) and features.dim() == 3:
        check.check_features("tokens", features, "BNC")
    elif isinstance(features, torch.Tensor):
        raise ValueError(
            f"features must be (B, C, H, W) feature maps or (B, N, C) tokens; got {features.dim()} dims, "
            f"shape {tuple(features.shape)}"
        )
    else:
        hint = " (convert it with torch.from_numpy(features))" if isinstance(features, np.ndarray) else ""
        raise TypeError(f"features must be a torch.Tensor; got {type(features).__name__}{hint}")


def _check_channels(module: str, expected: int, features: torch.Tensor) -> None:
    """The channel count of checked ``features`` against the module's (C of (B, C, H, W) or (B, N, C))."""
    channels = features.shape[1] if features.dim() == 4 else features.shape[-1]
    if channels != expected:
        layout = "(B, C, H, W) features" if features.dim() == 4 else "(B, N, C) tokens"
        raise ValueError(
            f"{module} expects {expected} channels; got {layout} of shape {tuple(features.shape)} "
            f"({channels} channels)"
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
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = check.as_int("in_channels", in_channels, minimum=1)
        self.num_classes = check.as_int("num_classes", num_classes, minimum=1)
        self.pool = BRNPAPool(
            num_parts, refine=refine, seeds=seeds, order=order, backend=backend, generator=generator,
            check_finite=check_finite,
        )
        self.dropout = nn.Dropout(check.as_probability("dropout", dropout))
        self.fc = nn.Linear(self.pool.num_parts * self.in_channels, self.num_classes, bias=check.as_bool("bias", bias))

    @property
    def num_parts(self) -> int:
        return self.pool.num_parts

    def forward(self, features, *, return_output: bool = False, generator=None, noise=None):
        return_output = check.as_bool("return_output", return_output)
        _check_input(features)
        _check_channels("BRNPAHead", self.in_channels, features)
        out = self.pool(features, generator=generator, noise=noise)
        logits = self.fc(self.dropout(rearrange(out.vectors, "b k c -> b (k c)")))
        return (logits, out) if return_output else logits


class BRNPAClassifier(nn.Module):
    """``backbone`` (images -> (B, C, H, W) maps or (B, N, C) tokens) followed by a :class:`BRNPAHead`.

    ``model(images)`` returns logits, so the model plugs into losses, DDP and the metrics of
    :mod:`brnpa_triton.metrics`; ``model(images, return_output=True)`` also returns the
    :class:`BRNPAOutput` (maps, norms, ...) for :func:`brnpa_triton.explain.saliency`.
    """

    def __init__(
        self, backbone: nn.Module, in_channels: int, num_classes: int, num_parts: int = 3, **head_kwargs
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module; got {type(backbone).__name__}")
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
        in_channels = check.as_int("in_channels", in_channels, minimum=1)
        num_maps = check.as_int("num_maps", num_maps, minimum=1)
        check.check_choice("variant", variant, ("1x1", "authors"))
        if attention is not None and not isinstance(attention, nn.Module):
            raise TypeError(f"attention must be a torch.nn.Module or None; got {type(attention).__name__}")
        self.in_channels = in_channels
        self.num_maps = num_maps
        self.wsdan_normalize = check.as_bool("wsdan_normalize", wsdan_normalize)
        self.variant = variant
        if attention is not None:
            self.attention = attention
        elif variant == "authors":
            self.attention = nn.Sequential(
                self.ResidualBlock(in_channels),
                nn.Conv2d(in_channels, num_maps + 1, kernel_size=1, bias=False),
                nn.ReLU(),
            )
        else:
            self.attention = nn.Sequential(nn.Conv2d(in_channels, num_maps, kernel_size=1), nn.ReLU())

    def _maps(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 4:
            maps = self.attention(features)
            if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or maps.shape[1] < self.num_maps:
                got = f"shape {tuple(maps.shape)}" if isinstance(maps, torch.Tensor) else type(maps).__name__
                raise ValueError(
                    f"attention must map (B, C, H, W) features to (B, M', H, W) maps with M' >= "
                    f"num_maps={self.num_maps}; got {got}"
                )
            return maps[:, : self.num_maps]
        if self.variant == "authors":
            raise ValueError(
                "variant='authors' needs feature maps (B, C, H, W), not tokens (its 3x3 convs need a grid)"
            )
        conv = self.attention[0] if isinstance(self.attention, nn.Sequential) else None
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1):
            raise ValueError("token inputs (B, N, C) need the default 1x1-conv attention")
        weight = rearrange(conv.weight, "m c 1 1 -> m c")
        return rearrange(F.relu(F.linear(features, weight, conv.bias)), "b n m -> b m n")

    def forward(self, features: torch.Tensor) -> BilinearAttentionOutput:
        _check_input(features)
        _check_channels("BilinearAttentionPooling", self.in_channels, features)
        maps = self._maps(features)
        if features.dim() == 4:
            x, a = rearrange(features, "b c h w -> b c (h w)"), rearrange(maps, "b m h w -> b m (h w)")
        else:
            x, a = rearrange(features, "b n c -> b c n"), maps
        vectors = torch.einsum("bmn,bcn->bmc", a, x) / x.shape[2]
        if self.wsdan_normalize:
            flat = rearrange(vectors, "b m c -> b (m c)")
            flat = torch.sign(flat) * torch.sqrt(flat.abs() + 1e-12)
            vectors = F.normalize(flat, dim=1).view_as(vectors)
        return BilinearAttentionOutput(vectors, maps)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_maps={self.num_maps}, variant={self.variant!r}, "
                f"wsdan_normalize={self.wsdan_normalize}")

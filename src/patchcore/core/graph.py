"""The whole scoring path of a fitted detector as one torch module (what is exported).

``ScoringGraph(det, size)(pixels (B, 3, H, W) in [0, 1]) -> (scores (B,), maps (B, H, W))``,
traceable by torch.onnx's dynamo exporter (:mod:`patchcore.core.export`): the backbone's
normalisation and stages (EfficientNet-Lite's TF-style "same" padding rewritten with shape
arithmetic that exports for any input size), the patch embedding, nearest-bank distances as
block matrix products, the image score and the anomaly map.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from patchcore.core import scoring
from patchcore.core.embedding import embed
from patchcore.core.search import NearestNeighborIndex

if TYPE_CHECKING:
    from patchcore.core.detector import PatchCore

__all__ = ["ExportError", "ScoringGraph", "grid_size"]


class ExportError(RuntimeError):
    """An export that cannot be made or does not reproduce the torch path."""


class _SameConv(nn.Module):
    """EfficientNet-Lite's ``Conv2dDynamicSamePadding`` (TF "SAME"), exportable for any size.

    TF pads ``p = max((ceil(i/s) - 1) s + k - i, 0)``, ``p // 2`` before. For stride 1 that is
    ``k - 1``; for stride 2 and odd ``k`` it is ``k - 1`` for odd ``i`` and ``k - 2`` for even
    ``i`` (one row fewer before). So: pad ``(k-1)//2`` both sides and drop the first row when
    ``i`` is even (a shape expression, not a Python branch).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        k, s = tuple(conv.weight.shape[-2:]), tuple(conv.stride) * (2 // len(conv.stride))
        if tuple(conv.dilation) not in ((1, 1), (1,)) or any(x not in (1, 2) for x in s):
            raise ExportError(f"unsupported same-padding convolution (stride {s})")
        if any(x % 2 == 0 for x in k):
            raise ExportError(f"unsupported same-padding convolution (kernel {k})")
        self.weight, self.bias = conv.weight, conv.bias
        self.k, self.s, self.groups = k, s, int(conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw) = self.k, self.s
        pads = [(kh - 1) // 2, (kw - 1) // 2]
        if sh == 1 and sw == 1:  # symmetric: the convolution pads (no Pad node in the graph)
            return F.conv2d(x, self.weight, self.bias, 1, pads, 1, self.groups)
        even = [self._even(x.shape[2], sh), self._even(x.shape[3], sw)]
        if all(isinstance(e, int) for e in even):  # a fixed size: pads known at export time
            if even == [0, 0]:
                return F.conv2d(x, self.weight, self.bias, self.s, pads, 1, self.groups)
            x = F.pad(x, [pads[1] - even[1], pads[1], pads[0] - even[0], pads[0]])
            return F.conv2d(x, self.weight, self.bias, self.s, 0, 1, self.groups)
        x = F.pad(x, [pads[1], pads[1], pads[0], pads[0]])
        for dim, e in ((2, even[0]), (3, even[1])):
            x = x.narrow(dim, e, x.shape[dim] - e)
        return F.conv2d(x, self.weight, self.bias, self.s, 0, 1, self.groups)

    @staticmethod
    def _even(size: Any, stride: int) -> Any:
        """1 where TF pads one row fewer before (stride 2, even size), else 0."""
        return 1 - size % 2 if stride == 2 else 0


def _exportable(stages: nn.Module) -> nn.Module:
    """A copy of the backbone stages with every dynamic same-padding convolution replaced."""
    try:
        from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
    except ImportError:  # pragma: no cover - resnets only
        Conv2dDynamicSamePadding = ()  # type: ignore[assignment]
    stages = copy.deepcopy(stages)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if Conv2dDynamicSamePadding and isinstance(child, Conv2dDynamicSamePadding):
                setattr(module, name, _SameConv(child))
            else:
                swap(child)

    swap(stages)
    return stages.float().eval()


class ScoringGraph(nn.Module):
    """The whole scoring path of a fitted detector as one torch module (what is exported).

    Args:
        det: a fitted :class:`~patchcore.core.detector.PatchCore`.
        size: the fixed processed (H, W) (map operators become constants), or ``None`` for
            any size.
        block_rows: bank rows per distance block.

    ``forward(pixels (B, 3, H, W) in [0, 1]) -> (scores (B,), maps (B, H, W))`` float32.
    """

    def __init__(self, det: PatchCore, size: tuple[int, int] | None, block_rows: int = 4096):
        super().__init__()
        ext = det.extractor_
        self.stages = _exportable(ext.stages)
        self.taps = tuple(det.state_.layers)
        self.kernel_size = int(det.kernel_size)
        self.embed_dim = det.embed_dim
        self.sigma = float(det.sigma)
        self.register_buffer("mean", torch.tensor(ext.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(ext.std, dtype=torch.float32).view(1, 3, 1, 1))
        bank = det.state_.memory_bank.detach().float().cpu().contiguous()
        m = bank.shape[0]
        self.k = min(int(det.num_neighbors), m)
        self.top_k = int(det.top_k)  # > 1: the image score is the mean of the top_k distances
        centre = bank.mean(0)
        centred = bank - centre
        bank_ext = torch.cat([-2.0 * centred, (centred * centred).sum(1, keepdim=True)], 1)
        self.register_buffer("bank_mean", centre)
        self.n_blocks = max(1, math.ceil(m / int(block_rows)))
        step = math.ceil(m / self.n_blocks)
        for i in range(self.n_blocks):  # (D + 1, rows) each: q_ext @ block = |b|^2 - 2 q.b
            self.register_buffer(f"block{i}", bank_ext[i * step : (i + 1) * step].T.contiguous())
        if self.k > 1 and self.top_k == 1:  # eq. 7: m*'s k nearest rows, computed once here
            self.register_buffer("bank", bank)
            _, table = NearestNeighborIndex(bank).search(bank, k=self.k)
            self.register_buffer("knn", table)
        self.size = size
        if size is not None:
            a_h, a_w = scoring.map_operators(grid_size(det, size), size, self.sigma)
            self.register_buffer("a_h", a_h.float())
            self.register_buffer("a_w", a_w.float())
        if self.sigma > 0:
            self.register_buffer("kernel", scoring.gaussian_kernel1d(self.sigma, torch.float32))

    def patch_distances(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, D) patch features -> (B, P) distances to the nearest bank row, float32.

        The hook an export's search replaces (:mod:`patchcore.core.export`'s int8 search):
        whatever it returns must be exact for each image's ``top_k`` largest distances.
        """
        b, p, d = patches.shape
        return self.min_sq(patches.reshape(b * p, d)).clamp(min=0.0).sqrt().view(b, p)

    def min_sq(self, q: torch.Tensor) -> torch.Tensor:
        """(Q, D) -> (Q,) squared distance to the nearest bank row, block by block."""
        qc = q - self.bank_mean
        q_ext = torch.cat([qc, torch.ones_like(qc[:, :1])], 1)
        best = None
        for i in range(self.n_blocks):
            part = torch.matmul(q_ext, getattr(self, f"block{i}")).amin(1)
            best = part if best is None else torch.minimum(best, part)
        assert best is not None
        return best + (qc * qc).sum(1)

    def _nearest_row(self, q: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B,) int64 index of each query's nearest bank row (lowest on ties)."""
        qc = q - self.bank_mean
        q_ext = torch.cat([qc, torch.ones_like(qc[:, :1])], 1)
        parts = [torch.matmul(q_ext, getattr(self, f"block{i}")) for i in range(self.n_blocks)]
        return torch.cat(parts, 1).argmin(1)

    def _map(self, grid: torch.Tensor, size: tuple[Any, Any]) -> torch.Tensor:
        """(B, 1, h, w) patch scores -> (B, H, W) upsampled and blurred (the detector's map:
        its operators at a fixed size; else the same two steps, any size > the blur radius)."""
        if self.size is not None:
            return scoring.apply_operators(grid, self.a_h, self.a_w)[:, 0]
        up = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
        if self.sigma <= 0:
            return up[:, 0]
        return scoring.blur(up, self.kernel, "reflect")[:, 0]

    def _support(self, worst: torch.Tensor) -> torch.Tensor:
        """(B, D) worst patches -> (B, k, D): the bank rows of eq. 7 (the k-NN table of m*)."""
        return self.bank[self.knn[self._nearest_row(worst)]]

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (pixels - self.mean) / self.std
        feats = []
        for name, stage in self.stages.items():
            x = stage(x)
            if name in self.taps:
                feats.append(x)
        emb = embed(feats, kernel_size=self.kernel_size, embed_dim=self.embed_dim)
        b, d, h, w = emb.shape
        patches = emb.permute(0, 2, 3, 1).reshape(b, h * w, d)
        dist = self.patch_distances(patches)
        eq7 = self._support if self.k > 1 and self.top_k == 1 else None
        scores = scoring.image_scores(dist, self.top_k, patches=patches, support=eq7)
        maps = self._map(dist.view(b, 1, h, w), pixels.shape[-2:])
        return scores, maps


def grid_size(det: PatchCore, size: tuple[int, int]) -> tuple[int, int]:
    """The patch grid (h, w) the detector produces for a processed ``size``: the first tapped
    layer's grid (the embedding keeps it), from one dry run of the feature extractor."""
    with torch.inference_mode():
        feats = det.extractor_(torch.zeros(1, 3, *size))
    first = feats[det.state_.layers[0]]
    return int(first.shape[-2]), int(first.shape[-1])

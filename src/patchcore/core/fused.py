"""The fused forward pass of a truncated backbone (what :class:`~patchcore.core.backbones.
FeatureExtractor` runs): BatchNorm folded into the convolutions, activations and residual
additions fused, oneDNN's fused convolutions on CPU, a few images at a time. Its features equal
the modules' own to float32 rounding.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CANVAS_UNIT", "FusedPlan", "Mask", "UnsupportedLayerError", "placement", "use_mkldnn"]


class UnsupportedLayerError(Exception):
    """The backbone has a layer the fused plan does not handle: run the modules as they are."""


_CHUNK_PIXELS = 2**18  # input pixels per forward pass of the plan on CPU (~5 images of 224x224)
_CACHED_SHAPES = 8  # packings per convolution kept (see _pack_key)
_ACTIVATIONS = {None: ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0])}


def _mkldnn_ops_available() -> bool:
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_convolution_pointwise") and hasattr(ops, "_reorder_convolution_weight")


def use_mkldnn(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the plan should use oneDNN's fused convolutions (CPU, and the dtype supported)."""
    if device.type != "cpu" or not _mkldnn_ops_available():
        return False
    ops = torch.ops.mkldnn
    if dtype == torch.bfloat16:
        return hasattr(ops, "_is_mkldnn_bf16_supported") and ops._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return hasattr(ops, "_is_mkldnn_fp16_supported") and ops._is_mkldnn_fp16_supported()
    return dtype == torch.float32


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (computed in float64)."""
    w = conv.weight.detach().double()
    b = (
        conv.bias.detach().double()
        if conv.bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    )
    if bn is not None:
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * scale.view(-1, 1, 1, 1)
        b = (b - bn.running_mean.double()) * scale + bn.bias.detach().double()
    return w, b


@functools.lru_cache(maxsize=4096)
def _same_padding(
    h: int, w: int, kh: int, kw: int, sh: int, sw: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """TF "SAME" padding of an (h, w) input: ((odd rows, odd columns), symmetric padding),
    total ``p = max((ceil(i/s) - 1) s + k - i, 0)`` per axis (cached: a plan meets few sizes)."""
    pads = [max((math.ceil(i / s) - 1) * s + k - i, 0) for i, k, s in ((h, kh, sh), (w, kw, sw))]
    return (pads[0] % 2, pads[1] % 2), (pads[0] - pads[0] // 2, pads[1] - pads[1] // 2)


def _pack_key(shape: torch.Size, odd: tuple[int, int]) -> tuple[int, ...]:
    """What a packed weight is kept for: batch, channels, odd padding, log2 of the area."""
    area = max(1, int(shape[-2]) * int(shape[-1]))
    return (int(shape[0]), int(shape[1]), *odd, area.bit_length())


class _Conv:
    """A frozen convolution with its BatchNorm folded in, then activation ``act``.

    ``same=True`` pads like TensorFlow's "SAME" for the input at hand: total padding
    ``p = max((ceil(i/s) - 1) s + k - i, 0)`` per axis, ``p // 2`` before and the rest after.
    Odd ``p`` is done without padding the input: the kernel gets a leading zero row (column) and
    the convolution pads ``p - p // 2`` on both sides, which gives the same sums.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None,
        act: str | None,
        *,
        same: bool,
        dtype: torch.dtype,
        mkldnn: bool,
    ) -> None:
        if tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
            raise UnsupportedLayerError("dilated or non-zero-padded convolution")
        if act not in _ACTIVATIONS:
            raise UnsupportedLayerError(f"activation {act}")
        w, b = _fold_bn(conv, bn)
        self.weight = w.to(dtype)
        self.bias = b.to(dtype)
        self.stride = [int(s) for s in conv.stride] * (2 // len(conv.stride))
        self.groups = int(conv.groups)
        self.same = same
        self.padding = None if same else [int(p) for p in conv.padding]
        self.act = act
        self.mkldnn = mkldnn
        self.spatial = tuple(conv.kernel_size) != (1, 1)  # mixes neighbouring positions
        self._attr, self._scalars = _ACTIVATIONS[act]
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _weight(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(weight, symmetric padding) for input ``x``; packed for oneDNN on that path.

        oneDNN picks its packed weight layout by input shape, and a layout packed for a very
        different shape can be much slower (e.g. resnet50 at small sizes), so packed weights
        are kept per :func:`_pack_key`: batch, channels, the odd-padding pattern (it changes
        the kernel) and the input's area to a power of two. Inputs of many sizes (each one
        new, as in magnetic_tile) then reuse a few packings instead of packing every layer
        per size. The result does not depend on the packing (oneDNN reorders a weight whose
        layout does not suit the shape), only the speed.
        """
        shape = x.shape
        w = self.weight
        if self.same:
            kh, kw = w.shape[-2:]
            odd, pads = _same_padding(shape[-2], shape[-1], kh, kw, *self.stride)
            padding = list(pads)
        else:
            odd, padding = (0, 0), list(self.padding)
        key = _pack_key(shape, odd)
        hit = self._cache.get(key)
        if hit is not None:
            return hit, padding
        if odd[0] or odd[1]:
            w = F.pad(w, [odd[1], 0, odd[0], 0])
        if self.mkldnn:
            w = torch.ops.mkldnn._reorder_convolution_weight(
                w, padding, self.stride, [1, 1], self.groups, list(shape)
            )
        if len(self._cache) >= _CACHED_SHAPES:
            self._cache.pop(next(iter(self._cache)), None)  # the oldest
        self._cache[key] = w
        return w, padding

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(conv(x) + residual)``."""
        w, padding = self._weight(x)
        if self.mkldnn:
            # oneDNN convolution + bias (+ residual) + activation in one pass
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, w, self.bias, padding, self.stride, [1, 1], self.groups,
                    self._attr, self._scalars, "",
                )  # fmt: skip
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, w, self.bias, padding, self.stride, [1, 1], self.groups,
                "add", None, None if self.act is None else self._attr, self._scalars, None,
            )  # fmt: skip
        y = F.conv2d(x, w, self.bias, self.stride, padding, 1, self.groups)
        if residual is not None:
            y += residual
        if self.act == "relu":
            y.relu_()
        elif self.act == "relu6":
            y.clamp_(0.0, 6.0)
        return y


Box = tuple[int, int, int, int]  # an image's top, left, height and width on a canvas

#: Canvas sides are multiples of this (see :meth:`FusedPlan.forward_many`); at least the
#: deepest stride of a plan, which a multiple of 32 covers for every supported backbone.
CANVAS_UNIT = 32


def placement(size: int, depth: int) -> int:
    """Rows (columns) left before an image side of ``size`` on a canvas so that a plan with
    ``depth`` stride-2 "SAME" convolutions sees it as alone: the side then ends on a multiple
    of ``2**depth``, and each such convolution pads the image as it pads the image alone."""
    return -size % (1 << depth)


class Mask:
    """Zeroes what lies outside each image's box in a (B, C, H / 2**n, W / 2**n) activation
    of a canvas of ``size`` (H, W) (in place): there the image alone has "SAME" zero padding."""

    def __init__(self, boxes: list[Box], size: tuple[int, int]) -> None:
        self.boxes, self.height = boxes, int(size[0])

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        hy, wy = int(y.shape[-2]), int(y.shape[-1])
        n = (self.height // hy).bit_length() - 1
        for i, (t, l, h, w) in enumerate(self.boxes):  # noqa: E741
            t, l, h, w = t >> n, l >> n, -(-h >> n), -(-w >> n)  # noqa: E741  (sides: ceil)
            if (t, l, h, w) == (0, 0, hy, wy):
                continue
            y[i, :, :t] = 0
            y[i, :, t + h :] = 0
            y[i, :, t : t + h, :l] = 0
            y[i, :, t : t + h, l + w :] = 0
        return y


def _masked(step: object, y: torch.Tensor, mask: Mask | None) -> torch.Tensor:
    """``y`` as the input of ``step``: ``mask`` applied where the step mixes neighbours."""
    return mask(y) if mask is not None and step.spatial else y  # type: ignore[attr-defined]


def _run(step: object, y: torch.Tensor, mask: Mask | None) -> torch.Tensor:
    """One step of a plan (a convolution, a block or a pooling) with ``mask`` applied."""
    if isinstance(step, _Block):
        return step(y, mask)
    return step(_masked(step, y, mask))  # type: ignore[operator]


class _Block:
    """A residual block: ``body`` convolutions, the last one adding the shortcut."""

    def __init__(self, body: list[_Conv], shortcut: _Conv | None, skip: bool) -> None:
        self.body, self.shortcut, self.skip = body, shortcut, skip

    def __call__(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """The block on ``x``; ``mask`` (placed images) zeroes what lies outside the images
        in each input of a convolution that mixes neighbouring positions."""
        residual = self.shortcut(x) if self.shortcut is not None else x if self.skip else None
        for conv in self.body[:-1]:
            x = conv(_masked(conv, x, mask))
        return self.body[-1](_masked(self.body[-1], x, mask), residual)


class _MaxPool:
    spatial = True  # mixes neighbouring positions

    def __init__(self, m: nn.MaxPool2d) -> None:
        self.args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, *self.args)


def _resnet_plan(stages: nn.ModuleDict, conv) -> list[tuple[str, list]]:  # noqa: ANN001
    from torchvision.models.resnet import BasicBlock, Bottleneck

    plan: list[tuple[str, list]] = []
    for name, stage in stages.items():
        if name == "stem":
            c, bn, relu, pool = stage
            if not isinstance(relu, nn.ReLU) or not isinstance(pool, nn.MaxPool2d):
                raise UnsupportedLayerError("resnet stem")
            plan.append((name, [conv(c, bn, "relu"), _MaxPool(pool)]))
            continue
        steps = []
        for blk in stage:
            if type(blk) is BasicBlock:
                pairs = [(blk.conv1, blk.bn1), (blk.conv2, blk.bn2)]
            elif type(blk) is Bottleneck:
                pairs = [(blk.conv1, blk.bn1), (blk.conv2, blk.bn2), (blk.conv3, blk.bn3)]
            else:
                raise UnsupportedLayerError(type(blk).__name__)
            if not isinstance(blk.relu, nn.ReLU):
                raise UnsupportedLayerError("resnet activation")
            shortcut = None
            if blk.downsample is not None:
                ds = list(blk.downsample)
                if len(ds) != 2 or not isinstance(ds[1], nn.BatchNorm2d):
                    raise UnsupportedLayerError("resnet downsample")
                shortcut = conv(ds[0], ds[1], None)
            steps.append(_Block([conv(c, bn, "relu") for c, bn in pairs], shortcut, True))
        plan.append((name, steps))
    return plan


def _lite_plan(stages: nn.ModuleDict, conv) -> list[tuple[str, list]]:  # noqa: ANN001
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    def same(c: nn.Module, bn: nn.Module, act: str | None) -> _Conv:
        if type(c) is not Conv2dDynamicSamePadding:
            raise UnsupportedLayerError(type(c).__name__)
        return conv(c, bn, act, same=True)

    plan: list[tuple[str, list]] = []
    for name, stage in stages.items():
        if name == "stem":
            if type(stage.act) is not nn.ReLU6:
                raise UnsupportedLayerError("activation")
            plan.append((name, [same(stage.conv, stage.bn, "relu6")]))
            continue
        steps = []
        for blk in stage:
            a = blk._block_args
            if blk.has_se or type(blk._swish) is not nn.ReLU6:
                raise UnsupportedLayerError("squeeze-excitation or swish")
            body = []
            if a.expand_ratio != 1:
                body.append(same(blk._expand_conv, blk._bn0, "relu6"))
            body.append(same(blk._depthwise_conv, blk._bn1, "relu6"))
            body.append(same(blk._project_conv, blk._bn2, None))
            # the same condition as MBConvBlock.forward
            skip = bool(blk.id_skip and a.stride == 1 and a.input_filters == a.output_filters)
            steps.append(_Block(body, None, skip))
        plan.append((name, steps))
    return plan


def _convs(step: object) -> list[_Conv]:
    if isinstance(step, _Conv):
        return [step]
    if isinstance(step, _Block):
        return [*step.body, *([step.shortcut] if step.shortcut is not None else [])]
    return []


class FusedPlan:
    """The fused forward pass of a truncated backbone."""

    def __init__(
        self, family: str, stages: nn.ModuleDict, taps: tuple[str, ...], dtype: torch.dtype,
        device: torch.device, mkldnn: bool,
    ) -> None:  # fmt: skip
        def conv(c: nn.Conv2d, bn: nn.BatchNorm2d, act: str | None, same: bool = False) -> _Conv:
            return _Conv(c, bn, act, same=same, dtype=dtype, mkldnn=mkldnn)

        build = _resnet_plan if family == "resnet" else _lite_plan
        self.stages = build(stages, conv)
        self.taps = taps
        self.dtype = dtype
        self.device = device
        self.mkldnn = mkldnn
        self.channels_last = device.type == "cpu"
        convs = [c for _, steps in self.stages for s in steps for c in _convs(s)]
        #: stride-2 convolutions up to the deepest tap; images can share a canvas
        #: (:meth:`forward_many`) where every convolution pads like TensorFlow's "SAME"
        self.depth = sum(c.stride == [2, 2] for c in convs)
        self.placeable = all(c.same for c in convs) and (1 << self.depth) <= CANVAS_UNIT

    def forward_many(self, xs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The features of several batches of different sizes, ``xs`` (B_i, 3, H_i, W_i).

        Batches whose sizes round up to the same multiple of :data:`CANVAS_UNIT` run as one
        batch on a canvas of that size: each image placed at :func:`placement`, zero around
        it and zeroed again (:class:`Mask`) before each convolution that mixes neighbouring
        positions, so its features are the ones it gets alone (to float32 rounding: a batch
        is not summed in the same order as one image), cropped to its own grid. oneDNN then
        meets a few canvas sizes instead of one new size per image.
        """
        if not self.placeable:
            return [self(x) for x in xs]
        canvases: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(xs):
            key = tuple(-(-int(v) // CANVAS_UNIT) * CANVAS_UNIT for v in x.shape[-2:])
            canvases.setdefault(key, []).append(i)  # type: ignore[arg-type]
        out: list[dict[str, torch.Tensor]] = [{} for _ in xs]
        for (hc, wc), members in canvases.items():
            if len(members) == 1 and tuple(xs[members[0]].shape[-2:]) == (hc, wc):
                out[members[0]] = self(xs[members[0]])
                continue
            first = xs[members[0]]
            total = sum(int(xs[i].shape[0]) for i in members)
            canvas = first.new_zeros((total, 3, hc, wc)).to(memory_format=torch.channels_last)
            boxes: list[Box] = []
            spans = []
            for i in members:
                b, _, h, w = (int(v) for v in xs[i].shape)
                t, l = placement(h, self.depth), placement(w, self.depth)  # noqa: E741
                lo = len(boxes)
                canvas[lo : lo + b, :, t : t + h, l : l + w] = xs[i]
                boxes += [(t, l, h, w)] * b
                spans.append((i, lo, b, t, l, h, w))
            feats = self(canvas, boxes)
            for i, lo, b, t, l, h, w in spans:  # noqa: E741
                for name, f in feats.items():
                    n = (hc // int(f.shape[-2])).bit_length() - 1
                    rows = slice(t >> n, (t >> n) + -(-h >> n))
                    cols = slice(l >> n, (l >> n) + -(-w >> n))
                    out[i][name] = f[lo : lo + b, :, rows, cols].contiguous()
        return out

    def __call__(self, x: torch.Tensor, boxes: list[Box] | None = None) -> dict[str, torch.Tensor]:
        """Tapped features of ``x`` (B, 3, H, W); ``boxes``: the images' boxes when ``x`` is a
        canvas (:meth:`forward_many`), zero outside them."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # A few images at a time: on CPU, big batches are slower per image (their activations
        # no longer fit the caches, and the allocator maps and unmaps them on every call).
        num = step = x.shape[0]
        if self.channels_last:
            chunks = -(-num // max(1, _CHUNK_PIXELS // max(1, x.shape[-2] * x.shape[-1])))
            step = -(-num // chunks)  # equal chunks
        out: dict[str, torch.Tensor] = {}
        for lo in range(0, num, step):
            y = x[lo : lo + step].to(self.dtype, memory_format=fmt)
            mask = None if boxes is None else Mask(boxes[lo : lo + step], x.shape[-2:])
            for name, steps in self.stages:
                for s in steps:
                    y = _run(s, y, mask)
                if name in self.taps:
                    if step >= num:
                        out[name] = y.to(torch.float32, memory_format=torch.contiguous_format)
                        continue
                    if name not in out:
                        out[name] = y.new_empty((num, *y.shape[1:]), dtype=torch.float32)
                    out[name][lo : lo + step] = y
        return out

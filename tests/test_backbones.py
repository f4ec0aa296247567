import urllib.error
from pathlib import Path

import pytest
import torch

from patchcore.core import fused
from patchcore.core.backbones import BACKBONES, BackboneWeightsError, FeatureExtractor
from patchcore.core.embedding import embed, flatten_patches, local_average, reduce_channels


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_lite_backbones_report_channels_and_strides_without_running(name: str) -> None:
    fe = FeatureExtractor(name)
    out = fe(torch.rand(1, 3, 96, 128))
    assert list(out) == list(fe.layers) == ["stage3", "stage5"]
    for layer, t in out.items():
        assert t.shape[1] == fe.channels()[layer]
        assert t.shape[2:] == (96 // fe.strides()[layer], 128 // fe.strides()[layer])
    assert not any(p.requires_grad for p in fe.parameters())


def test_extractor_is_truncated_after_deepest_layer() -> None:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        fe = FeatureExtractor("resnet18", ["layer1", "layer2"], weights=None)
    assert list(fe.stages) == ["stem", "layer1", "layer2"]
    assert fe.channels() == {"layer1": 64, "layer2": 128}
    assert fe.strides() == {"layer1": 4, "layer2": 8}
    fe.train()
    assert not fe.training


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg'.*resnet18"):
        FeatureExtractor("vgg")
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['layer9'\]"):
        FeatureExtractor("efficientnet-lite0", ["stage3", "layer9"])
    with pytest.raises(ValueError, match="ordered shallow to deep"):
        FeatureExtractor("efficientnet-lite0", ["stage5", "stage3"])


def test_random_weights_are_reproducible() -> None:
    with pytest.warns(UserWarning):
        a = FeatureExtractor("resnet18", weights=None)
    with pytest.warns(UserWarning):
        b = FeatureExtractor("resnet18", weights=None)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(a(x)["layer3"], b(x)["layer3"])


def test_torchvision_weights_api_reads_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    """weights='imagenet' goes through torchvision's weights API, which finds the cached file."""
    import torchvision

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.manual_seed(1)
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    fe = FeatureExtractor("resnet18", weights="imagenet")
    torch.testing.assert_close(fe.stages["layer1"][0].conv1.weight, sd["layer1.0.conv1.weight"])


def test_local_weights_file(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(2)
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    fe = FeatureExtractor("resnet18", weights=tmp_path / "r18.pth")
    torch.testing.assert_close(fe.stages["layer2"][0].conv1.weight, sd["layer2.0.conv1.weight"])
    torch.save({"x": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(BackboneWeightsError, match="wrong.pth: does not fit resnet18"):
        FeatureExtractor("resnet18", weights=tmp_path / "wrong.pth")
    with pytest.raises(BackboneWeightsError, match="nope.pth: weights file for resnet18 not found"):
        FeatureExtractor("resnet18", weights=tmp_path / "nope.pth")


def test_failed_download_says_which_file_to_put_where(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BackboneWeightsError) as err:
        FeatureExtractor("resnet18")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "checkpoints") in msg
    assert "efficientnet-lite0" in msg


def test_embedding_shapes_and_local_average() -> None:
    f1, f2 = torch.rand(2, 4, 8, 8), torch.rand(2, 6, 4, 4)
    e = embed([f1, f2])
    assert e.shape == (2, 10, 8, 8)
    torch.testing.assert_close(e[:, :4], local_average(f1))
    # the 3x3 average of a constant map is the constant away from the border
    c = torch.ones(1, 1, 5, 5)
    assert float(local_average(c)[0, 0, 2, 2]) == pytest.approx(1.0)
    assert reduce_channels(torch.rand(1, 10, 3, 3), 5).shape == (1, 5, 3, 3)
    assert flatten_patches(e).shape == (2 * 64, 10)
    torch.testing.assert_close(flatten_patches(e)[9], e[0, :, 1, 1])


def test_registry_lists_the_documented_backbones() -> None:
    assert {"resnet18", "resnet50", "wide_resnet50_2", "efficientnet-lite0"} <= set(BACKBONES)


# ----------------------------------------------------------------- fused inference plan


def _assert_features_close(got: dict, ref: dict) -> None:
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == torch.float32 and got[k].shape == ref[k].shape
        assert got[k].is_contiguous()
        scale = float(ref[k].abs().max())
        assert float((got[k] - ref[k]).abs().max()) <= 1e-4 * scale, k


def _randomise_batchnorm(fe: FeatureExtractor, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, loaded like a saved model's (which resets the plan)."""
    gen = torch.Generator().manual_seed(seed)
    sd = fe.state_dict()
    for k, v in sd.items():
        if k.endswith(("running_var", "weight")) and v.ndim == 1:
            sd[k] = 0.5 + torch.rand(v.shape, generator=gen)
        elif k.endswith(("running_mean", "bias")) and v.ndim == 1:
            sd[k] = 0.2 * torch.randn(v.shape, generator=gen)
    fe.load_state_dict(sd)


@pytest.mark.parametrize("mkldnn", [None, False])
@pytest.mark.parametrize("shape", [(1, 97, 131), (3, 97, 131), (1, 96, 128), (3, 96, 128)])
def test_fused_lite_equals_unfused_modules(shape: tuple[int, int, int], mkldnn) -> None:
    """BatchNorm folding, fused ReLU6/residuals and TF 'same' padding without F.pad (odd and
    even sizes: the stride-2 convolutions pad asymmetrically on even sizes) change nothing."""
    fe = FeatureExtractor("efficientnet-lite0", ["stage2", "stage3", "stage5"])
    if mkldnn is not None:
        fe._get_plan(torch.device("cpu"), mkldnn=mkldnn)
    x = torch.randn(shape[0], 3, *shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _assert_features_close(fe(x), fe.reference_forward(x))
    assert fe._plan is not None and (mkldnn is None or fe._plan.mkldnn == mkldnn)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("mkldnn", [None, False])
def test_fused_resnet_equals_unfused_modules(name: str, mkldnn) -> None:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        fe = FeatureExtractor(name, ["layer1", "layer2", "layer3"], weights=None)
    _randomise_batchnorm(fe)
    if mkldnn is not None:
        fe._get_plan(torch.device("cpu"), mkldnn=mkldnn)
    for b, h, w in [(1, 97, 131), (3, 64, 96)]:
        x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            _assert_features_close(fe(x), fe.reference_forward(x))


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18"])
def test_packed_weights_kept_across_sizes_give_the_features_of_a_cold_plan(
    name: str, monkeypatch
) -> None:
    """Many input sizes in turn reuse a few packed weights (one per batch, channels, odd
    padding and area class): each image's features are those of a plan that never saw
    another size, bit for bit."""
    import warnings

    if not fused.use_mkldnn(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN convolutions here: nothing is packed")
    packed = []
    reorder = torch.ops.mkldnn._reorder_convolution_weight
    monkeypatch.setattr(
        torch.ops.mkldnn, "_reorder_convolution_weight", lambda *a: packed.append(1) or reorder(*a)
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lite = "lite" in name
        fe = FeatureExtractor(
            name,
            ["stage2", "stage3"] if lite else ["layer2"],
            **({} if lite else {"weights": None}),
        )
    gen = torch.Generator().manual_seed(0)
    sizes = [(97, 131), (96, 128), (101, 120), (64, 200), (130, 99), (97, 131), (40, 52)]
    images = [torch.randn(1, 3, h, w, generator=gen) for h, w in sizes]
    with torch.inference_mode():
        warm = [fe(x) for x in images]
        convs = len(_convs(fe))
        assert 0 < len(packed) <= 3 * convs  # 6 sizes: at most 3 packings per convolution
        for x, got in zip(images, warm, strict=True):
            fe._plan = None  # a cold plan: packs its weights for this size alone
            cold = fe(x)
            assert all(torch.equal(got[k], cold[k]) for k in cold)


@pytest.mark.parametrize("layers", [["stage3", "stage5"], ["stage1", "stage4", "stage7"]])
def test_images_sharing_a_canvas_get_the_features_they_get_alone(layers, canvases) -> None:
    """Batches of mixed sizes (odd and even sides, a few pixels to a full canvas unit apart)
    share canvases: each image placed so the stride-2 convolutions pad it as alone, and zeroed
    around before each spatial convolution; its cropped features equal its own (the check
    fails by about 100 % of the features' range without the placement or the zeroing)."""
    fe = FeatureExtractor("efficientnet-lite0", layers)
    _randomise_batchnorm(fe)
    gen = torch.Generator().manual_seed(2)
    sizes = [(97, 131), (100, 128), (113, 100), (128, 128), (65, 190), (33, 47), (96, 97)]
    xs = [torch.randn(1 + i % 2, 3, h, w, generator=gen) for i, (h, w) in enumerate(sizes)]
    with torch.inference_mode():
        many = fe.forward_many(xs)
        assert (5, 3, 128, 128) in canvases and len(canvases) < len(xs)  # shared, batched
        for x, got in zip(xs, many, strict=True):
            alone = fe(x)
            assert list(got) == list(alone)
            for k, a in alone.items():
                assert got[k].shape == a.shape
                assert float((got[k] - a).abs().max()) <= 1e-5 * float(a.abs().max()), k


def test_a_backbone_without_same_padding_runs_each_size_alone() -> None:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        fe = FeatureExtractor("resnet18", ["layer1", "layer2"], weights=None)
    xs = [torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h)) for h, w in
          [(64, 80), (70, 64)]]  # fmt: skip
    with torch.inference_mode():
        many = fe.forward_many(xs)
        assert not fe._plan.placeable
        for x, got in zip(xs, many, strict=True):
            assert all(torch.equal(got[k], v) for k, v in fe(x).items())


def test_canvas_placement_ends_each_side_on_the_deepest_stride() -> None:
    for depth in range(6):
        for size in range(1, 200):
            t = fused.placement(size, depth)
            assert 0 <= t < 2**depth and (t + size) % 2**depth == 0


def _convs(fe: FeatureExtractor) -> list:
    plan = fe._get_plan(torch.device("cpu"))
    steps = [s for _, stage in plan.stages for s in stage]
    blocks = [c for s in steps for c in [*getattr(s, "body", [s]), getattr(s, "shortcut", None)]]
    return [c for c in blocks if isinstance(c, fused._Conv)]


def test_fused_plan_keeps_the_standard_state_and_follows_loaded_weights() -> None:
    with pytest.warns(UserWarning):
        fe = FeatureExtractor("resnet18", ["layer1", "layer2"], weights=None)
    before = {k: v.clone() for k, v in fe.state_dict().items()}
    x = torch.rand(2, 3, 64, 64)
    first = fe(x)
    after = fe.state_dict()
    assert list(after) == list(before)  # BatchNorm not folded into the stored weights
    assert all(torch.equal(after[k], v) for k, v in before.items())
    _randomise_batchnorm(fe, seed=3)  # load_state_dict: the plan follows the new weights
    second = fe(x)
    assert not torch.allclose(first["layer2"], second["layer2"])
    _assert_features_close(second, fe.reference_forward(x))
    # a fresh extractor loading the state gives the same features
    with pytest.warns(UserWarning):
        other = FeatureExtractor("resnet18", ["layer1", "layer2"], weights=None)
    other.load_state_dict(fe.state_dict())
    torch.testing.assert_close(other(x), second, rtol=0, atol=0)
    fe.to("cpu")
    assert fe._plan is None  # rebuilt after .to()
    _assert_features_close(fe(x), second)


def test_batches_are_split_like_single_images() -> None:
    fe = FeatureExtractor()
    x = torch.randn(7, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # > 1 chunk
    with torch.inference_mode():
        whole = fe(x)
        one = fe(x[5:6])
    for k in whole:
        torch.testing.assert_close(whole[k][5:6], one[k], rtol=1e-5, atol=1e-5)


def test_input_requiring_grad_runs_the_modules() -> None:
    with pytest.warns(UserWarning):
        fe = FeatureExtractor("resnet18", ["layer1"], weights=None)
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    fe(x)["layer1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bfloat16_option_returns_float32_features_close_to_float32() -> None:
    fe = FeatureExtractor("efficientnet-lite0")
    fe16 = FeatureExtractor("efficientnet-lite0", dtype=torch.bfloat16)
    assert fe16.state_dict()["stages.stem.conv.weight"].dtype == torch.float32
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, got = fe(x), fe16(x)
    for k in ref:
        assert got[k].dtype == torch.float32
        assert float((got[k] - ref[k]).abs().max()) <= 0.15 * float(ref[k].abs().max())
    with pytest.raises(ValueError, match="dtype"):
        FeatureExtractor("efficientnet-lite0", dtype=torch.int8)


def test_extractor_copies_pickles_and_rejects_bad_input_after_running() -> None:
    import copy
    import pickle

    fe = FeatureExtractor("efficientnet-lite0", ["stage2"])
    x = torch.rand(2, 3, 64, 64)
    ref = fe(x)["stage2"]
    for other in (copy.deepcopy(fe), pickle.loads(pickle.dumps(fe))):
        torch.testing.assert_close(other(x)["stage2"], ref, rtol=0, atol=0)
    plan = fe._plan
    with pytest.raises(RuntimeError):
        fe(torch.rand(1, 4, 64, 64))  # wrong channels: an error, and the fast plan stays
    assert fe._plan is plan
    assert fe(torch.rand(0, 3, 64, 64))["stage2"].shape == (0, 24, 16, 16)

import urllib.error
from pathlib import Path

import pytest
import torch

from patchcore.backbones import BACKBONES, BackboneWeightsError, FeatureExtractor
from patchcore.embedding import embed, flatten_patches, local_average, reduce_channels


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

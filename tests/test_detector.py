import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from patchcore.core.detector import FORMAT_VERSION, ModelFileError, NotFittedError, PatchCore
from patchcore.core.images import ImageReadError
from patchcore.lean.normalization import fit_normalization


def small(**kw) -> PatchCore:
    params = dict(image_size=96, coreset_ratio=0.25, progress=False, num_neighbors=3)
    params.update(kw)
    return PatchCore(**params)


@pytest.fixture(scope="module")
def fitted(toy_images):
    """One fitted detector shared by the module: read it, never change it (see ``fresh``)."""
    train, _, _ = toy_images
    det = small().fit(train)
    bank = det.memory_bank_.clone()
    yield det
    # order-independence guard: no test may have changed the shared detector
    assert det.threshold_ is None and det.threshold_method_ is None and det.metadata_ == {}
    assert torch.equal(det.memory_bank_, bank) and det.get_params() == small().get_params()


@pytest.fixture
def det(fitted: PatchCore) -> PatchCore:
    """A private copy of ``fitted`` for tests that set thresholds, metadata or parameters."""
    return copy.deepcopy(fitted)


def test_defects_score_above_every_normal(fitted: PatchCore, toy_images) -> None:
    _, good, bad = toy_images
    s_good, s_bad = fitted.score_samples(good), fitted.score_samples(bad)
    assert s_bad.min() > s_good.max()


def test_anomaly_map_peaks_on_the_defect(fitted: PatchCore) -> None:
    from conftest import textured

    img = textured(np.random.default_rng(5))
    img[40:52, 60:72] = 255
    m = fitted.anomaly_map(img)
    assert m.shape == (96, 96) and m.dtype == np.float32
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert 34 <= y <= 58 and 54 <= x <= 78


def test_map_has_the_input_size_and_mixed_sizes_batch(fitted: PatchCore) -> None:
    rng = np.random.default_rng(1)
    imgs = [
        rng.integers(0, 255, (h, w), dtype=np.uint8) for h, w in [(50, 70), (96, 96), (200, 120)]
    ]
    maps = fitted.anomaly_maps(imgs)
    assert [m.shape for m in maps] == [(50, 70), (96, 96), (200, 120)]
    # batching does not change scores
    together = fitted.score_samples(imgs)
    alone = np.array([fitted.score_samples([i])[0] for i in imgs])
    np.testing.assert_allclose(together, alone, rtol=1e-5)


def test_scale_keeps_native_aspect(toy_images) -> None:
    train, good, _ = toy_images
    det = small(image_size=None, scale=0.5, coreset_ratio=0.5).fit(train[:2])
    assert det.anomaly_map(good[0]).shape == (96, 96)


def test_same_seed_same_model(toy_images) -> None:
    train, _, _ = toy_images
    a = small(seed=3).fit(train).memory_bank_
    b = small(seed=3).fit(train).memory_bank_
    c = small(seed=4).fit(train).memory_bank_
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_sampling_and_bank_size(toy_images) -> None:
    train, _, _ = toy_images
    det = small(sampling="random", coreset_ratio=0.1).fit(train)
    assert det.n_train_patches_ == 6 * 12 * 12
    assert det.memory_bank_.shape == (int(6 * 144 * 0.1), 48 + 120)  # lite2's stage3 + stage5


def test_plain_max_equals_nearest_distance_of_worst_patch(fitted: PatchCore, toy_images) -> None:
    """With num_neighbors=1 the image score is max over patches of the brute-force NN distance."""
    _, good, _ = toy_images
    det = small(num_neighbors=1, top_k=1).fit(toy_images[0])
    emb = det._embed(torch.stack([torch.from_numpy(good[0]).permute(2, 0, 1).float() / 255]))
    patches = emb[0].flatten(1).T
    want = torch.cdist(patches.double(), det.memory_bank_.double()).min(1).values.max()
    assert det.score_samples([good[0]])[0] == pytest.approx(float(want), rel=1e-4)
    # reweighting only ever lowers the score
    rew = small(num_neighbors=3, top_k=1).fit(toy_images[0]).score_samples([good[0]])[0]
    assert rew <= float(want) + 1e-6


def test_save_load_round_trip_really_reloads(det: PatchCore, toy_images, tmp_path: Path) -> None:
    _, good, bad = toy_images
    det.set_threshold(1.5, "manual")
    det.metadata_["note"] = "hello"
    path = det.save(tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)  # plain tensors and a config, no pickled objects
    assert (
        raw["format_version"] == FORMAT_VERSION
        and raw["config"]["backbone"] == "efficientnet-lite2"  # the default, always written
    )
    loaded = PatchCore.load(path)
    assert loaded is not det and loaded.threshold_ == 1.5 and loaded.metadata_ == {"note": "hello"}
    np.testing.assert_array_equal(loaded.score_samples(good + bad), det.score_samples(good + bad))
    np.testing.assert_array_equal(loaded.anomaly_map(bad[0]), det.anomaly_map(bad[0]))
    assert loaded.card()["bank_size"] == det.memory_bank_.shape[0]


def test_load_rejects_newer_damaged_and_foreign_files(fitted: PatchCore, tmp_path: Path) -> None:
    path = fitted.save(tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = FORMAT_VERSION + 1
    torch.save(raw, tmp_path / "newer.pt")
    with pytest.raises(ModelFileError, match="newer.pt: written by a newer patchcore"):
        PatchCore.load(tmp_path / "newer.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="cut.pt: not a readable patchcore model"):
        PatchCore.load(tmp_path / "cut.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="other.pt: not a patchcore model file"):
        PatchCore.load(tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="no such model file"):
        PatchCore.load(tmp_path / "missing.pt")


def test_not_fitted_and_no_threshold_errors_say_what_to_do(toy_images) -> None:
    _, good, _ = toy_images
    with pytest.raises(NotFittedError, match=r"call fit\(normal_images\)"):
        small().score_samples(good)
    det = small().fit(good[:2])
    with pytest.raises(NotFittedError, match=r"call calibrate\(images, labels\)"):
        det.predict(good)


def test_calibrate_then_predict_and_classify(det: PatchCore, toy_images) -> None:
    _, good, bad = toy_images
    det.calibrate(good + bad, [0] * 4 + [1] * 4, method="max_f1")
    assert det.threshold_method_ == "max_f1"
    np.testing.assert_array_equal(det.predict(good + bad), [False] * 4 + [True] * 4)
    out = det.classify(bad[:2])
    assert out.labels.tolist() == [True, True] and len(out.maps) == 2


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"coreset_ratio": 0}, r"coreset_ratio must be in \(0, 1\], got 0"),
        ({"coreset_ratio": 1.5}, "got 1.5"),
        (
            {"sampling": "kmeans"},
            r"sampling must be one of \('greedy', 'greedy_exact', 'random'\), got 'kmeans'",
        ),
        ({"scale": 0.4}, "give image_size or scale, not both"),
        ({"backbone": "vgg16"}, "unknown backbone 'vgg16'"),
        ({"num_neighbors": 0}, "num_neighbors must be >= 1, got 0"),
        ({"image_size": 8}, "image_size must be"),
        ({"feature_dtype": "bfloat16"}, "feature_dtype must be 'float16' or 'float32'"),
        ({"projection_dim": 0}, "projection_dim must be >= 1 or None, got 0"),
    ],
)
def test_fit_validates_arguments(kw, match, toy_images) -> None:
    with pytest.raises(ValueError, match=match):
        small(**kw).fit(toy_images[0][:1])


def test_one_corrupt_file_is_named_or_skipped(tmp_path: Path, toy_images) -> None:
    from PIL import Image

    train, good, _ = toy_images
    paths = []
    for i, img in enumerate(train[:3]):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    paths.insert(1, tmp_path / "bad.png")
    with pytest.raises(ImageReadError, match="bad.png"):
        small().fit(paths)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        det = small().fit(paths, on_error="skip")
    assert det.n_train_images_ == 3 and det.skipped_[0][0].endswith("bad.png")
    with pytest.warns(UserWarning, match="1 unreadable"):
        s = det.score_samples(paths, on_error="skip")
    assert np.isnan(s[1]) and np.isfinite(s[[0, 2, 3]]).all()


# ---------------------------------------------------------------- fit memory: feature storage


def test_defaults_store_float16_and_select_without_projection() -> None:
    det = PatchCore()
    assert det.feature_dtype == "float16" and det.projection_dim is None


def test_feature_store_keeps_the_requested_dtype_and_widens_on_overflow() -> None:
    from patchcore.core.embedding import FeatureStore

    store = FeatureStore(3, torch.float16)
    a = torch.randn(8, 5)
    store.add(a, 2)
    assert store.buffer is not None and store.buffer.dtype == torch.float16
    assert not store.overflow
    big = torch.full((4, 5), 70000.0)  # beyond float16's 65504
    store.add(big, 1)
    out = store.result()
    assert store.overflow and out.dtype == torch.float32 and out.shape == (12, 5)
    assert torch.equal(out[:8], a.half().float()) and torch.equal(out[8:], big)
    store32 = FeatureStore(1, torch.float32)
    store32.add(big, 1)
    assert store32.result().dtype == torch.float32 and not store32.overflow


def test_feature_store_float16_with_varying_sizes() -> None:
    from patchcore.core.embedding import FeatureStore

    store = FeatureStore(3, torch.float16)
    store.add(torch.ones(4, 2), 1)
    store.add(torch.ones(6, 2), 1)  # another image size: falls back to chunks
    store.add(torch.full((2, 2), 1e5), 1)  # and overflows
    out = store.result()
    assert out.dtype == torch.float32 and out.shape == (12, 2) and store.overflow


@pytest.mark.parametrize("feature_dtype", ["float16", "float32"])
def test_bank_is_float32_rows_of_the_stored_features(feature_dtype, toy_images) -> None:
    train, good, bad = toy_images
    det = small(feature_dtype=feature_dtype).fit(train)
    bank = det.memory_bank_
    assert bank.dtype == torch.float32
    if feature_dtype == "float16":
        assert torch.equal(bank.half().float(), bank)  # rows come from the float16 store
    s = det.score_samples(good + bad)
    assert s[4:].min() > s[:4].max()


def test_float16_storage_scores_close_to_float32(toy_images) -> None:
    train, good, bad = toy_images
    s16 = small(feature_dtype="float16").fit(train).score_samples(good + bad)
    s32 = small(feature_dtype="float32").fit(train).score_samples(good + bad)
    np.testing.assert_allclose(s16, s32, rtol=0.05)


def test_overflowing_features_fall_back_to_float32_with_a_warning(toy_images, monkeypatch) -> None:
    train, _, _ = toy_images
    det = small()
    real = PatchCore._embed_many

    def huge(self, groups):  # noqa: ANN001, ANN202
        return [e * 1e5 for e in real(self, groups)]

    monkeypatch.setattr(PatchCore, "_embed_many", huge)
    with pytest.warns(UserWarning, match="exceed float16's range"):
        det.fit(train[:2])
    assert torch.isfinite(det.memory_bank_).all() and det.memory_bank_.abs().max() > 65504


def test_feature_dtype_round_trips_and_older_files_read_as_float32(
    toy_images, tmp_path: Path
) -> None:
    train, good, _ = toy_images
    det = small(feature_dtype="float32").fit(train[:2])
    path = det.save(tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION
    assert "feature_dtype" not in raw["config"] and raw["state"]["feature_dtype"] == "float32"
    assert PatchCore.load(path).feature_dtype == "float32"
    assert PatchCore.load(small().fit(train[:2]).save(tmp_path / "h.pt")).feature_dtype == (
        "float16"
    )
    del raw["state"]["feature_dtype"]  # a file written before feature_dtype existed
    del raw["digest"]  # (and before the digest)
    torch.save(raw, tmp_path / "old.pt")
    old = PatchCore.load(tmp_path / "old.pt")
    assert old.feature_dtype == "float32"
    np.testing.assert_array_equal(old.score_samples(good), det.score_samples(good))


def test_bfloat16_backbone_is_opt_in_saved_and_close(
    fitted: PatchCore, toy_images, tmp_path: Path
) -> None:
    train, good, bad = toy_images
    assert fitted.backbone_dtype == "float32"
    assert "backbone_dtype" not in fitted.config()  # default: older readers can load the file
    det = small(backbone_dtype="bfloat16").fit(train)
    assert det.extractor_.dtype == torch.bfloat16 and det.memory_bank_.dtype == torch.float32
    s16, s32 = det.score_samples(good + bad), fitted.score_samples(good + bad)
    assert not np.array_equal(s16, s32)  # really a different precision...
    np.testing.assert_allclose(s16, s32, rtol=0.15)  # ...but close
    assert s16[len(good) :].min() > s16[: len(good)].max()  # same verdicts on the toy set
    path = det.save(tmp_path / "bf16.pt")
    assert torch.load(path, weights_only=True)["config"]["backbone_dtype"] == "bfloat16"
    loaded = PatchCore.load(path)
    assert loaded.backbone_dtype == "bfloat16" and loaded.extractor_.dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded.score_samples(good + bad), s16)


def test_backbone_dtype_is_validated(toy_images, tmp_path: Path) -> None:
    train, _, _ = toy_images
    with pytest.raises(ValueError, match="backbone_dtype must be .* got 'int8'"):
        small(backbone_dtype="int8").fit(train)


# ---------------------------------------------------------------- score() / iter_score()


def test_score_returns_scores_maps_and_skipped_records(fitted: PatchCore, toy_images) -> None:
    from patchcore.core.detector import ScoreResult
    from patchcore.core.inputs import Skipped

    _, good, bad = toy_images
    broken = np.zeros((3, 3), np.uint8)  # too small to be read
    images = [good[0], broken, bad[0]]
    r = fitted.score(images, on_error="skip")
    assert isinstance(r, ScoreResult) and r.maps is None
    assert r.scores.dtype == np.float64 and r.scores.shape == (3,) and np.isnan(r.scores[1])
    assert r.skipped == [Skipped(1, "image #1", r.skipped[0].reason)]
    assert "too small" in r.skipped[0].reason
    np.testing.assert_array_equal(r.scores[[0, 2]], fitted.score_samples([good[0], bad[0]]))
    with pytest.raises(ImageReadError, match="too small"):
        fitted.score(images)


def test_score_does_not_warn_but_the_older_methods_do(fitted: PatchCore, toy_images) -> None:
    import warnings

    images = [toy_images[1][0], np.zeros((3, 3), np.uint8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted.score(images, on_error="skip")
    with pytest.warns(UserWarning, match=r"1 unreadable image\(s\) scored as NaN: image #1"):
        fitted.score_samples(images, on_error="skip")


def test_map_sizes_processed_native_and_given(fitted: PatchCore) -> None:
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 255, (h, w), dtype=np.uint8) for h, w in [(50, 70), (200, 120)]]
    native = fitted.score(imgs, maps="native").maps
    assert [m.shape for m in native] == [(50, 70), (200, 120)]
    processed = fitted.score(imgs, maps="processed").maps
    assert [m.shape for m in processed] == [(96, 96), (96, 96)]
    given = fitted.score(imgs, maps=(30, 40)).maps
    assert [m.shape for m in given] == [(30, 40), (30, 40)]
    assert all(m.dtype == np.float32 for m in native + processed + given)
    # "native" is what anomaly_maps always gave
    for a, b in zip(native, fitted.anomaly_maps(imgs), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"maps must be None, 'processed', 'native' or \(h"):
        fitted.score(imgs, maps="full")


def test_iter_score_streams_in_input_order_with_errors(fitted: PatchCore, toy_images) -> None:
    _, good, bad = toy_images
    broken = np.zeros((3, 3), np.uint8)
    odd = np.asarray(good[1][:64, :80])  # another input size (resized to 96 x 96)
    images = [broken, good[0], odd, broken, bad[0], bad[1], broken]
    det = small(batch_size=2).fit(toy_images[0])
    stream = det.iter_score(images, maps="processed", on_error="skip")
    results = list(stream)
    assert [r.index for r in results] == list(range(len(images)))
    assert [r.error is not None for r in results] == [True, False, False, True, False, False, True]
    assert all(np.isnan(r.score) and r.map is None for r in results if r.error)
    assert all(r.map.shape == (96, 96) for r in results if not r.error)
    whole = det.score(images, maps="processed", on_error="skip")
    np.testing.assert_array_equal([r.score for r in results], whole.scores)
    assert [s.index for s in whole.skipped] == [0, 3, 6]


def test_iter_score_checks_before_iterating(toy_images) -> None:
    with pytest.raises(NotFittedError, match="before iter_score"):
        small().iter_score(toy_images[1])


# ---------------------------------------------------------------- eq. 7 against a naive reference


def _naive_eq7_score(det: PatchCore, image: np.ndarray, k: int) -> float:
    """The paper's eq. 7 written out with brute-force float64 distances (no index, no batching).

    s* = max over test patches of the distance to the nearest bank row; m_test = that patch,
    m* = its nearest bank row, N_k(m*) = the k bank rows nearest m* (m* included);
    score = (1 - exp|m_test - m*| / sum over m in N_k(m*) of exp|m_test - m|) * s*.
    """
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    emb = det._embed(pixels)[0]  # (D, h, w)
    patches = emb.flatten(1).T.double()  # (h*w, D)
    bank = det.memory_bank_.double()
    dist = torch.cdist(patches, bank)  # (h*w, M)
    nearest, star = dist.min(1)
    worst = int(nearest.argmax())
    s_star = float(nearest[worst])
    m_star = int(star[worst])
    support = torch.cdist(bank[m_star][None], bank)[0].argsort()[:k]  # N_k(m*), m* first
    d = dist[worst, support]
    assert int(support[0]) == m_star
    weight = 1.0 - float(torch.exp(d[0]) / torch.exp(d).sum())
    return weight * s_star


@pytest.mark.parametrize("k", [2, 3, 9])
def test_reweighted_score_equals_a_naive_eq7(toy_images, k: int) -> None:
    train, good, bad = toy_images
    det = small(num_neighbors=k, top_k=1, coreset_ratio=0.05).fit(train[:3])  # 22 bank rows
    assert det.memory_bank_.shape[0] == 22
    got = det.score_samples(good[:2] + bad[:2])
    want = [_naive_eq7_score(det, img, k) for img in good[:2] + bad[:2]]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    plain = small(num_neighbors=1, top_k=1, coreset_ratio=0.05).fit(train[:3])
    plain = plain.score_samples(good[:2])
    assert (got[:2] < plain).all()  # the weight is < 1: reweighting lowers the max score


def test_reweighting_reads_the_bank_the_index_holds(det: PatchCore, toy_images) -> None:
    """Scoring no longer copies ``memory_bank_`` to the search device per batch."""
    det.set_params(top_k=1)  # eq. 7 reads the bank rows of each worst patch's neighbours
    images = toy_images[1] + toy_images[2]
    want = det.score_samples(images)
    assert det._index.bank.data_ptr() == det._bank.data_ptr() and det._bank.device == det.device_
    det.state_.memory_bank = torch.empty(det.memory_bank_.shape, device="meta")  # unreadable
    np.testing.assert_array_equal(det.score_samples(images), want)


# ---------------------------------------------------------------- parameters


def test_params_come_from_the_signature() -> None:
    import inspect

    names = [p for p in inspect.signature(PatchCore).parameters]
    det = small(seed=3)
    assert list(det.get_params()) == names
    assert det.get_params()["seed"] == 3 and det.get_params()["image_size"] == 96
    assert PatchCore(**det.get_params()).get_params() == det.get_params()  # clone
    assert det.set_params(seed=5, batch_size=2) is det and det.seed == 5 and det.batch_size == 2
    with pytest.raises(ValueError, match="invalid parameter 'colour' for PatchCore; valid"):
        det.set_params(colour="red")
    assert repr(PatchCore()) == "PatchCore()"
    assert repr(det) == (
        "PatchCore(image_size=96, coreset_ratio=0.25, num_neighbors=3, batch_size=2, seed=5, "
        "progress=False)"
    )


def test_per_call_progress_leaves_the_parameter_alone(toy_images, capsys) -> None:
    train, good, _ = toy_images
    det = small(progress=True).fit(train[:2], progress=False)
    det.score(good, progress=False)
    det.score_samples(good, progress=False)
    assert det.progress is True and capsys.readouterr().err == ""


def test_fit_and_load_record_fit_time_facts_in_the_state(toy_images, tmp_path: Path) -> None:
    from patchcore.core.state import FittedState

    train, _, _ = toy_images
    det = small(feature_dtype="float32").fit(train[:2])
    assert isinstance(det.state_, FittedState) and det.feature_dtype_ == "float32"
    assert det.n_train_images_ == det.state_.n_train_images == 2 and det.skipped_ == []
    loaded = PatchCore.load(det.save(tmp_path / "m.pt"))
    # built with the parameters it was fitted with (layers resolved), not patched after
    assert loaded.get_params() == {**det.get_params(), "layers": ["stage3", "stage5"]}
    assert loaded.card() == det.card() and loaded.state_.layers == det.state_.layers


# ---------------------------------------------------------------- model files


def test_a_file_in_the_58cd285_layout_loads(fitted: PatchCore, toy_images, tmp_path: Path) -> None:
    """The payload exactly as ``PatchCore.save`` wrote it at commit 58cd285, built by hand."""
    _, good, bad = toy_images
    old = {
        "format": "patchcore",
        "format_version": 1,
        "config": {
            "backbone": fitted.backbone,  # the default backbone then was lite0; any one works
            "layers": list(fitted.layers_),
            "weights": "imagenet",
            "image_size": 96,
            "scale": None,
            "coreset_ratio": 0.25,
            "sampling": "greedy",
            "projection_dim": None,
            "num_neighbors": 3,
            "embed_dim": None,
            "kernel_size": 3,
            "sigma": 4.0,
            "batch_size": 8,
            "device": "auto",
            "seed": 0,
            "progress": False,
            "mean": list(fitted.extractor_.mean),
            "std": list(fitted.extractor_.std),
        },
        "memory_bank": fitted.memory_bank_.clone(),
        "backbone_state": {k: v.clone() for k, v in fitted.extractor_.state_dict().items()},
        "state": {
            "threshold": 2.5,
            "threshold_method": "max_f1",
            "n_train_images": 6,
            "n_train_patches": 864,
            "feature_seconds": 1.0,
            "coreset_seconds": 2.0,
            "fit_seconds": 3.0,
            "feature_dtype": "float16",
            "metadata": {"fit_data": "toy"},
        },
    }
    torch.save(old, tmp_path / "old.pt")
    det = PatchCore.load(tmp_path / "old.pt")
    assert det.threshold_ == 2.5 and det.threshold_method_ == "max_f1"
    assert det.n_train_images_ == 6 and det.n_train_patches_ == 864 and det.fit_seconds_ == 3.0
    assert det.metadata_ == {"fit_data": "toy"} and det.feature_dtype_ == "float16"
    # a file from before top_k scores as it did then: the largest patch, reweighted by eq. 7
    paper = copy.deepcopy(fitted).set_params(top_k=1)
    assert det.top_k == 1 and fitted.top_k == 10  # not today's default
    assert det.get_params() == {**paper.get_params(), "layers": list(fitted.layers_)}
    np.testing.assert_array_equal(det.score_samples(good + bad), paper.score_samples(good + bad))
    # and what we write now has the same layout, key for key
    new = torch.load(det.save(tmp_path / "new.pt"), weights_only=True)
    assert list(new) == [*old, "digest"] and new["config"] == old["config"]
    # plus the optional entries that came later (older readers ignore them)
    assert [k for k in new["state"] if k not in ("calibration", "normalization")] == list(
        old["state"]
    )
    assert new["state"]["normalization"] == fit_normalization(None, 2.5)  # derived on load


def test_save_is_atomic_and_cleans_up_on_interrupt(
    det: PatchCore, tmp_path: Path, monkeypatch
) -> None:
    from patchcore.core import persistence

    path = det.save(tmp_path / "m.pt")
    before = path.read_bytes()
    real_save = torch.save

    def interrupted(obj, f, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(persistence.torch, "save", interrupted)
    det.set_threshold(9.0)
    with pytest.raises(KeyboardInterrupt):
        det.save(path)
    assert path.read_bytes() == before  # the old file is untouched...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # ...and no temp file is left
    monkeypatch.setattr(persistence.torch, "save", real_save)
    assert PatchCore.load(det.save(path)).threshold_ == 9.0


def test_missing_real_data_fails_in_ci_and_skips_elsewhere(monkeypatch) -> None:
    import conftest

    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="no-such-set missing .CI is set"):
        conftest.data_set("no-such-set")
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="no-such-set not present"):
        conftest.data_set("no-such-set")


def test_reference_scores_are_the_float32_search_s_and_leave_the_model_as_it_was() -> None:
    """``reference_scores`` (what an export is checked against) gives the scores and processed
    maps of a float32 search, whatever the model's own precision, and restores its index."""
    g = torch.Generator().manual_seed(0)
    train = [torch.rand(3, 64, 64, generator=g) for _ in range(4)]
    test = torch.stack([torch.rand(3, 64, 64, generator=g) for _ in range(3)])
    det = PatchCore(weights=None, search_precision="bfloat16", progress=False).fit(train)
    index = det._index
    scores, maps = det.reference_scores(test)
    assert det._index is index and scores.shape == (3,) and maps.shape == (3, 64, 64)
    f32 = copy.deepcopy(det).set_params(search_precision="float32")
    want = f32.score(list(test), maps="processed")
    np.testing.assert_array_equal(scores, want.scores)
    np.testing.assert_array_equal(maps, np.stack(want.maps))


def test_training_images_of_mixed_sizes_give_the_features_they_give_alone(canvases) -> None:
    """Fitting at native size on images of mixed sizes runs them on shared canvases
    (``FusedPlan.forward_many``): each image's training features are its own."""
    rng = np.random.default_rng(5)
    sizes = [(40, 56), (48, 40), (44, 52), (64, 64), (40, 56), (37, 61)]
    images = [rng.integers(0, 255, (*s, 3), dtype=np.uint8) for s in sizes]
    det = PatchCore(weights=None, batch_size=4, progress=False)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        together = det.extract_features(images)
    assert canvases and max(c[0] for c in canvases) > 1  # several images in one pass
    each = [det.extract_features([im]) for im in images]
    assert together.grids == [e.grids[0] for e in each]
    alone = [e.features.float() for e in each]
    torch.testing.assert_close(together.features.float(), torch.cat(alone), rtol=2e-3, atol=1e-4)

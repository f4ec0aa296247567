"""Tests for patchcore.core.datasets: loaders on real and fake trees, splits, readability checks."""

from __future__ import annotations

import importlib.util
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_data
from PIL import Image

from patchcore.core.datasets import (
    ImageDataset,
    Sample,
    check_readable,
    concat,
    elpv_benchmark_split,
    load_elpv,
    load_folder,
    load_mask,
    load_visa,
    normal_train_split,
    sample_fraction,
    split_each_label,
)
from patchcore.core.images import ImageReadError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data


def _png(path: Path, value: int = 128, size: tuple[int, int] = (16, 16), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(size if mode == "L" else (*size, 3), value, dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros(size, dtype=np.uint8)
    arr[4:8, 2:6] = 255
    Image.fromarray(arr).save(path)
    return path


def _truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def _toy(n_good: int = 20, defects: dict[str, int] | None = None) -> ImageDataset:
    defects = {"crack": 10, "hole": 7, "scratch": 3} if defects is None else defects
    samples = [Sample(Path(f"good/{i}.png")) for i in range(n_good)]
    for t, n in defects.items():
        samples += [Sample(Path(f"{t}/{i}.png"), 1, t) for i in range(n)]
    return ImageDataset(samples, source="toy")


# --- Sample / ImageDataset ------------------------------------------------------------------


def test_sample_validation_and_defaults():
    s = Sample("a/b.png")
    assert s.image == Path("a/b.png") and s.label == 0 and s.defect_type == "good"
    assert s.name == "a/b.png" and s.mask is None and not s.is_anomalous
    with pytest.raises(ValueError, match="label must be 0"):
        Sample("a.png", 2, "x")
    with pytest.raises(ValueError, match="normal sample has defect_type 'good', got 'crack'"):
        Sample("a.png", 0, "crack")
    with pytest.raises(ValueError, match="other than 'good'"):
        Sample("a.png", 1, "good")
    with pytest.raises(ValueError, match="needs a name"):
        Sample(np.zeros((8, 8), np.uint8))
    with pytest.raises(TypeError, match="path or a numpy array"):
        Sample(3.0)
    with pytest.raises(AttributeError):
        s.label = 1  # frozen


def test_dataset_columns_subset_and_repr():
    ds = _toy()
    assert len(ds) == 40
    assert ds.labels.dtype == np.int64 and ds.labels.sum() == 20
    assert not ds.labels.flags.writeable
    assert ds.counts() == {"good": 20, "crack": 10, "hole": 7, "scratch": 3}
    assert ds.names[0] == "good/0.png" and ds.images[0] == Path("good/0.png")
    assert ds.defect_types[-1] == "scratch" and ds.masks == [None] * 40
    assert ds[0].name == "good/0.png" and ds[np.int64(-1)].name == "scratch/2.png"
    assert isinstance(ds[2:5], ImageDataset) and ds[2:5].names == [
        "good/2.png",
        "good/3.png",
        "good/4.png",
    ]
    sub = ds.subset([3, 1])
    assert sub.names == ["good/3.png", "good/1.png"]
    assert ds.subset(ds.labels == 1).counts() == {"crack": 10, "hole": 7, "scratch": 3}
    assert len(ds.subset([])) == 0
    with pytest.raises(IndexError):
        ds.subset([40])
    with pytest.raises(ValueError, match="boolean mask of shape"):
        ds.subset(np.ones(3, bool))
    r = repr(ds)
    assert "40 images: 20 normal, 20 anomalous" in r
    assert "crack 10, hole 7, scratch 3" in r and "toy" in r
    assert "0 anomalous" in repr(ImageDataset([Sample("x.png")]))


def test_dataset_rejects_duplicate_names_and_concat():
    a = ImageDataset([Sample("x.png"), Sample("y.png")], source="a")
    b = ImageDataset([Sample("z.png", 1, "dent")], source="b")
    both = concat(a, b)
    assert both.names == ["x.png", "y.png", "z.png"] and both.source == "a + b"
    assert (a + b).names == both.names
    with pytest.raises(ValueError, match="unique; repeated: x.png"):
        concat(a, a)


def test_load_mask_variants(tmp_path):
    img = _png(tmp_path / "img.png", size=(16, 20))
    normal = Sample(img)
    m = load_mask(normal)
    assert m.dtype == bool and m.shape == (16, 20) and not m.any()
    assert load_mask(normal, (5, 6)).shape == (5, 6)
    assert load_mask(Sample(img, 1, "dent")) is None
    mp = _mask(tmp_path / "m.png", size=(16, 20))
    m = load_mask(Sample(img, 1, "dent", mp))
    assert m.shape == (16, 20) and m.sum() == 16 and m[4:8, 2:6].all()
    small = load_mask(Sample(img, 1, "dent", mp), (8, 10))
    assert small.shape == (8, 10) and small[2:4, 1:3].all() and small.sum() == 4
    ones = np.zeros((4, 4), np.uint8)
    ones[0, 0] = 1  # a 0/1 mask is read as binary too
    assert load_mask(Sample(img, 1, "dent", ones)).sum() == 1


# --- folder layout: real data -------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    ("name", "split", "expected"),
    [
        ("deeppcb", "train", {"good": 400}),
        ("deeppcb", "test", {"good": 150, "defect": 150}),
        (
            "magnetic_tile",
            "test",
            {"good": 191, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103},
        ),
        ("casting", "train", {"good": 600}),
        ("casting", "test", {"good": 198, "defective": 200}),
    ],
)
def test_real_folder_counts(name, split, expected):
    ds = load_folder(DATA / name, split)
    assert ds.counts() == expected
    assert (ds.labels == 1).sum() == sum(v for k, v in expected.items() if k != "good")
    assert all(n.startswith(f"{split}/") for n in ds.names)
    assert all(isinstance(p, Path) and p.is_file() for p in ds.images[:: max(1, len(ds) // 20)])


@needs_data
@pytest.mark.parametrize("name", ["deeppcb", "magnetic_tile"])
def test_real_masks_found_for_every_defect(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing mask would warn
        ds = load_folder(DATA / name, "test")
    for s in ds:
        if s.label == 1:
            assert isinstance(s.mask, Path) and s.mask.is_file(), s.name
            assert s.mask.parent.name == s.defect_type
            assert s.mask.name == f"{s.image.stem}_mask.png"
        else:
            assert s.mask is None


@needs_data
def test_real_casting_has_no_masks_and_real_mask_loads():
    casting = load_folder(DATA / "casting", "test")
    assert all(m is None for m in casting.masks)
    pcb = load_folder(DATA / "deeppcb", "test")
    s = next(s for s in pcb if s.label == 1)
    m = load_mask(s)
    with Image.open(s.image) as im:
        assert m.shape == (im.height, im.width)
    assert m.dtype == bool and 0 < m.mean() < 0.5


# --- folder layout: synthetic -------------------------------------------------------------


def test_folder_labels_masks_and_names(tmp_path):
    for i in range(3):
        _png(tmp_path / "test" / "OK" / f"n{i}.png")
    _png(tmp_path / "test" / "dent" / "a.png")
    _png(tmp_path / "test" / "dent" / "b.jpg", mode="RGB")
    _png(tmp_path / "test" / "Scratch" / "c.bmp")
    _mask(tmp_path / "ground_truth" / "dent" / "a_mask.png")
    _mask(tmp_path / "ground_truth" / "dent" / "a.png")  # _mask preferred over plain stem
    _mask(tmp_path / "ground_truth" / "dent" / "b.bmp")  # plain stem, other suffix
    _mask(tmp_path / "ground_truth" / "Scratch" / "c_mask.tif")
    (tmp_path / "test" / "dent" / "notes.txt").write_text("not an image")
    ds = load_folder(tmp_path, "test")
    assert ds.counts() == {"good": 3, "Scratch": 1, "dent": 2}
    assert ds.names[:3] == ["test/OK/n0.png", "test/OK/n1.png", "test/OK/n2.png"]
    masks = {s.name: s.mask for s in ds}
    assert masks["test/dent/a.png"].name == "a_mask.png"
    assert masks["test/dent/b.jpg"].name == "b.bmp"
    assert masks["test/Scratch/c.bmp"].name == "c_mask.tif"
    assert masks["test/OK/n0.png"] is None
    assert ds.source.endswith("/test")


def test_folder_warns_about_partly_missing_masks(tmp_path):
    _png(tmp_path / "test" / "good" / "n.png")
    _png(tmp_path / "test" / "dent" / "a.png")
    _png(tmp_path / "test" / "dent" / "b.png")
    _mask(tmp_path / "ground_truth" / "dent" / "a_mask.png")
    with pytest.warns(UserWarning, match=r"no mask for 1 of 2 images \(b.png\)"):
        ds = load_folder(tmp_path, "test")
    assert [m is None for m in ds.masks] == [True, False, True]


def test_folder_split_none_and_plain_folder(tmp_path):
    _png(tmp_path / "labelled" / "normal" / "x.png")
    _png(tmp_path / "labelled" / "burr" / "y.png")
    _mask(tmp_path / "labelled" / "ground_truth" / "burr" / "y_mask.png")
    ds = load_folder(tmp_path / "labelled", None)
    assert ds.counts() == {"good": 1, "burr": 1}  # ground_truth is not a label
    assert ds.names == ["normal/x.png", "burr/y.png"] and ds[1].mask.name == "y_mask.png"
    _png(tmp_path / "plain" / "b.png")
    _png(tmp_path / "plain" / "a.jpg", mode="RGB")
    plain = load_folder(tmp_path / "plain", None)
    assert plain.names == ["a.jpg", "b.png"] and plain.labels.tolist() == [0, 0]
    train_plain = load_folder(tmp_path, "plain")  # root/<split> holding images only
    assert train_plain.names == ["plain/a.jpg", "plain/b.png"]


def test_folder_custom_normal_names(tmp_path):
    _png(tmp_path / "test" / "pass" / "x.png")
    _png(tmp_path / "test" / "good" / "y.png")
    _png(tmp_path / "test" / "ok" / "z.png")
    ds = load_folder(tmp_path, "test", normal_names=("good", "PASS"))
    assert dict(zip(ds.names, ds.defect_types, strict=True)) == {
        "test/good/y.png": "good",
        "test/pass/x.png": "good",
        "test/ok/z.png": "ok",  # no longer a normal name: a defect type
    }
    with pytest.raises(ValueError, match="must include 'good'"):
        load_folder(tmp_path, "test", normal_names=("pass",))


def test_folder_errors(tmp_path):
    _png(tmp_path / "set" / "train" / "good" / "x.png")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope")) + ".*holds: set"):
        load_folder(tmp_path / "nope", "test")
    with pytest.raises(FileNotFoundError, match=r"set/test: no such split 'test'.*holds: train"):
        load_folder(tmp_path / "set", "test")
    with pytest.raises(ValueError, match="pass split='train' or split='test'"):
        load_folder(tmp_path / "set", None)
    (tmp_path / "set" / "test" / "good").mkdir(parents=True)
    (tmp_path / "set" / "test" / "good" / "readme.txt").write_text("x")
    with (
        pytest.warns(UserWarning, match="label folder without images"),
        pytest.raises(ValueError, match=r"set/test: no images found.*holds good"),
    ):
        load_folder(tmp_path / "set", "test")
    _png(tmp_path / "set" / "train" / "loose.png")
    with pytest.raises(ValueError, match="both image files .*loose.png.* and label folders"):
        load_folder(tmp_path / "set", "train")
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip', got 'ignore'"):
        load_folder(tmp_path / "set", "test", on_error="ignore")


# --- readability ----------------------------------------------------------------------------


def test_corrupt_image_raises_naming_the_file(tmp_path):
    _png(tmp_path / "test" / "good" / "a.png")
    bad = _truncated_png(tmp_path / "test" / "good" / "b.png")
    _png(tmp_path / "test" / "good" / "c.png")
    ds = load_folder(tmp_path, "test")  # lazy: not opened yet
    assert len(ds) == 3
    with pytest.raises(ImageReadError, match=re.escape(str(bad))) as info:
        check_readable(ds)
    assert info.value.path == str(bad)
    with pytest.raises(ImageReadError, match="b.png"):
        load_folder(tmp_path, "test", on_error="raise")


def test_corrupt_image_skipped_and_reported(tmp_path):
    _png(tmp_path / "test" / "good" / "a.png")
    _truncated_png(tmp_path / "test" / "good" / "b.png")
    (tmp_path / "test" / "dent").mkdir()
    (tmp_path / "test" / "dent" / "c.png").write_bytes(b"not a png at all")
    _mask(tmp_path / "ground_truth" / "dent" / "c_mask.png")
    _png(tmp_path / "test" / "dent" / "d.png")
    _truncated_png(tmp_path / "ground_truth" / "dent" / "d_mask.png")  # a broken mask
    ds = load_folder(tmp_path, "test")
    with pytest.warns(UserWarning, match="skipped 3 of 4 images"):
        good, report = check_readable(ds, on_error="skip")
    assert good.names == ["test/good/a.png"]
    reasons = dict(report)
    assert set(reasons) == {"test/good/b.png", "test/dent/c.png", "test/dent/d.png"}
    assert "truncated" in reasons["test/good/b.png"]
    assert "not an image file" in reasons["test/dent/c.png"]
    assert "d_mask.png" in reasons["test/dent/d.png"]
    with pytest.warns(UserWarning, match="skipped 3 of 4"):
        assert len(load_folder(tmp_path, "test", on_error="skip")) == 1
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        check_readable(ds, on_error=None)


@needs_data
def test_check_readable_on_a_few_real_images():
    ds = load_folder(DATA / "magnetic_tile", "test")
    few = ds.subset([0, len(ds) - 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok, report = check_readable(few, on_error="skip")
    assert report == [] and ok.names == few.names


# --- splits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.8, 1.0])
def test_split_each_label_is_stratified_disjoint_and_covering(fraction):
    ds = _toy()
    a, b = split_each_label(ds, fraction, seed=3)
    assert set(a.names).isdisjoint(b.names)
    assert sorted(a.names + b.names) == sorted(ds.names)
    for t, n in ds.counts().items():
        assert a.counts().get(t, 0) == int(np.floor(fraction * n + 0.5)), t
    # original order kept within each part
    pos = {n: i for i, n in enumerate(ds.names)}
    assert [pos[n] for n in a.names] == sorted(pos[n] for n in a.names)
    if fraction == 1.0:
        assert len(b) == 0


def test_split_each_label_is_seeded():
    ds = _toy(100, {"crack": 60, "hole": 40})
    a1, _ = split_each_label(ds, 0.5, seed=7)
    a2, _ = split_each_label(ds, 0.5, seed=7)
    a3, _ = split_each_label(ds, 0.5, seed=8)
    assert a1.names == a2.names
    assert a1.names != a3.names


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "half"])
def test_fractions_outside_range_are_rejected(bad):
    ds = _toy()
    with pytest.raises(ValueError, match=re.escape(f"fraction must be in (0, 1], got {bad!r}")):
        split_each_label(ds, bad)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        sample_fraction(ds, bad)


def test_sample_fraction():
    ds = _toy()
    s = sample_fraction(ds, 0.25, seed=1)
    assert len(s) == 10 and set(s.names) <= set(ds.names)
    assert s.names == sample_fraction(ds, 0.25, seed=1).names
    assert s.names != sample_fraction(ds, 0.25, seed=2).names
    assert len(sample_fraction(ds, 0.001)) == 1  # at least one
    assert sample_fraction(ds, 1.0).names == ds.names
    with pytest.raises(ValueError, match="empty"):
        sample_fraction(ImageDataset(), 0.5)


def test_normal_train_split():
    ds = _toy(20)
    train, test = normal_train_split(ds, 0.6, seed=0)
    assert len(train) == 12 and set(train.labels) == {0}
    assert test.counts() == {"good": 8, "crack": 10, "hole": 7, "scratch": 3}
    assert set(train.names).isdisjoint(test.names)
    assert sorted(train.names + test.names) == sorted(ds.names)
    with pytest.raises(ValueError, match="no normal samples"):
        normal_train_split(ds.subset(ds.labels == 1))


# --- ELPV -------------------------------------------------------------------------------------


def _elpv_csv_rows() -> list[tuple[str, float, str]]:
    spec = importlib.util.find_spec("elpv_dataset")
    csv = Path(spec.origin).parent / "data" / "labels.csv"
    rows = []
    for line in csv.read_text().splitlines():
        path, prob, kind = line.split()
        rows.append((path, float(prob), kind))
    return rows


needs_elpv = pytest.mark.skipif(
    importlib.util.find_spec("elpv_dataset") is None, reason="elpv-dataset not installed"
)


@needs_elpv
@pytest.mark.parametrize("cell_type", ["mono", "poly", "all"])
def test_elpv_counts_match_the_csv(cell_type):
    rows = [r for r in _elpv_csv_rows() if cell_type == "all" or r[2] == cell_type]
    n_normal = sum(1 for _, p, _ in rows if p == 0.0)
    n_anom = sum(1 for _, p, _ in rows if p == 1.0)
    ds = load_elpv(cell_type=cell_type)
    assert ds.counts() == {"good": n_normal, "defective": n_anom}
    assert len(ds) < len(rows)  # uncertain cells left out
    assert all(m is None for m in ds.masks)
    assert ds.images[0].is_file() and ds.names[0].startswith("images/cell")


@needs_elpv
def test_elpv_thresholds_and_errors():
    rows = _elpv_csv_rows()
    ds = load_elpv(normal_max_prob=0.34, anomalous_min_prob=0.6)
    assert len(ds) == len(rows)  # every cell falls on one side
    assert ds.counts()["good"] == sum(1 for _, p, _ in rows if p < 0.5)
    with pytest.raises(ValueError, match="normal_max_prob=0.5, anomalous_min_prob=0.5"):
        load_elpv(normal_max_prob=0.5, anomalous_min_prob=0.5)
    with pytest.raises(ValueError, match="cell_type must be .* got 'thin'"):
        load_elpv(cell_type="thin")


@needs_elpv
def test_elpv_benchmark_split():
    train, test = elpv_benchmark_split(train_fraction=0.5, seed=0, cell_type="mono")
    full = load_elpv(cell_type="mono")
    n_normal = full.counts()["good"]
    assert len(train) == int(np.floor(0.5 * n_normal + 0.5)) and set(train.labels) == {0}
    assert test.counts()["defective"] == full.counts()["defective"]
    assert len(train) + len(test) == len(full)
    assert set(train.names).isdisjoint(test.names)
    again, _ = elpv_benchmark_split(train_fraction=0.5, seed=0, cell_type="mono")
    assert again.names == train.names
    # one decoded cell: 300x300 grey, as documented
    with Image.open(train.images[0]) as im:
        assert im.size == (300, 300)


# --- VisA -------------------------------------------------------------------------------------


def _fake_visa_raw(root: Path) -> None:
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        base = root / obj / "Data"
        for i in range(4):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _png(root / rel, mode="RGB")  # PNG bytes under a .JPG name: PIL sniffs the format
            rows.append(f"{obj},{'train' if i < 3 else 'test'},normal,{rel},")
        for i in range(2):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _png(root / rel, mode="RGB")
            _mask(root / mrel)
            rows.append(f"{obj},test,anomaly,{rel},{mrel}")
        assert base.is_dir()
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")


def test_visa_raw_with_split_csv(tmp_path):
    _fake_visa_raw(tmp_path)
    train = load_visa(tmp_path, "candle", "train")
    assert train.counts() == {"good": 3}
    assert train.names[0] == "candle/Data/Images/Normal/0000.JPG"
    test = load_visa(tmp_path, "candle", "test")
    assert test.counts() == {"good": 1, "bad": 2}
    anom = [s for s in test if s.label == 1]
    assert [s.mask.name for s in anom] == ["000.png", "001.png"]
    assert load_mask(anom[0]).sum() == 16
    assert len(load_visa(tmp_path, "pcb1", None)) == 6
    # the csv given explicitly, as a file or as its folder
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "split_csv" / "1cls.csv").rename(moved / "1cls.csv")
    assert load_visa(tmp_path, "candle", "test", split_csv=moved).names == test.names
    assert load_visa(tmp_path, "candle", "test", split_csv=moved / "1cls.csv").names == test.names
    with pytest.raises(FileNotFoundError, match="pass split_csv=PATH"):
        load_visa(tmp_path, "candle", "test")
    # without csv, split=None reads the Normal / Anomaly folders
    everything = load_visa(tmp_path, "candle", None)
    assert everything.counts() == {"good": 4, "bad": 2}
    assert everything[-1].mask.name == "001.png"


def test_visa_raw_errors(tmp_path):
    _fake_visa_raw(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such VisA object 'fryum'.*candle, pcb1"):
        load_visa(tmp_path, "fryum", "test")
    _png(tmp_path / "fryum" / "Data" / "Images" / "Normal" / "0.JPG")
    with pytest.raises(
        ValueError, match=r"no rows for object 'fryum'; it lists \['candle', 'pcb1'\]"
    ):
        load_visa(tmp_path, "fryum", "test")
    with pytest.raises(ValueError, match=r"split 'val' \(\['test', 'train'\]\)"):
        load_visa(tmp_path, "candle", "val")
    (tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "001.JPG").unlink()
    with pytest.raises(FileNotFoundError, match="1 listed files do not exist.*001.JPG"):
        load_visa(tmp_path, "candle", "test")
    with pytest.warns(UserWarning, match="rows were skipped"):
        ds = load_visa(tmp_path, "candle", "test", on_error="skip")
    assert ds.counts() == {"good": 1, "bad": 1}


def test_visa_converted_layout(tmp_path):
    obj = tmp_path / "candle"
    for i in range(3):
        _png(obj / "train" / "good" / f"{i:03d}.JPG", mode="RGB")
    _png(obj / "test" / "good" / "100.JPG", mode="RGB")
    for i in range(2):
        _png(obj / "test" / "bad" / f"{i:03d}.JPG", mode="RGB")
        _mask(obj / "ground_truth" / "bad" / f"{i:03d}.png")
    assert load_visa(tmp_path, "candle", "train").counts() == {"good": 3}
    test = load_visa(tmp_path, "candle", "test")
    assert test.counts() == {"good": 1, "bad": 2}
    assert test.names == ["test/good/100.JPG", "test/bad/000.JPG", "test/bad/001.JPG"]
    assert [m.name for m in test.masks[1:]] == ["000.png", "001.png"]


def test_a_flat_test_folder_is_refused_with_a_pointer_to_label_folders(tmp_path: Path) -> None:
    from patchcore.core.datasets import load_folder

    for split in ("train/good", "test"):
        (tmp_path / split).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (16, 16)).save(tmp_path / split / f"{i}.png")
    with pytest.raises(ValueError, match=r"no label folders.*test/<label>/.*test/good/"):
        load_folder(tmp_path, "test")
    assert len(load_folder(tmp_path, "train")) == 2
    assert len(load_folder(tmp_path / "test", None)) == 2  # a plain folder: all normal

"""Data sets: the digits split, IDX and npz loading, and one clear error per malformed file."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from training.data import (
    FASHION_LABELS,
    PACKAGED_DATASETS,
    DataError,
    DatasetNotInstalledError,
    PackagedDataset,
    load_dataset,
    read_idx,
)


# --- digits --------------------------------------------------------------------------------------
def test_digits_split_is_stratified_disjoint_and_complete():
    data = load_dataset("digits", val_fraction=0.15, test_fraction=0.2, seed=0)
    assert data.input_shape == (1, 8, 8)
    assert data.labels == tuple("0123456789")
    assert (len(data.train), len(data.val), len(data.test)) == (1167, 270, 360)
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == np.float32 and split.y.dtype == np.int64
        assert split.x.shape[1:] == (1, 8, 8)
    # Stratified: each class's share of the test split matches its share of the whole set.
    whole = np.concatenate([data.train.y, data.val.y, data.test.y])
    expected = np.bincount(whole) * 0.2
    assert np.all(np.abs(np.bincount(data.test.y) - expected) <= 1)
    # Disjoint and complete: every one of the 1,797 scans lands in exactly one split.
    rows = np.concatenate([data.train.x, data.val.x, data.test.x]).reshape(1797, 64)
    from sklearn.datasets import load_digits

    reference = load_digits().data.astype(np.float32)
    assert sorted(map(bytes, rows)) == sorted(map(bytes, reference))


def test_digits_are_raw_integer_pixels_with_matching_input_spec():
    data = load_dataset("digits")
    x = data.train.x
    assert x.min() == 0 and x.max() == 16 and np.all(x == np.round(x))  # not normalized
    spec = data.input_spec
    assert spec.shape == (1, 8, 8)
    assert spec.value_range == (0.0, 16.0) and spec.integer_valued


def test_digits_split_depends_on_seed_only():
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    assert np.array_equal(a.test.x, b.test.x) and np.array_equal(a.train.y, b.train.y)
    assert not np.array_equal(a.test.x, c.test.x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.0}, "val_fraction must lie strictly between 0 and 1"),
        ({"test_fraction": 1.0}, "test_fraction must lie strictly between 0 and 1"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "expected < 1"),
    ],
)
def test_bad_fractions_are_named(kwargs, message):
    with pytest.raises(DataError, match=message):
        load_dataset("digits", **kwargs)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(DataError, match="unknown data set 'cifar'.*digits, mnist, fashion, npz"):
        load_dataset("cifar")


@pytest.mark.parametrize("name", ["mnist", "npz"])
def test_file_datasets_need_a_data_dir(name):
    with pytest.raises(DataError, match="needs --data-dir.*nothing is downloaded"):
        load_dataset(name)


@pytest.fixture
def packaged_fashion(tmp_path, monkeypatch):
    """Point the fashion package's directory at ``tmp_path / "fashion-mnist"`` (not created)."""
    directory = tmp_path / "fashion-mnist"
    monkeypatch.setitem(
        PACKAGED_DATASETS, "fashion", PackagedDataset(directory, "dataset-fashion-mnist")
    )
    return directory


def test_fashion_without_data_dir_reads_the_package_directory(packaged_fashion):
    arrays = write_idx_set(packaged_fashion, compress=True)
    data = load_dataset("fashion", val_fraction=0.25)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 20)
    assert np.array_equal(data.test.x[:, 0], arrays["t10k"][0].astype(np.float32))
    assert data.labels == FASHION_LABELS


def test_fashion_without_package_says_how_to_install_it(packaged_fashion):
    with pytest.raises(DatasetNotInstalledError) as caught:
        load_dataset("fashion")
    message = str(caught.value)
    assert str(packaged_fashion) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir DIR" in message


def test_an_explicit_data_dir_wins_over_the_package(packaged_fashion, tmp_path):
    write_idx_set(packaged_fashion, n_test=20)
    write_idx_set(tmp_path / "mine", n_test=30)
    assert len(load_dataset("fashion", tmp_path / "mine").test) == 30


@pytest.mark.skipif(
    not PACKAGED_DATASETS["fashion"].directory.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)
def test_the_installed_fashion_package_holds_the_standard_test_split():
    root = PACKAGED_DATASETS["fashion"].directory
    images = read_idx(root / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(np.bincount(labels), [1000] * 10)  # 1,000 test images per class


# --- IDX -----------------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1" if type_code == 0x08 else array.dtype).tobytes()


def write_idx_set(root: Path, n_train: int = 40, n_test: int = 20, *, compress: bool = False):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 6, 5)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if compress:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_from_idx_files(tmp_path, compress):
    arrays = write_idx_set(tmp_path, compress=compress)
    data = load_dataset("mnist", tmp_path, val_fraction=0.25)
    assert data.input_shape == (1, 6, 5)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 20)
    test_images, test_labels = arrays["t10k"]
    assert np.array_equal(data.test.x[:, 0], test_images.astype(np.float32))
    assert np.array_equal(data.test.y, test_labels)
    assert data.input_spec.value_range == (0.0, 255.0) and data.input_spec.integer_valued
    assert data.labels == tuple("0123456789")


def test_fashion_from_torchvision_layout_has_class_names(tmp_path):
    write_idx_set(tmp_path / "FashionMNIST" / "raw", compress=True)
    data = load_dataset("fashion", tmp_path)
    assert data.labels[0] == "T-shirt/top" and data.labels[9] == "Ankle boot"


def test_read_idx_other_element_types(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 0.0]], dtype=">f4")
    path = tmp_path / "floats"
    path.write_bytes(bytes([0, 0, 0x0D, 2]) + struct.pack(">2I", 2, 2) + values.tobytes())
    assert np.array_equal(read_idx(path), values)


def test_missing_idx_files_are_listed(tmp_path):
    with pytest.raises(
        DataError, match=r"no mnist IDX files found.*train-images-idx3-ubyte\[\.gz\]"
    ):
        load_dataset("mnist", tmp_path)


def test_missing_test_labels_name_the_file(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing IDX file .*t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def test_bad_idx_magic_is_named(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: not an IDX file.*got 12 34"):
        load_dataset("mnist", tmp_path)


def test_truncated_idx_is_named(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(
        DataError, match=r"dimensions \[40, 6, 5\] of uint8 need 1200 data bytes.*1193"
    ):
        load_dataset("mnist", tmp_path)


def test_idx_images_with_wrong_dimensions_are_named(tmp_path):
    write_idx_set(tmp_path)
    flat = np.zeros((40, 30), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(flat))
    with pytest.raises(
        DataError, match=r"expected images of shape \(N, rows, cols\), got \[40, 30\]"
    ):
        load_dataset("mnist", tmp_path)


def test_idx_image_and_label_counts_must_match(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(39, np.uint8)))
    with pytest.raises(DataError, match="holds 40 images but .*train-labels-idx1-ubyte holds 39"):
        load_dataset("mnist", tmp_path)


def test_idx_labels_out_of_range_are_named(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(20, 12, np.uint8)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: labels must lie in 0\.\.9"):
        load_dataset("mnist", tmp_path)


def test_corrupt_gzip_is_named(tmp_path):
    write_idx_set(tmp_path, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: corrupt gzip data"):
        load_dataset("mnist", tmp_path)


# --- npz -----------------------------------------------------------------------------------------
def test_npz_images_get_a_channel_axis_and_a_measured_input_spec(tmp_path):
    x = np.arange(60 * 4 * 4, dtype=np.float64).reshape(60, 4, 4) / 4  # quarter steps
    y = np.arange(60) % 3
    np.savez(tmp_path / "set.npz", x=x, y=y, labels=np.array(["cat", "dog", "eel"]))
    data = load_dataset("npz", tmp_path / "set.npz", val_fraction=0.2, test_fraction=0.2)
    assert data.name == "set" and data.input_shape == (1, 4, 4)
    assert data.labels == ("cat", "dog", "eel")
    assert (len(data.train), len(data.val), len(data.test)) == (36, 12, 12)
    assert data.input_spec.value_range == (0.0, float(x.max()))
    assert not data.input_spec.integer_valued


def test_npz_flat_features_and_own_test_split(tmp_path):
    x, y = np.ones((20, 7), np.uint8), np.arange(20) % 2
    x_test, y_test = np.zeros((5, 7), np.uint8), np.array([0, 1, 1, 0, 1])
    np.savez(tmp_path / "data.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    data = load_dataset("npz", tmp_path)  # a directory means its data.npz
    assert data.input_shape == (7,) and data.labels == ("0", "1")
    assert np.array_equal(data.test.y, y_test) and len(data.train) + len(data.val) == 20
    assert data.input_spec.integer_valued


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 3))}, r"missing arrays \['y'\]; expected 'x' and 'y'"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(5, int)}, "'y' has 5 labels but the inputs have 4"),
        (
            {"x": np.zeros(4), "y": np.zeros(4, int)},
            r"'x' must be \(N, features\).*got shape \[4\]",
        ),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4)}, "labels must be integer class indices"),
        (
            {"x": np.zeros((4, 3)), "y": np.array([0, 1, 2, 3]), "labels": np.array(["a", "b"])},
            r"labels must lie in 0\.\.1",
        ),
        (
            {"x": np.full((4, 3), np.nan), "y": np.zeros(4, int)},
            "'x' contains NaN or infinite values",
        ),
        (
            {"x": np.zeros((4, 3)), "y": np.zeros(4, int), "x_test": np.zeros((2, 3))},
            "'x_test' and 'y_test' must be given together",
        ),
        (
            {
                "x": np.zeros((4, 3)),
                "y": np.zeros(4, int),
                "x_test": np.zeros((2, 5)),
                "y_test": np.zeros(2, int),
            },
            r"'x_test' instances have shape \[5\], 'x' has \[3\]",
        ),
    ],
)
def test_malformed_npz_is_named(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset("npz", path)


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, x=np.array([object()] * 4, dtype=object), y=np.zeros(4, int))
    with pytest.raises(DataError, match="cannot load without pickle"):
        load_dataset("npz", path)


def test_missing_and_non_npz_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"missing npz file .*absent\.npz"):
        load_dataset("npz", tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError, match=r"text\.npz: not a \.npz file \(expected a zip archive"):
        load_dataset("npz", tmp_path / "text.npz")

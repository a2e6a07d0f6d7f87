"""Data sets for training, all read from local disk: nothing here downloads anything.

* ``digits`` (the default): scikit-learn's bundled handwritten digits, 1,797 real 8×8 scans with
  integer pixel values 0..16, split stratified and seeded into train / validation / test.
* ``mnist`` and ``fashion``: the standard IDX files (raw or ``.gz``) in a local directory, e.g.
  ``train-images-idx3-ubyte.gz``; pixels 0..255. The validation split is carved out of the
  training files (stratified, seeded); the ``t10k`` files are the test split. Without a
  directory, ``fashion`` is read from where Debian's ``dataset-fashion-mnist`` package installs
  it (:data:`PACKAGED_DATASETS`).
* ``npz``: a ``.npz`` file holding ``x`` (N, ...) and integer class indices ``y`` (N,), optionally
  ``labels`` (class names, a string array) and ``x_test`` / ``y_test`` (the test split; when absent
  the test split is carved out of ``x`` like the validation split). Loaded with
  ``allow_pickle=False``.

Inputs are raw pixel values as float32, channels-first, *not* normalized: the network's first
BatchNorm absorbs the scale, and the inference engine has an exact fast path for integer pixels,
which the :class:`~model.spec.InputSpec` (``value_range``, ``integer_valued``) advertises.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.spec import InputSpec

DATASETS = ("digits", "mnist", "fashion", "npz")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Sub-directories where the IDX files are commonly found under a data directory.
_IDX_SUBDIRS = {
    "mnist": ("", "mnist", "MNIST/raw"),
    "fashion": ("", "fashion", "fashion-mnist", "FashionMNIST/raw"),
}
FASHION_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# IDX element type codes (third byte of the magic number) → big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class PackagedDataset:
    """Where a system package installs a data set's files, and the package's name."""

    directory: Path
    package: str


# Data sets a distribution package provides, read from its directory when --data-dir is not given.
PACKAGED_DATASETS: dict[str, PackagedDataset] = {
    "fashion": PackagedDataset(Path("/usr/share/datasets/fashion-mnist"), "dataset-fashion-mnist"),
}


class DataError(ValueError):
    """A data set cannot be loaded: unknown name, missing or malformed file."""


class DatasetNotInstalledError(DataError):
    """No --data-dir was given and the package that provides the data set is not installed."""


@dataclass(frozen=True)
class Split:
    """One split: ``x`` (N, *input_shape) float32 raw values, ``y`` (N,) int64 class indices."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"split has {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DataBundle:
    """A loaded data set: three splits, the per-instance input shape and the class names."""

    name: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    input_spec: InputSpec

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        return (
            f"{self.name}: input {list(self.input_shape)}, {self.num_classes} classes, "
            f"train {len(self.train)} / val {len(self.val)} / test {len(self.test)}"
        )


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Load data set ``name`` (one of :data:`DATASETS`) from local disk.

    ``val_fraction`` and ``test_fraction`` are fractions of the whole set for the splits carved
    out here (the test split only where the data set has none of its own); ``seed`` fixes the
    stratified split, so the same seed always gives the same split.
    """
    loaders: dict[str, Callable[[], DataBundle]] = {
        "digits": lambda: load_digits(val_fraction, test_fraction, seed),
        "mnist": lambda: load_idx_dataset("mnist", _need_dir(name, data_dir), val_fraction, seed),
        "fashion": lambda: load_idx_dataset(
            "fashion", _need_dir(name, data_dir), val_fraction, seed
        ),
        "npz": lambda: load_npz(_need_dir(name, data_dir), val_fraction, test_fraction, seed),
    }
    if name not in loaders:
        raise DataError(f"unknown data set {name!r}; expected one of: {', '.join(DATASETS)}")
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    return loaders[name]()


# --- digits --------------------------------------------------------------------------------------
def load_digits(
    val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0
) -> DataBundle:
    """scikit-learn's bundled 8×8 digits (values 0..16), split stratified and seeded."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]  # (1797, 1, 8, 8), values 0..16
    y = bunch.target.astype(np.int64)
    train, val, test = _split_three(x, y, val_fraction, test_fraction, seed)
    return DataBundle(
        name="digits",
        train=train,
        val=val,
        test=test,
        input_shape=(1, 8, 8),
        labels=tuple(str(c) for c in range(10)),
        input_spec=InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0), integer_valued=True),
    )


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------
def load_idx_dataset(name: str, data_dir: Path, val_fraction: float, seed: int) -> DataBundle:
    """MNIST-format IDX files from ``data_dir`` (or its usual sub-directories)."""
    root = _find_idx_root(name, data_dir)
    x_train, y_train = _read_idx_pair(root, *IDX_FILES["train"])
    x_test, y_test = _read_idx_pair(root, *IDX_FILES["test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{root}: training images are {list(x_train.shape[1:])} but test images are "
            f"{list(x_test.shape[1:])}; expected the same image size"
        )
    train, val = _split_two(x_train, y_train, val_fraction, seed)
    shape = tuple(int(d) for d in x_train.shape[1:])
    labels = FASHION_LABELS if name == "fashion" else tuple(str(c) for c in range(10))
    return DataBundle(
        name=name,
        train=train,
        val=val,
        test=Split(x_test, y_test),
        input_shape=shape,
        labels=labels,
        input_spec=InputSpec(shape=shape, value_range=(0.0, 255.0), integer_valued=True),
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (raw or gzip-compressed, by content) into a numpy array.

    Format: magic ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
    elements, big-endian, row-major.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path}: not an IDX file: expected magic bytes 00 00 <type> <ndim> with type in "
            f"{[hex(t) for t in _IDX_DTYPES]}, got {data[:4].hex(' ') or 'an empty file'}"
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header_end = 4 + 4 * ndim
    if ndim == 0 or len(data) < header_end:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions but is truncated")
    dims = struct.unpack(f">{ndim}I", data[4:header_end])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_end != expected:
        raise DataError(
            f"{path}: IDX dimensions {list(dims)} of {dtype.name} need {expected} data bytes, "
            f"the file has {len(data) - header_end}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_end).reshape(dims)


def _read_idx_pair(root: Path, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = _idx_path(root, images_name), _idx_path(root, labels_name)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(
            f"{images_path}: expected images of shape (N, rows, cols), got {list(images.shape)}"
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (N,), got {list(labels.shape)}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    y = _class_indices(labels, labels_path, num_classes=10)
    return images.astype(np.float32)[:, None, :, :], y  # (N, 1, rows, cols)


def _find_idx_root(name: str, data_dir: Path) -> Path:
    for sub in _IDX_SUBDIRS[name]:
        root = data_dir / sub
        if _idx_path(root, IDX_FILES["train"][0], required=False) is not None:
            return root
    tried = ", ".join(str(data_dir / sub) for sub in _IDX_SUBDIRS[name])
    files = ", ".join(f"{f}[.gz]" for pair in IDX_FILES.values() for f in pair)
    raise DataError(f"no {name} IDX files found in {tried}; expected {files}")


def _idx_path(root: Path, stem: str, *, required: bool = True) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    if required:
        raise DataError(f"missing IDX file {root / stem} (or {stem}.gz) in {root}")
    return None


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None


# --- npz -----------------------------------------------------------------------------------------
def load_npz(path: Path, val_fraction: float, test_fraction: float, seed: int) -> DataBundle:
    """A ``.npz`` with ``x``, ``y`` and optionally ``labels``, ``x_test``, ``y_test``."""
    if path.is_dir():
        path = path / "data.npz"
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise DataError(f"missing npz file {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != b"PK\x03\x04":
        raise DataError(f"{path}: not a .npz file (expected a zip archive of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise DataError(f"{path}: cannot load without pickle ({exc})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing arrays {missing}; expected 'x' and 'y', got {sorted(arrays)}"
        )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: 'x_test' and 'y_test' must be given together")
    x = _npz_inputs(arrays["x"], path, "x")
    num_classes = _npz_num_classes(arrays, path)
    y = _class_indices(_npz_labels_array(arrays["y"], path, "y", len(x)), path, num_classes)
    if "x_test" in arrays:
        x_test = _npz_inputs(arrays["x_test"], path, "x_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(
                f"{path}: 'x_test' instances have shape {list(x_test.shape[1:])}, "
                f"'x' has {list(x.shape[1:])}; expected the same"
            )
        y_raw = _npz_labels_array(arrays["y_test"], path, "y_test", len(x_test))
        test = Split(x_test, _class_indices(y_raw, path, num_classes))
        train, val = _split_two(x, y, val_fraction, seed)
    else:
        train, val, test = _split_three(x, y, val_fraction, test_fraction, seed)
    all_x = np.concatenate([train.x, val.x, test.x])
    integer = bool(np.all(all_x == np.round(all_x)))
    shape = tuple(int(d) for d in x.shape[1:])
    labels = (
        tuple(str(s) for s in arrays["labels"])
        if "labels" in arrays
        else tuple(str(c) for c in range(num_classes))
    )
    return DataBundle(
        name=path.stem,
        train=train,
        val=val,
        test=test,
        input_shape=shape,
        labels=labels,
        input_spec=InputSpec(
            shape=shape,
            value_range=(float(all_x.min()), float(all_x.max())),
            integer_valued=integer,
        ),
    )


def _npz_inputs(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: {key!r} must be numeric, got dtype {x.dtype}")
    if x.ndim not in (2, 3, 4) or len(x) == 0:
        raise DataError(
            f"{path}: {key!r} must be (N, features), (N, H, W) or (N, C, H, W) with N > 0, "
            f"got shape {list(x.shape)}"
        )
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{path}: {key!r} contains NaN or infinite values")
    return x[:, None] if x.ndim == 3 else x  # (N, H, W) → (N, 1, H, W)


def _npz_labels_array(y: np.ndarray, path: Path, key: str, n: int) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{path}: {key!r} must be 1-D (N,), got shape {list(y.shape)}")
    if len(y) != n:
        raise DataError(f"{path}: {key!r} has {len(y)} labels but the inputs have {n} instances")
    return y


def _npz_num_classes(arrays: dict[str, np.ndarray], path: Path) -> int:
    if "labels" in arrays:
        labels = arrays["labels"]
        if labels.ndim != 1 or labels.dtype.kind not in "US" or len(labels) < 2:
            raise DataError(
                f"{path}: 'labels' must be a 1-D string array of at least 2 class names, "
                f"got dtype {labels.dtype} shape {list(labels.shape)}"
            )
        return len(labels)
    ys = [arrays["y"], *([arrays["y_test"]] if "y_test" in arrays else [])]
    if any(y.dtype.kind not in "biu" for y in ys):
        return 0  # _class_indices reports the dtype
    return max(2, int(max(y.max(initial=0) for y in ys)) + 1)


def _class_indices(y: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    if y.dtype.kind not in "biu":
        raise DataError(f"{path}: labels must be integer class indices, got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"{path}: labels must lie in 0..{num_classes - 1}, "
            f"got values from {int(y.min())} to {int(y.max())}"
        )
    return y.astype(np.int64)


# --- splitting -----------------------------------------------------------------------------------
def _split_two(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified, seeded split into (rest, held out) with ``fraction`` held out."""
    from sklearn.model_selection import train_test_split

    _, counts = np.unique(y, return_counts=True)
    held_out = math.ceil(fraction * len(y))
    # Stratify where every class can appear on both sides; tiny sets get a plain shuffle.
    can_stratify = counts.min() >= 2 and min(held_out, len(y) - held_out) >= counts.size
    stratify = y if counts.size > 1 and can_stratify else None
    try:
        x_rest, x_out, y_rest, y_out = train_test_split(
            x, y, test_size=fraction, random_state=seed, stratify=stratify
        )
    except ValueError as exc:
        raise DataError(f"cannot split {len(y)} instances ({exc})") from None
    return Split(x_rest, y_rest), Split(x_out, y_out)


def _split_three(
    x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[Split, Split, Split]:
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction}; expected < 1"
        )
    rest, test = _split_two(x, y, test_fraction, seed)
    # val_fraction is of the whole set; rescale to the remainder.
    train, val = _split_two(rest.x, rest.y, val_fraction / (1 - test_fraction), seed)
    return train, val, test


def _need_dir(name: str, data_dir: str | Path | None) -> Path:
    if data_dir is None and name in PACKAGED_DATASETS:
        return packaged_data_dir(name)
    if data_dir is None:
        what = "a .npz file" if name == "npz" else f"a directory holding the {name} IDX files"
        raise DataError(f"data set {name!r} needs --data-dir: {what} (nothing is downloaded)")
    return Path(data_dir)


def packaged_data_dir(name: str) -> Path:
    """The directory the system package of data set ``name`` installs; a
    :class:`DatasetNotInstalledError` saying how to install it (or what to give instead) when the
    directory is absent."""
    packaged = PACKAGED_DATASETS[name]
    if not packaged.directory.is_dir():
        raise DatasetNotInstalledError(
            f"data set {name!r} was not found in {packaged.directory}: install it with "
            f"`apt-get install {packaged.package}` (Debian/Ubuntu), or give --data-dir DIR with "
            f"the {name} IDX files (nothing is downloaded)"
        )
    return packaged.directory


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise DataError(f"{name} must lie strictly between 0 and 1, got {value}")

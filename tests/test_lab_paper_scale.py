"""``--scale paper``: every preset's paper configuration, run in smoke mode on tiny generated
files in the formats the papers' data come in (CIFAR-10 python batches, MNIST IDX files, an
image folder), with the papers' numbers printed beside ours."""

import csv
import gzip
import pickle
import struct

import numpy as np
import pytest

from normlab.cli import main
from normlab.lab.cli import compare
from normlab.lab.presets import PRESETS, make_plan


pytestmark = pytest.mark.usefixtures("one_thread")


def _cifar10(root):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", 40) for i in range(1, 6)] + [("test_batch", 40)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": (np.arange(n) % 10).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    return root


def _idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(str(path) + ".gz", "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _mnist_idx(root):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for prefix, n in (("train", 300), ("t10k", 60)):
        _idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


def _image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(2)
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(15):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(
                root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper-data")
    return {"cifar10": str(_cifar10(base / "cifar")), "mnist-idx": str(_mnist_idx(base / "idx")),
            "image-folder": str(_image_folder(base / "images"))}


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_runs_its_paper_scale_in_smoke_mode(preset, roots, tmp_path):
    data = PRESETS[preset].paper.data
    plan, counts = compare(preset, tmp_path, smoke=True, scale="paper", seeds=1,
                           data_root=roots[data], progress=False, jobs=1)
    assert plan.scale == "paper" and counts["ran"] == len(plan.variants)
    assert {v.config.data for v in plan.variants} == {data}
    report = (tmp_path / "report.md").read_text()
    assert "scale: **paper**" in report and plan.notes[:40] in report.replace("\n", " ")
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(plan.variants)
    for row in rows:
        assert row["paper"] == plan.reported_for(row["group"], row["method"])
    if plan.reported:
        assert "| paper |" in report
        assert any(row["paper"] for row in rows)


def test_paper_configurations_are_the_papers():
    root = {"data_root": "/data"}
    p = make_plan("revisit-gamma", scale="paper", **root)
    c = p.variants[0].config
    assert (c.data, c.model, c.batch_size, c.epochs, c.lr, c.momentum, c.weight_decay,
            c.schedule, c.augment, c.input_norm) == ("cifar10", "resnet18", 128, 180, 0.1, 0.9,
                                                     1e-4, "cosine", "flip", "online")
    assert p.seeds == list(range(1, 16)) and p.reported["BASE"].startswith("89.44 ± 0.45")
    p = make_plan("frn-batch-size", scale="paper", **root)
    sizes = sorted({v.config.batch_size for v in p.variants})
    assert sizes == [16, 32, 64, 128, 256]
    lrs = {v.config.batch_size: v.config.lr for v in p.variants}
    assert lrs[256] == pytest.approx(0.1) and lrs[16] == pytest.approx(0.1 * 16 / 256)
    c = p.variants[0].config
    assert (c.model, c.steps, dict(c.model_options)["stem"]) == ("preact_resnet50", 300000,
                                                                 "imagenet")
    assert p.reported_for("batch 16", "bn").startswith("65.09")
    assert p.reported_for("batch 256", "frn").startswith("77.21")
    p = make_plan("bn-sigmoid", scale="paper", **root)
    c = p.variants[0].config
    assert (c.data, c.steps, c.batch_size, c.model) == ("mnist-idx", 50000, 60, "mlp")
    p = make_plan("frn-ablation", scale="paper", **root)
    assert {v.config.norm for v in p.variants if v.label.startswith("gn")} == {"gn",
                                                                              "gn:act=tlu"}
    # the CPU scale is untouched by the paper's
    assert make_plan("revisit-gamma").variants[0].config.data == "mnist"
    # model options merge key by key: a method's dropout keeps the base's activation, and a
    # command-line option reaches every variant
    plan = make_plan("bn-dropout", model_options={"hidden": 50})
    options = [dict(v.config.model_options) for v in plan.variants]
    assert options == [{"activation": "relu", "hidden": 50, "dropout": 0.2},
                       {"activation": "relu", "hidden": 50},
                       {"activation": "relu", "hidden": 50, "dropout": 0.2}]


def test_paper_scale_needs_the_data_and_says_so(capsys, tmp_path):
    with pytest.raises(ValueError, match=r"--scale paper for 'revisit-gamma' reads cifar10 .* "
                                         r"give its folder with --data-root DIR"):
        make_plan("revisit-gamma", scale="paper")
    with pytest.raises(ValueError, match="scale must be one of cpu, paper"):
        make_plan("default", scale="gpu")
    code = main(["compare", "--preset", "bn-sigmoid", "--scale", "paper", "--out",
                 str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "reads mnist-idx" in err[0] and "--data-root" in err[0]

"""A model trained by the lab is saved and `normlab inspect` reads it back (lab → diagnostics)."""

import json

import torch

from normlab.cli import main
from normlab.lab.train import RunConfig, build, load_data


def test_train_saves_checkpoint_that_inspect_reads(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--model", "lenet5", "--norm", "fbn:threshold=2",
            "--limit", "200", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
            "--out", str(out)]
    assert main(args) == 0
    (ckpt,) = (out / "checkpoints").glob("*-seed1.pt")
    assert "model saved to" in capsys.readouterr().out
    saved = torch.load(ckpt, weights_only=True)  # the lab's checkpoints are plain data
    assert set(saved) == {"model", "config", "seed", "epochs"} and saved["seed"] == 1
    config = RunConfig.from_dict(saved["config"])
    assert config.norm == "fbn:threshold=2" and len(saved["epochs"]) == 1
    model = build(config, load_data(config))
    model.load_state_dict(saved["model"])  # the keys and shapes are the lab model's
    assert not list(out.glob("checkpoints/*.tmp"))
    report = tmp_path / "inspect"
    assert main(["inspect", "--checkpoint", str(ckpt), "--split", "test", "--out", str(report),
                 "--channels", "0"]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert len(summary["layers"]) == 4 and summary["totals"]["n"] > 0
    assert (report / "layer_bands.png").stat().st_size > 0

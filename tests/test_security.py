"""No file a user is handed may run code: ``inspect --data``/``--checkpoint`` files, CIFAR
batches, and an audit of every loader in the source (issue 12)."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from normlab.cli import main

import normlab

SRC = Path(normlab.__file__).resolve().parent  # the package under test


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_inspect_data_file_never_runs_code(tmp_path, capsys, suffix, how):
    marker = tmp_path / "marker"
    path = tmp_path / f"evil{suffix}"
    payload = {"x": _Payload(marker), "y": torch.arange(4)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    code, _, err = run_cli(["inspect", "--model", "lenet5", "--data", path, "--out", tmp_path / "o"],
                     capsys)
    assert not marker.exists(), "loading the data file ran code"
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "is refused" in err and "could run code" in err and "weights_only=False" not in err


@pytest.mark.parametrize("content", ["object", "code", "plain pickle"])
def test_inspect_checkpoint_that_is_not_weights_is_one_line_refusal(tmp_path, capsys, content):
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    if content == "object":
        torch.save(argparse.Namespace(model={"w": torch.zeros(2)}), path)
    elif content == "code":
        torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(argparse.Namespace(a=1)))
    code, _, err = run_cli(["inspect", "--checkpoint", path, "--model", "lenet5", "--out",
                      tmp_path / "o"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"normlab inspect: error: checkpoint {str(path)!r} is refused")
    assert "weights_only=False" not in err and "Traceback" not in err
    assert not marker.exists()
    if content == "object":
        assert "argparse.Namespace" in err


@pytest.mark.parametrize("layout", ["tuple", "dict", "TensorDataset", "x only", "npz"])
def test_plain_tensor_files_load(tmp_path, layout):
    from normlab.diagnostics.cli import load_tensor_file

    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2])
    path = tmp_path / ("data.npz" if layout == "npz" else "data.pt")
    if layout == "npz":
        np.savez(path, x=x.numpy(), y=y.numpy())
    else:
        torch.save({"tuple": (x, y), "dict": {"x": x, "y": y}, "x only": x,
                    "TensorDataset": torch.utils.data.TensorDataset(x, y)}[layout], path)
    x2, y2 = load_tensor_file(path)
    assert torch.equal(x2, x)
    assert y2 is None if layout == "x only" else torch.equal(y2, y)


def test_inspect_runs_on_a_tensor_file(tmp_path, capsys):
    path = tmp_path / "data.pt"
    torch.save(torch.utils.data.TensorDataset(torch.randn(6, 1, 28, 28),
                                              torch.tensor([0, 1, 2, 0, 1, 2])), path)
    out = tmp_path / "o"
    assert main(["inspect", "--model", "lenet5", "--data", str(path), "--out", str(out),
                 "--channels", "0", "--sample-size", "1000"]) == 0
    assert json.loads((out / "summary.json").read_text())["totals"]["n"] > 0
    assert "error" not in capsys.readouterr().err


def test_npz_with_python_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.array([_Payload(tmp_path / "marker")], dtype=object))
    code, _, err = run_cli(["inspect", "--model", "lenet5", "--data", path, "--out", tmp_path / "o"],
                     capsys)
    assert code == 2 and "is refused" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "marker").exists()


def test_every_loader_in_the_source_is_safe():
    """Audit: torch.load only with weights_only=True, numpy only with allow_pickle=False, and
    pickle only through the restricted CIFAR unpickler."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        name = path.relative_to(SRC)
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{name}: {call.group(0)}"
        assert "weights_only=False" not in text, name
        assert "allow_pickle=True" not in text, name
        for call in re.finditer(r"np\.load\(([^)]*)\)", text):
            assert "allow_pickle=False" in call.group(1), f"{name}: {call.group(0)}"
        assert not re.search(r"pickle\.loads?\(|cPickle|marshal\.load|dill|joblib\.load",
                             text), name
        assert not re.search(r"(?<![\w.])(eval|exec)\((?!\))", text), f"{name}: eval/exec"
        if "pickle.Unpickler" in text:
            assert "def find_class" in text, f"{name}: an Unpickler must restrict find_class"

"""JSON / CSV writers for every number the diagnostics plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

__all__ = ["to_jsonable", "write_json", "write_csv"]


def to_jsonable(obj: Any) -> Any:
    """Tensors/arrays → lists, numpy scalars → Python, float keys → strings, NaN/inf → None."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else f"{k:g}" if isinstance(k, float) else str(k)):
                to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(obj), indent=1) + "\n")
    return path


def write_csv(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Rows of flat dicts → CSV; the header is the union of keys in first-seen order."""
    rows = list(rows)
    fields: list[str] = []
    for row in rows:
        for k in row:
            if k not in fields:
                fields.append(k)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: to_jsonable(v) for k, v in row.items()})
    return path

"""Where the C source of the fused CPU kernels lives (compiled by :mod:`normlab.kernels.cpu`).

The kernels are real C files shipped as package data (``kernels/csrc``), so compiler
messages point at real lines:

* ``normlab_kernels.c`` — the translation unit: constants, the moment-merging helpers,
  bfloat16 loads and stores, and three ``#include "normlab_body.h"`` with ``S`` (storage
  type), ``T`` (arithmetic type), ``LD``/``ST`` (conversions) and ``SFX`` (name suffix)
  defined: ``_f32``, ``_f64`` and ``_bf16`` (bfloat16 storage, float arithmetic);
* ``normlab_body.h`` — the kernels, written once over ``S`` and ``T``.

Its header comment states the exactness rule the kernels follow (chunked two-sweep moments
merged with Chan's update in double, means as hi + lo pairs, NaN as the reference).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["SOURCE_DIR", "MAIN", "FILES", "main_path", "digest"]

SOURCE_DIR = Path(__file__).resolve().with_name("csrc")
MAIN = "normlab_kernels.c"
FILES = (MAIN, "normlab_body.h")


def main_path() -> Path:
    """The file handed to the compiler (it includes the others from its own directory)."""
    return SOURCE_DIR / MAIN


def digest() -> str:
    """sha256 over the names and bytes of every source file (part of the cache key)."""
    h = hashlib.sha256()
    for name in FILES:
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    return h.hexdigest()

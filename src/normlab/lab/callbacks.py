"""Training callbacks: the contract between the lab's training loop and tools such as
:mod:`normlab.diagnostics`.

The loop calls, in order: ``on_train_begin`` once; for each batch ``on_after_backward``
(gradients are in ``.grad``, the optimizer has not stepped) then ``on_batch_end`` (after the
step); ``on_epoch_end`` after each epoch's evaluation; ``on_train_end`` once. Finally
``write_artifacts(out_dir)`` lets the callback save plots/JSON for the report and return
their paths. A callback must leave the model's parameters, buffers and RNG-visible training
behaviour as it found them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class TrainState:
    """What the training loop exposes to callbacks (fields are updated in place)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Callback:
    """Base class: override the hooks you need."""

    def on_train_begin(self, state: TrainState) -> None:
        pass

    def on_after_backward(self, state: TrainState) -> None:
        pass

    def on_batch_end(self, state: TrainState) -> None:
        pass

    def on_epoch_end(self, state: TrainState) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        return []

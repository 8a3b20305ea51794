"""How a fine-tune's token table maps onto ranks, micro-batches, optimizer steps and epochs.

Plain arithmetic (no Ray, no DeepSpeed): the driver sizes the run and checks the table with it, Tune
sizes its schedulers with it, and every worker reads its rows and finds its resume position with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import FinetuneConfig


@dataclass(frozen=True)
class DataPlan:
    """How a table of ``num_rows`` maps onto micro-batches, optimizer steps and epochs.

    A global micro-batch is ``micro_batch_size * world_size`` consecutive rows; rank r takes rows
    r, r+world, ...  A final global micro-batch with fewer than ``world_size`` rows would leave a
    rank empty and is dropped, as are trailing micro-batches that do not fill an optimizer step.
    """

    num_rows: int
    world_size: int
    micro_batch_size: int
    grad_accum: int
    epochs: int = 1
    max_steps: int | None = None

    @classmethod
    def of(cls, ft: FinetuneConfig, num_rows: int, world_size: int) -> "DataPlan":
        return cls(num_rows, world_size, ft.micro_batch_size, ft.grad_accum, ft.epochs, ft.max_steps)

    @property
    def global_batch_rows(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def micro_batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_rows, self.global_batch_rows)
        return full + (1 if rest >= self.world_size else 0)

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_batches_per_epoch // self.grad_accum

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps else self.epochs * self.steps_per_epoch

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def check(self, origin: str = "the table") -> None:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{origin} has {self.num_rows} rows, fewer than one optimizer step needs "
                f"(micro_batch_size {self.micro_batch_size} x workers {self.world_size} x "
                f"grad_accum {self.grad_accum} = {self.global_batch_rows * self.grad_accum})"
            )

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, global micro-batches consumed in that epoch) before optimizer step ``step``."""
        return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.grad_accum

    def dropped_rows_per_epoch(self) -> int:
        return self.num_rows - min(self.num_rows, self.steps_per_epoch * self.grad_accum * self.global_batch_rows)


def rank_rows(n_rows: int, rank: int, world_size: int) -> np.ndarray:
    """Rows of a global micro-batch that belong to ``rank`` (interleaved, so sizes differ by <= 1)."""
    return np.arange(rank, n_rows, world_size)

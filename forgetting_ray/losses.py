"""The FORGETTING objective and its lambda schedules (docs/method.md §6, §12).

    L = sum_pos NLL / max(n_pos, eps)  -  lambda(k) * sum_neg NLL / max(n_neg, eps)

``token_nll`` and ``token_class`` are both aligned with ``labels``: class +1 = positive,
-1 = negative, 0 = not a response token (prompt, padding) or left out by the partition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, get_args

import torch

from .config import LambdaSchedule
from .constants import IGNORE_INDEX

SCHEDULES = get_args(LambdaSchedule)
STRATEGIES = ("forgetting", "ignore", "sft")
FORGET_LOSSES = ("nll", "unlikelihood")
NORMALIZATIONS = ("micro_batch", "global")
EPS = 1e-10


def lambda_schedule(name: str, *, t_max: float, t_min: float, total_steps: int) -> Callable[[int], float]:
    """lambda as a function of the global optimizer step ``k`` (0-based)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown lambda schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if t_min > t_max:
        raise ValueError(f"t_min ({t_min}) must not exceed t_max ({t_max})")

    def schedule(k: int) -> float:
        if k < 0:
            raise ValueError(f"optimizer step must be >= 0, got {k}")
        p = min(k, total_steps) / total_steps
        if name == "linear":  # the paper's code: lambda(0) = 0 and t_min only shrinks the slope
            return (t_max - t_min) * p
        if name == "linear_offset":
            return t_min + (t_max - t_min) * p
        if name == "constant":
            return t_max
        return t_max * 0.5 * (1.0 - math.cos(math.pi * p))  # cosine ramp 0 -> t_max

    return schedule


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    pos_nll: torch.Tensor  # detached mean NLL of positive tokens (0 when there are none)
    neg_nll: torch.Tensor  # detached mean NLL of negative tokens
    n_pos: int
    n_neg: int


def classes_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Every response token positive: the class column of plain SFT (reference model, baseline)."""
    return (labels != IGNORE_INDEX).to(torch.int8)


def forgetting_loss(
    token_nll: torch.Tensor,
    token_class: torch.Tensor,
    lam: float,
    *,
    strategy: str = "forgetting",
    normalization: str = "micro_batch",
    n_pos: float | None = None,
    n_neg: float | None = None,
    forget_loss: str = "nll",
) -> LossOutput:
    """The loss of one micro-batch.

    ``forget_loss`` is the forgetting term over the negatives: ``"nll"`` (the paper) subtracts lambda times
    their mean NLL, unbounded below; ``"unlikelihood"`` adds lambda times their mean -log(1 - p) (Welleck et
    al., 2019), which pushes p down but flattens out as p -> 0 instead of rewarding ever larger losses.

    ``normalization="micro_batch"`` (the paper) averages each class over its own count in this
    micro-batch.  ``"global"`` divides by ``n_pos``/``n_neg`` given by the caller: the counts over
    every micro-batch of the optimizer step on every rank, so each token weighs the same.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if forget_loss not in FORGET_LOSSES:
        raise ValueError(f"unknown forget_loss {forget_loss!r}; choose one of {', '.join(FORGET_LOSSES)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if token_nll.shape != token_class.shape:
        raise ValueError(f"token_nll {tuple(token_nll.shape)} and token_class {tuple(token_class.shape)} differ")
    pos = token_class > 0
    neg = token_class < 0
    if strategy == "sft":  # standard SFT: every response token is trained on by likelihood
        pos = pos | neg
        neg = torch.zeros_like(neg)
    local_pos, local_neg = int(pos.sum()), int(neg.sum())
    sum_pos = (token_nll * pos).sum()
    sum_neg = (token_nll * neg).sum()
    if normalization == "global":
        if n_pos is None or n_neg is None:
            raise ValueError("normalization='global' needs n_pos and n_neg from the caller")
        den_pos, den_neg = max(float(n_pos), EPS), max(float(n_neg), EPS)
    else:
        den_pos, den_neg = max(local_pos, EPS), max(local_neg, EPS)
    loss = sum_pos / den_pos
    if strategy == "forgetting" and forget_loss == "unlikelihood":
        # -log(1 - p) with p = exp(-nll): -log(-expm1(-nll)), kept finite where p -> 1
        unlikely = -torch.log((-torch.expm1(-token_nll)).clamp_min(EPS))
        loss = loss + lam * ((unlikely * neg).sum() / den_neg)
    elif strategy == "forgetting":
        loss = loss - lam * (sum_neg / den_neg)
    with torch.no_grad():
        pos_nll = sum_pos.detach() / max(local_pos, 1)
        neg_nll = sum_neg.detach() / max(local_neg, 1)
    return LossOutput(loss=loss, pos_nll=pos_nll, neg_nll=neg_nll, n_pos=local_pos, n_neg=local_neg)

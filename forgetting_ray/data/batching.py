"""Token-budget batching of token-table rows: how the score stage's actors (and Tune's validation pass) cut
rows of uneven length into batches that pad little and fit a budget of ``rows x padded length`` tokens.

Plain numpy: the benchmark replays the stage's batches with :func:`simulate_pipeline_batches`, no cluster.
"""

from __future__ import annotations

import math

import numpy as np


def plan_batches(lengths: np.ndarray, batch_tokens: int, *, sort: bool = True,
                 pad_tolerance: float | None = None) -> list[np.ndarray]:
    """Cut rows into batches whose ``rows x padded length`` stays within ``batch_tokens``.

    With ``sort`` the rows go in ascending length order (stable), so each batch pads to nearly its
    own rows' lengths; ``pad_tolerance`` also cuts where a row is that fraction longer than the
    batch's shortest, which bounds the padding of every batch.  A row longer than the budget gets a
    batch of its own.  Returns row indices.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable") if sort else np.arange(lengths.size)
    cap = math.inf if pad_tolerance is None or not sort else 1.0 + pad_tolerance
    batches: list[np.ndarray] = []
    start, width = 0, 0
    for pos, i in enumerate(order):
        n = int(lengths[i])
        if pos > start and ((pos - start + 1) * max(width, n) > batch_tokens or n > cap * lengths[order[start]]):
            batches.append(order[start:pos])
            start, width = pos, 0
        width = max(width, n)
    if start < order.size:
        batches.append(order[start:])
    return batches


def padding_waste(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Fraction of the padded batch area that is padding."""
    lengths = np.asarray(lengths, dtype=np.int64)
    area = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return 1.0 - float(lengths.sum()) / area if area else 0.0


def simulate_pipeline_batches(
    lengths: np.ndarray, shard_size: int, batch_size: int, batch_tokens: int, *, bucketing: bool = True,
    pad_tolerance: float | None = None,
) -> list[np.ndarray]:
    """The sub-batches the score stage forms on a fresh run: blocks of ``shard_size`` rows, sorted by
    length (when ``bucketing``), handed out ``batch_size`` rows at a time, cut by the token budget.
    Used by the benchmark to replay the same batches outside Ray."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rows: list[np.ndarray] = []
    for s in range(0, lengths.size, shard_size):
        idx = np.arange(s, min(s + shard_size, lengths.size))
        rows.append(idx[np.argsort(lengths[idx], kind="stable")] if bucketing else idx)
    stream = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    out: list[np.ndarray] = []
    for s in range(0, stream.size, batch_size):
        chunk = stream[s : s + batch_size]
        out.extend(chunk[b] for b in plan_batches(lengths[chunk], batch_tokens, sort=bucketing,
                                                  pad_tolerance=pad_tolerance))
    return out

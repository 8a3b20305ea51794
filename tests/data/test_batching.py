"""Token-budget batching of token-table rows (data/batching.py): no cluster, no model."""

from __future__ import annotations

import numpy as np

from forgetting_ray.data.batching import padding_waste, plan_batches, simulate_pipeline_batches


def test_plan_batches_respects_budget_and_covers_every_row():
    lengths = np.random.default_rng(0).integers(1, 300, size=500)
    for sort in (True, False):
        batches = plan_batches(lengths, 1024, sort=sort)
        assert sorted(np.concatenate(batches).tolist()) == list(range(500))
        for b in batches:
            assert len(b) == 1 or len(b) * lengths[b].max() <= 1024
    assert padding_waste(lengths, plan_batches(lengths, 1024)) < 0.05
    capped = plan_batches(lengths, 1024, pad_tolerance=0.1)
    assert sorted(np.concatenate(capped).tolist()) == list(range(500))
    assert all(lengths[b].max() <= 1.1 * lengths[b].min() or len(b) == 1 for b in capped)
    assert padding_waste(lengths, plan_batches(lengths, 1024, sort=False)) > 0.3
    assert [b.tolist() for b in plan_batches(np.array([5000, 3]), 100)] == [[1], [0]]  # over-budget row alone


def test_simulated_pipeline_batches_stay_within_their_shard_and_cover_every_row():
    lengths = np.random.default_rng(1).integers(1, 200, size=37)
    batches = simulate_pipeline_batches(lengths, shard_size=8, batch_size=4, batch_tokens=400)
    assert sorted(np.concatenate(batches).tolist()) == list(range(37))
    assert all(len(set((b // 8).tolist())) == 1 for b in batches)  # shard = block: batch_size divides it
    assert simulate_pipeline_batches(np.zeros(0, np.int64), 8, 4, 400) == []

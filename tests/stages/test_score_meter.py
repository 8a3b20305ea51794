"""The scoring stage's steady-state throughput (pure bookkeeping, no cluster)."""

import pytest

from forgetting_ray.stages.score import steady_throughput


def _actor(start_up: float, block_s: float, n: int, tokens: int = 100) -> list[tuple[float, float, int]]:
    return [(start_up + i * block_s, start_up + (i + 1) * block_s, tokens) for i in range(n)]


def test_one_actor_counts_the_blocks_after_its_first():
    stats = steady_throughput({1: _actor(start_up=5.0, block_s=2.0, n=6)})
    assert stats["steady_window_s"] == pytest.approx(10.0) and stats["steady_tokens_per_s"] == pytest.approx(50.0)


def test_two_actors_as_fast_as_one_give_at_most_twice_its_rate_whatever_their_start_ups():
    one = steady_throughput({1: _actor(5.0, 2.0, 12)})["steady_tokens_per_s"]
    # the second actor starts 3.3 s later and its blocks are out of step with the first's
    two = steady_throughput({1: _actor(5.0, 2.0, 12), 2: _actor(8.3, 2.0, 12)})["steady_tokens_per_s"]
    assert 1.5 * one < two <= 2.0 * one


def test_too_few_blocks_or_no_overlap_give_no_figure():
    assert steady_throughput({}) == {}
    assert steady_throughput({1: _actor(0.0, 1.0, 1)}) == {}
    assert steady_throughput({1: _actor(0.0, 1.0, 3), 2: _actor(10.0, 1.0, 3)}) == {}  # never both scoring

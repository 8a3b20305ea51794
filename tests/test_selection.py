import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from forgetting_ray.selection import find_threshold, num_positive, partition, partition_shards

finite = st.floats(-50, 50, allow_nan=False, width=32)
# few distinct values so that ties are common
tied = st.sampled_from([-1.5, -0.0, 0.0, 0.25, 2.0])
score_arrays = st.one_of(
    arrays(np.float32, st.integers(1, 400), elements=finite),
    arrays(np.float32, st.integers(1, 400), elements=tied),
)
rhos = st.floats(0.0, 1.0, exclude_min=True)


def naive_partition(scores: np.ndarray, rho: float) -> np.ndarray:
    """Stable descending sort (ties keep index order), first floor(N*rho) positive."""
    s = scores.astype(np.float32) + np.float32(0)
    order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
    out = np.full(len(s), -1, dtype=np.int8)
    out[order[: num_positive(len(s), rho)]] = 1
    return out


@settings(max_examples=300, deadline=None)
@given(score_arrays, rhos)
def test_partition_matches_naive_sort(scores, rho):
    got = partition(scores, rho)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, naive_partition(scores, rho))
    assert int((got == 1).sum()) == num_positive(len(scores), rho)


@settings(max_examples=200, deadline=None)
@given(score_arrays, rhos, st.integers(1, 7))
def test_sharded_partition_equals_in_memory(scores, rho, n_shards):
    shards = np.array_split(scores, n_shards)
    got = np.concatenate(list(partition_shards(lambda: iter(shards), rho)))
    np.testing.assert_array_equal(got, partition(scores, rho))


def test_exact_count_and_determinism():
    rng = np.random.default_rng(0)
    s = rng.normal(size=100_003).astype(np.float32)
    a, b = partition(s, 0.7), partition(s.copy(), 0.7)
    np.testing.assert_array_equal(a, b)
    assert (a == 1).sum() == math.floor(100_003 * 0.7)
    assert s[a == 1].min() >= s[a == -1].max()


def test_decimal_rho_is_exact():
    assert num_positive(100, 0.29) == 29  # 100 * 0.29 == 28.999999999999996 in floats
    assert num_positive(10, 0.7) == 7


def test_ties_go_to_lower_index():
    s = np.array([1.0, 2.0, 1.0, 1.0, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(partition(s, 0.6), [1, 1, 1, -1, -1])


def test_threshold_value_reported():
    s = np.arange(10, dtype=np.float32)
    th = find_threshold(lambda: [s[:3], s[3:]], 0.5)
    assert (th.n, th.k, th.tau, th.n_above, th.ties_positive) == (10, 5, 5.0, 4, 1)


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.0001, float("nan")])
def test_rho_out_of_range(rho):
    with pytest.raises(ValueError, match="rho"):
        partition(np.ones(4, dtype=np.float32), rho)


def test_nan_and_empty_scores():
    with pytest.raises(ValueError, match="index 2"):
        partition(np.array([0.0, 1.0, np.nan]), 0.5)
    with pytest.raises(ValueError, match="shard 1"):
        find_threshold(lambda: [np.zeros(2), np.array([np.inf])], 0.5)
    with pytest.raises(ValueError, match="empty"):
        partition(np.array([], dtype=np.float32), 0.5)


def test_rho_one_all_positive():
    assert (partition(np.random.default_rng(1).normal(size=50), 1.0) == 1).all()


def test_bottom_threshold_is_the_kth_smallest_score_over_shards():
    from forgetting_ray.selection import bottom_threshold

    rng = np.random.default_rng(5)
    s = rng.normal(size=1001).astype(np.float32)
    shards = np.array_split(s, 7)
    for fraction in (0.01, 0.2, 0.5):
        k = int(np.floor(s.size * fraction))
        assert bottom_threshold(lambda: iter(shards), fraction) == np.sort(s)[k - 1]
        assert (s <= bottom_threshold(lambda: iter(shards), fraction)).sum() == k


def test_variant_scores_of_single_token_sequences_and_unknown_names():
    from forgetting_ray.selection import variant_scores

    z = variant_scores(np.array([2.0, 1.0, 3.0]), np.array([1.0, 1.0, 1.0]), np.array([1, 2]), "zscore")
    assert z[0] == 0.0 and z[1] == pytest.approx(-z[2], abs=1e-5) and z[1] < 0
    assert variant_scores(np.array([0.0]), np.array([0.5]), np.array([1]), "relative")[0] < 0  # no division by 0
    with pytest.raises(ValueError, match="unknown score variant"):
        variant_scores(np.zeros(1), np.zeros(1), np.array([1]), "ratio")

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forgetting_ray.losses import classes_from_labels, forgetting_loss, lambda_schedule


def naive_loss(nll, cls, lam, strategy):
    pos = [float(x) for x, c in zip(nll.flatten(), cls.flatten()) if c == 1]
    neg = [float(x) for x, c in zip(nll.flatten(), cls.flatten()) if c == -1]
    mean = lambda v: sum(v) / max(len(v), 1e-10)  # noqa: E731
    if strategy == "sft":
        return mean(pos + neg)
    if strategy == "ignore":
        return mean(pos)
    return mean(pos) - lam * mean(neg)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 12),
    st.floats(0, 1),
    st.sampled_from(["forgetting", "ignore", "sft"]),
    st.integers(0, 2**31 - 1),
)
def test_forgetting_loss_matches_naive(b, l, lam, strategy, seed):
    g = torch.Generator().manual_seed(seed)
    nll = torch.rand(b, l, generator=g, dtype=torch.float64) * 5
    cls = torch.randint(-1, 2, (b, l), generator=g).to(torch.int8)
    out = forgetting_loss(nll, cls, lam, strategy=strategy)
    assert math.isclose(float(out.loss), naive_loss(nll, cls, lam, strategy), rel_tol=1e-9, abs_tol=1e-9)
    assert out.n_pos + out.n_neg == int((cls != 0).sum()) or strategy == "sft"


def test_gradient_signs():
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    cls = torch.tensor([[0, 1, -1, 1]], dtype=torch.int8)
    out = forgetting_loss(nll, cls, 0.5)
    out.loss.backward()
    assert torch.allclose(nll.grad, torch.tensor([[0.0, 0.5, -0.5, 0.5]]))
    assert float(out.pos_nll) == 3.0 and float(out.neg_nll) == 3.0


def test_empty_classes_vanish():
    nll = torch.tensor([[1.0, 2.0]])
    only_neg = forgetting_loss(nll, torch.tensor([[0, -1]], dtype=torch.int8), 0.25)
    assert float(only_neg.loss) == pytest.approx(-0.5) and only_neg.n_pos == 0
    none = forgetting_loss(nll, torch.zeros(1, 2, dtype=torch.int8), 0.25)
    assert float(none.loss) == 0.0


def test_global_normalization_uses_caller_counts():
    nll = torch.tensor([[1.0, 3.0, 5.0]])
    cls = torch.tensor([[1, 1, -1]], dtype=torch.int8)
    out = forgetting_loss(nll, cls, 1.0, normalization="global", n_pos=8, n_neg=5)
    assert float(out.loss) == pytest.approx(4 / 8 - 5 / 5)
    with pytest.raises(ValueError, match="n_pos"):
        forgetting_loss(nll, cls, 1.0, normalization="global")


def test_micro_batches_sum_to_global_under_global_normalization():
    g = torch.Generator().manual_seed(0)
    nll = torch.rand(6, 10, generator=g)
    cls = torch.randint(-1, 2, (6, 10), generator=g).to(torch.int8)
    n_pos, n_neg = int((cls == 1).sum()), int((cls == -1).sum())
    parts = sum(
        forgetting_loss(nll[i : i + 2], cls[i : i + 2], 0.3, normalization="global", n_pos=n_pos, n_neg=n_neg).loss
        for i in range(0, 6, 2)
    )
    whole = forgetting_loss(nll, cls, 0.3).loss
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)


def test_sft_classes_from_labels():
    labels = torch.tensor([[-100, 5, 6, -100]])
    assert classes_from_labels(labels).tolist() == [[0, 1, 1, 0]]


def test_bad_strategy_and_shapes():
    with pytest.raises(ValueError, match="strategy"):
        forgetting_loss(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int8), 0.1, strategy="unlikelihood")
    with pytest.raises(ValueError, match="differ"):
        forgetting_loss(torch.zeros(1, 2), torch.zeros(1, 3, dtype=torch.int8), 0.1)


def test_linear_is_papers_code():
    f = lambda_schedule("linear", t_max=0.25, t_min=1e-5, total_steps=100)
    assert f(0) == 0.0
    assert f(50) == pytest.approx((0.25 - 1e-5) * 0.5)
    assert f(99) == pytest.approx((0.25 - 1e-5) * 0.99)


def test_other_schedules():
    off = lambda_schedule("linear_offset", t_max=0.25, t_min=1e-5, total_steps=10)
    assert off(0) == pytest.approx(1e-5) and off(10) == pytest.approx(0.25)
    const = lambda_schedule("constant", t_max=0.2, t_min=0.0, total_steps=10)
    assert const(0) == const(7) == 0.2
    cos = lambda_schedule("cosine", t_max=0.4, t_min=0.0, total_steps=10)
    assert cos(0) == 0.0 and cos(5) == pytest.approx(0.2) and cos(10) == pytest.approx(0.4)
    vals = [cos(k) for k in range(11)]
    assert vals == sorted(vals)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown lambda schedule 'exp'"):
        lambda_schedule("exp", t_max=0.25, t_min=0.0, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        lambda_schedule("linear", t_max=0.25, t_min=0.0, total_steps=0)
    with pytest.raises(ValueError, match="t_min"):
        lambda_schedule("linear", t_max=0.1, t_min=0.2, total_steps=10)


def test_unlikelihood_forgetting_term_against_the_formula():
    import math

    nll = torch.tensor([[0.0, 0.5, 2.0, 0.1, 3.0]], requires_grad=True)
    cls = torch.tensor([[0, 1, -1, -1, 1]], dtype=torch.int8)
    out = forgetting_loss(nll, cls, 0.3, forget_loss="unlikelihood")
    p = [math.exp(-2.0), math.exp(-0.1)]
    expected = (0.5 + 3.0) / 2 + 0.3 * sum(-math.log(1 - x) for x in p) / 2
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    assert nll.grad[0, 2] < 0 and nll.grad[0, 3] < 0  # descending the loss raises the negatives' NLL
    assert torch.isfinite(forgetting_loss(torch.zeros(1, 2), torch.tensor([[1, -1]]), 1.0,
                                          forget_loss="unlikelihood").loss)  # p = 1: clamped, finite
    with pytest.raises(ValueError, match="unknown forget_loss"):
        forgetting_loss(nll, cls, 0.3, forget_loss="hinge")

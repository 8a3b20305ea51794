"""The report plots render headless (no Ray, no pyplot state) into real, non-blank PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forgetting_ray.report.plots import lambda_schedule_plot, loss_curves, score_histogram


def assert_real_png(path: Path, min_bytes: int = 8_000) -> np.ndarray:
    from matplotlib.image import imread

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    assert float(img[..., :3].std()) > 0.05  # not a blank canvas
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))  # written atomically
    return img


def training_metrics(steps: int = 20) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for k in range(1, steps + 1):
        lam = 0.3 * (k - 1) / steps
        pos, neg = 3.0 - 0.08 * k + 0.05 * rng.standard_normal(), 3.0 + 0.1 * k
        rows.append({"step": k, "pos_nll": pos, "neg_nll": neg, "lambda": lam, "loss": pos - lam * neg,
                     "n_pos": 70, "n_neg": 30})
    return rows


def test_score_histogram(tmp_path):
    scores = np.random.default_rng(1).normal(0, 1, 5000)
    counts, edges = np.histogram(scores, bins=50)
    tau = float(np.quantile(scores, 0.3))
    assert_real_png(score_histogram(counts, edges, tau, tmp_path / "h.png", rho=0.7, n_positive=3500, n_total=5000))


@pytest.mark.parametrize("schedule", ["linear", "linear_offset", "constant", "cosine"])
def test_lambda_schedule_plot(tmp_path, schedule):
    applied = [(k, 0.25 * k / 40 * (0.5 if k > 30 else 1.0)) for k in range(40)]  # a guardrail backoff at 30
    assert_real_png(lambda_schedule_plot(schedule, t_max=0.25, t_min=0.01, total_steps=40,
                                         path=tmp_path / f"{schedule}.png", applied=applied))


def test_lambda_plot_differs_by_schedule(tmp_path):
    a = assert_real_png(lambda_schedule_plot("linear", t_max=0.5, t_min=0.0, total_steps=30, path=tmp_path / "a.png"))
    b = assert_real_png(lambda_schedule_plot("cosine", t_max=0.5, t_min=0.0, total_steps=30, path=tmp_path / "b.png"))
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_loss_curves(tmp_path):
    assert_real_png(loss_curves(training_metrics(), tmp_path / "loss.png", title="train (forgetting)"))


def test_loss_curves_without_negatives(tmp_path):
    rows = [dict(m, n_neg=0, neg_nll=0.0, **{"lambda": 0.0}) for m in training_metrics()]  # an sft run
    assert_real_png(loss_curves(rows, tmp_path / "sft.png"))


def test_loss_curves_need_rows(tmp_path):
    with pytest.raises(ValueError, match="at least one metrics row"):
        loss_curves([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()

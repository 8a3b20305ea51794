"""Plots for the run report, rendered headless (Agg canvas, no pyplot state, safe in Ray workers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..losses import lambda_schedule
from ..store import atomic_path


def score_histogram(
    counts: np.ndarray,
    edges: np.ndarray,
    threshold: float,
    path: str | Path,
    *,
    rho: float,
    n_positive: int,
    n_total: int,
    title: str = "Token scores (NLL_base - NLL_ref)",
) -> Path:
    """Bar histogram of response-token scores with the global top-rho threshold as a vertical line.

    ``counts``/``edges`` come from a streaming ``np.histogram`` over the shards, so the plot never
    needs every score in memory.  Written atomically as PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts, edges = np.asarray(counts), np.asarray(edges)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    above = centers >= threshold
    ax.bar(centers[~above], counts[~above], width=widths[~above], color="#d62728", alpha=0.8,
           label="negative (forgotten)")
    ax.bar(centers[above], counts[above], width=widths[above], color="#1f77b4", alpha=0.8,
           label="positive (trained)")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.5,
                   label=f"threshold {threshold:.4g} (rho={rho:g})")
    ax.set_xlabel("score = NLL_base - NLL_ref (nats)")
    ax.set_ylabel("response tokens")
    ax.set_title(f"{title}\n{n_positive:,} positive / {n_total:,} tokens")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _figure(width: float = 8, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def lambda_schedule_plot(
    schedule: str,
    *,
    t_max: float,
    t_min: float,
    total_steps: int,
    path: str | Path,
    applied: list[tuple[int, float]] | None = None,
) -> Path:
    """The configured lambda(k) over the optimizer steps, with the lambda each step actually applied.

    ``applied`` = (step, lambda) pairs from the training metrics; they differ from the schedule
    where the guardrail backed lambda off, which is the point of drawing both.
    """
    fn = lambda_schedule(schedule, t_max=t_max, t_min=t_min, total_steps=total_steps)
    k = np.arange(total_steps + 1)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(k, [fn(int(i)) for i in k], color="#1f77b4", linewidth=2, label=f"{schedule} (t_max={t_max:g}, t_min={t_min:g})")
    if applied:
        steps, lams = zip(*applied)
        ax.plot(steps, lams, "o", color="#d62728", markersize=3, label="applied (after guardrail)")
    ax.set_xlabel("optimizer step k")
    ax.set_ylabel("lambda (forgetting weight)")
    ax.set_title(f"lambda schedule over {total_steps} steps")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def loss_curves(metrics: list[dict], path: str | Path, *, title: str = "Training losses") -> Path:
    """Positive- and negative-token NLL and the total loss per optimizer step (rows of metrics.jsonl).

    The negative NLL climbs under forgetting by design; the plot puts it on its own axis so the
    positive NLL's slope stays readable.
    """
    rows = [m for m in metrics if "step" in m]
    if not rows:
        raise ValueError("loss_curves needs at least one metrics row with a 'step'")
    steps = np.array([m["step"] for m in rows])

    def series(key: str) -> np.ndarray:
        return np.array([float(m.get(key, np.nan)) for m in rows])

    fig = _figure(8, 6)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    pos = series("pos_nll")
    neg = series("neg_nll")
    has_neg = np.array([m.get("n_neg", 1) > 0 for m in rows])
    top.plot(steps, pos, color="#1f77b4", marker=".", label="positive-token NLL (trained)")
    top.set_ylabel("NLL (nats)")
    twin = top.twinx()
    if has_neg.any():
        twin.plot(steps[has_neg], neg[has_neg], color="#d62728", marker=".", label="negative-token NLL (forgotten)")
    twin.set_ylabel("negative NLL (nats)", color="#d62728")
    lines = top.get_lines() + twin.get_lines()
    top.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)
    top.set_title(title)
    top.grid(alpha=0.3)
    bottom.plot(steps, series("loss"), color="black", marker=".", label="loss = NLL(pos) - lambda NLL(neg)")
    if "lambda" in rows[0]:
        lam = bottom.twinx()
        lam.plot(steps, series("lambda"), color="#2ca02c", linestyle="--", label="lambda")
        lam.set_ylabel("lambda", color="#2ca02c")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("loss")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="best", fontsize=8)
    return _save(fig, path)


def log_finetune_plots(t, res, training=None) -> None:
    """Loss curves (and, for the forgetting strategy, the lambda schedule) of a fine-tune, logged to ``t``."""
    plots = Path(res.out_dir) / "plots"
    if training is not None and training.strategy == "forgetting":
        applied = [(int(m["step"]) - 1, float(m["lambda"])) for m in res.metrics if "lambda" in m]
        lambda_schedule_plot(training.lambda_schedule, t_max=training.t_max, t_min=training.t_min,
                             total_steps=max(1, res.total_steps), path=plots / "lambda_schedule.png", applied=applied)
        t.log_artifact(plots / "lambda_schedule.png", "plots")
    if res.metrics:
        strategy = training.strategy if training is not None else "sft"
        loss_curves(res.metrics, plots / "loss_curves.png", title=f"{res.stage} ({strategy})")
        t.log_artifact(plots / "loss_curves.png", "plots")

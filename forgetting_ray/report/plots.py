"""Plots for the run report, rendered headless (Agg canvas, no pyplot state, safe in Ray workers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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

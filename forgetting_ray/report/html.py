"""The partition audit: one self-contained HTML page per (score set, rho) partition.

Recipe (``build_report``): find the partition folder -> read ``partition.json`` (counts, threshold,
histogram, per-source fractions) -> pick samples (given ids, else seeded random rows) -> read only
those rows from the partitioned table and their score shards -> check the three agree (lengths and
class vs threshold) -> decode the tokens -> render -> write atomically.

The page has no scripts and no network assets: charts are inline SVG, styles inline, and a
Content-Security-Policy forbids everything else, so corpus text (which can hold anything, including
``<script>``) is only ever shown, never run.  Every string that reaches the page goes through
``html.escape``.  Reading is row-selective, so the report costs the same on a billion-token run.
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import PipelineConfig
from ..data.score_set import shard_name
from ..data.table import IGNORE_INDEX
from ..data.tokens import decode_pieces
from ..errors import UserError
from ..models import load_tokenizer
from ..selection import variant_scores
from ..store import atomic_write_text, fetch_children, is_complete, read_done, run_root
from ..tracking import Tracker

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase


log = logging.getLogger(__name__)

TABLE_FILE, INFO_FILE = "train.parquet", "partition.json"  # as the partition stage writes them
TABLE_COLUMNS = ("sample_id", "source", "input_ids", "labels", "n_response", "token_class")
REPORT_ARTIFACT_DIR = "report"
POS_COLOR, NEG_COLOR = "#2166ac", "#b2182b"
# Diverging scale around the threshold, level 1 (near tau) .. 5 (far); ColorBrewer RdBu.
NEG_LEVELS = ("#fbe6dc", "#fddbc7", "#f4a582", "#d6604d", "#b2182b")
POS_LEVELS = ("#e3eef6", "#d1e5f0", "#92c5de", "#4393c3", "#2166ac")
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


class ReportInputError(UserError, ValueError):
    """The partition, its table or its score set is missing or inconsistent; names the file."""


@dataclass(frozen=True)
class PartitionInputs:
    dir: Path
    info: dict[str, Any]
    table_path: Path
    score_dir: Path
    shard_size: int


@dataclass
class SampleView:
    row: int
    sample_id: str
    source: str
    input_ids: np.ndarray
    labels: np.ndarray
    token_class: np.ndarray
    score: np.ndarray  # response tokens only, in order
    nll_base: np.ndarray
    nll_ref: np.ndarray


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def find_partition(path: str | Path, rho: float | None = None) -> Path:
    """A partition folder, or the newest complete one under ``<run_dir>/partition/`` (with ``rho``:
    the newest with that rho)."""
    path = Path(path)
    if (path / INFO_FILE).is_file():
        return path
    root = path / "partition"
    found = sorted((d for d in fetch_children(root) if is_complete(d) and (d / INFO_FILE).is_file()),
                   key=lambda d: (d / "_SUCCESS.json").stat().st_mtime_ns)
    if rho is not None:
        found = [d for d in found if json.loads((d / INFO_FILE).read_text()).get("rho") == rho]
    if not found:
        what = f" with rho={rho}" if rho is not None else ""
        raise ReportInputError(f"no completed partition{what} under {root} (and {path} holds no {INFO_FILE}): "
                               "run the partition stage first")
    if len(found) > 1:
        log.info("report: %d partitions under %s, using the newest %s", len(found), root, found[-1].name)
    return found[-1]


def _score_dir(part: Path, info: dict[str, Any]) -> Path:
    # The run directory layout first (survives moving the run), then the path the stage recorded.
    key = info.get("score_key")
    candidates = [part.parent.parent / "score" / key] if key else []
    if info.get("score_dir"):
        candidates.append(Path(info["score_dir"]))
    for c in candidates:
        if is_complete(c) and (key is None or read_done(c).get("key") == key):
            return c
    raise ReportInputError(f"{part / INFO_FILE}: score set {key} not found (looked in "
                           f"{', '.join(map(str, candidates)) or 'nowhere: no score_key/score_dir'})")


def load_partition(path: str | Path, rho: float | None = None) -> PartitionInputs:
    part = find_partition(path, rho)
    try:
        info = json.loads((part / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportInputError(f"{part / INFO_FILE}: cannot read: {e}") from None
    for k in ("N", "n_positive", "n_negative", "rho", "threshold", "histogram", "fraction_positive_by_source"):
        if k not in info:
            raise ReportInputError(f"{part / INFO_FILE}: field {k!r} missing")
    table = part / TABLE_FILE
    try:
        names = set(pq.read_schema(table).names)
    except (OSError, pa.ArrowInvalid) as e:
        raise ReportInputError(f"{table}: cannot read the partitioned token table: {e}") from None
    missing = [c for c in TABLE_COLUMNS if c not in names]
    if missing:
        raise ReportInputError(f"{table}: column {missing[0]!r} missing (not a partitioned token table?)")
    score_dir = _score_dir(part, info)
    shard_size = read_done(score_dir).get("shard_size")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ReportInputError(f"{score_dir}: completion marker has no valid shard_size ({shard_size!r})")
    return PartitionInputs(part, info, table, score_dir, shard_size)


def select_rows(sample_ids: Sequence[str], n_response: np.ndarray, samples: Sequence[str] | None,
                n_random: int, seed: int, origin: str) -> list[int]:
    """Rows for the given ids (in that order), else ``n_random`` seeded rows with response tokens."""
    if samples is not None:
        index: dict[str, int] = {}
        for i, s in enumerate(sample_ids):
            index.setdefault(s, i)
        missing = [s for s in samples if s not in index]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ReportInputError(f"{origin}: sample_id {', '.join(map(repr, missing[:5]))}{more} not in the table")
        return list(dict.fromkeys(index[s] for s in samples))
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {n_random}")
    pool = np.flatnonzero(np.asarray(n_response) > 0)
    picked = np.random.default_rng(seed).choice(pool, size=min(n_random, pool.size), replace=False)
    return sorted(int(r) for r in picked)


def _read_rows(path: Path, rows: list[int], columns: list[str]) -> dict[int, dict[str, Any]]:
    """Only the row groups that hold ``rows``."""
    pf = pq.ParquetFile(path)
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    out: dict[int, dict[str, Any]] = {}
    by_group: dict[int, list[int]] = {}
    for r in rows:
        by_group.setdefault(int(np.searchsorted(starts, r, side="right") - 1), []).append(r)
    for g, rs in by_group.items():
        t = pf.read_row_group(g, columns=columns)
        for r in rs:
            out[r] = {c: t.column(c)[r - int(starts[g])].as_py() for c in columns}
    return out


def load_samples(inp: PartitionInputs, rows: list[int]) -> list[SampleView]:
    """The chosen rows with their scores, checked against each other."""
    tab = _read_rows(inp.table_path, rows, ["sample_id", "source", "input_ids", "labels", "token_class"])
    by_shard: dict[int, list[int]] = {}
    for r in rows:
        by_shard.setdefault(r // inp.shard_size, []).append(r)
    tau = inp.info["threshold"]
    selection = inp.info.get("selection", {})  # a split beyond the paper's: ranked by a variant, tokens left out
    variant = selection.get("score", "difference")
    views: dict[int, SampleView] = {}
    for shard, rs in by_shard.items():
        path = inp.score_dir / shard_name(shard)
        if not path.is_file():
            raise ReportInputError(f"{path}: score shard missing (needed for table rows {rs[0]}..)")
        t = pq.read_table(path, columns=["sample_id", "score", "nll_base", "nll_ref"])
        for r in rs:
            i = r - shard * inp.shard_size
            row = tab[r]
            if i >= t.num_rows or t.column("sample_id")[i].as_py() != row["sample_id"]:
                raise ReportInputError(f"{path}: row {i} is not sample_id {row['sample_id']} "
                                       f"(table row {r} of {inp.table_path})")
            v = SampleView(r, row["sample_id"], row["source"],
                           np.asarray(row["input_ids"], dtype=np.int64), np.asarray(row["labels"], dtype=np.int64),
                           np.asarray(row["token_class"], dtype=np.int8),
                           *(np.asarray(t.column(c)[i].as_py(), dtype=np.float32) for c in ("score", "nll_base", "nll_ref")))
            if variant != "difference":  # the score the split ranked by
                v.score = variant_scores(v.nll_base, v.nll_ref, np.array([v.nll_base.size]), variant)
            _check_sample(v, tau, path, inp.table_path, may_ignore=bool(set(selection) - {"score"}))
            views[r] = v
    return [views[r] for r in rows]


def _check_sample(v: SampleView, tau: float | None, score_path: Path, table_path: Path, *,
                  may_ignore: bool = False) -> None:
    """The sample's classes agree with its labels and its scores; ``may_ignore``: the split leaves some response
    tokens out (class 0: a three-way split or a base-NLL floor)."""
    resp = v.labels != IGNORE_INDEX
    where = f"sample_id {v.sample_id}"
    marked = v.token_class != 0
    aligned = (not (marked & ~resp).any()) if may_ignore else np.array_equal(marked, resp)
    if v.token_class.shape != v.labels.shape or not aligned:
        raise ReportInputError(f"{table_path}: {where}: token_class is not aligned with labels "
                               "(non-zero exactly at response positions)")
    n = int(resp.sum())
    for name, arr in (("score", v.score), ("nll_base", v.nll_base), ("nll_ref", v.nll_ref)):
        if arr.size != n:
            raise ReportInputError(f"{score_path}: {where}: {arr.size} values in column {name!r}, "
                                   f"expected {n} (its response tokens)")
    cls = v.token_class[resp]
    if tau is None:  # k = 0: no token positive
        bad = np.flatnonzero(cls == 1)
    else:
        bad = np.flatnonzero(((cls == 1) & (v.score < tau)) | ((cls != 1) & (v.score > tau)))
    if bad.size:
        j = int(bad[0])
        raise ReportInputError(f"{score_path}: {where}: response token {j} has score {v.score[j]:.6g} but class "
                               f"{int(cls[j]):+d} under threshold {tau}: score set and partition disagree")


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [round(start + k * step, 12) for k in range(int((hi - start) / step + 1e-9) + 1)]


def histogram_svg(edges: Sequence[float], counts: Sequence[int], tau: float | None, rho: float,
                  *, width: int = 880, height: int = 320) -> str:
    """Bars left of the threshold in the negative colour, right of it positive; dashed tau line."""
    edges, counts = np.asarray(edges, dtype=float), np.asarray(counts, dtype=float)
    ml, mr, mt, mb = 64, 16, 28, 62
    pw, ph = width - ml - mr, height - mt - mb
    x0, x1 = float(edges[0]), float(edges[-1])
    x1 = x1 if x1 > x0 else x0 + 1.0
    ymax = float(counts.max()) if counts.size and counts.max() > 0 else 1.0
    yticks = _nice_ticks(0.0, ymax, 5)
    ytop = max(ymax, yticks[-1])
    sx = lambda v: ml + (v - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda c: mt + ph - c / ytop * ph  # noqa: E731
    out = [f'<svg id="score-histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="histogram of token scores">']
    for t in yticks:
        y = sy(t)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_e(f"{t:,.0f}")}</text>')
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        cls = "pos" if tau is not None and (a + b) / 2 >= tau else "neg"
        xa, xb = sx(a), sx(b)
        out.append(f'<rect class="bar {cls}" x="{xa:.2f}" y="{sy(c):.2f}" width="{max(xb - xa - 0.5, 0.5):.2f}" '
                   f'height="{sy(0) - sy(c):.2f}"><title>{_e(f"[{a:.4g}, {b:.4g}): {int(c):,} tokens")}</title></rect>')
    for t in _nice_ticks(x0, x1, 9):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" class="axis"/>'
                   f'<text x="{x:.1f}" y="{mt + ph + 17}" text-anchor="middle" class="tick">{_e(f"{t:g}")}</text>')
    out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" class="axis"/>'
               f'<text x="{ml + pw / 2}" y="{mt + ph + 34}" text-anchor="middle" class="label">'
               "score = NLL_base − NLL_ref (nats)</text>"
               f'<text x="14" y="{mt + ph / 2}" text-anchor="middle" class="label" '
               f'transform="rotate(-90 14 {mt + ph / 2})">response tokens</text>')
    for k, (cls, name) in enumerate((("neg", "negative (forgotten)"), ("pos", "positive (trained)"))):
        x = ml + 170 * k
        out.append(f'<rect class="bar {cls}" x="{x}" y="{height - 17}" width="12" height="12"/>'
                   f'<text x="{x + 18}" y="{height - 7}" class="tick">{name}</text>')
    if tau is not None:
        x = min(max(sx(tau), ml), ml + pw)
        anchor, dx = ("end", -6) if x > ml + pw * 0.7 else ("start", 6)
        out.append(f'<line id="threshold" x1="{x:.2f}" x2="{x:.2f}" y1="{mt - 12}" y2="{mt + ph}" class="tau"/>'
                   f'<text x="{x + dx:.2f}" y="{mt - 4}" text-anchor="{anchor}" class="label tau-label">'
                   f'{_e(f"τ = {tau:.4g}  (ρ = {rho:g})")}</text>')
    out.append("</svg>")
    return "".join(out)


def sources_svg(rows: list[tuple[str, int, int, float | None]], overall: float, *, width: int = 880) -> str:
    """Horizontal bars of the positive fraction per source, with the overall fraction as a line."""
    ml, mr, bh, gap, mt = 180, 60, 18, 6, 22
    pw = width - ml - mr
    height = mt + len(rows) * (bh + gap) + 24
    out = [f'<svg id="source-bars" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="positive fraction per source">']
    for k, (name, n_tok, n_pos, frac) in enumerate(rows):
        y = mt + k * (bh + gap)
        label = name if len(name) <= 26 else name[:25] + "…"
        f = frac or 0.0
        out.append(f'<text x="{ml - 8}" y="{y + bh - 5}" text-anchor="end" class="tick">{_e(label)}</text>'
                   f'<rect class="bar neg" x="{ml}" y="{y}" width="{pw:.1f}" height="{bh}" opacity="0.35"/>'
                   f'<rect class="bar pos" x="{ml}" y="{y}" width="{pw * f:.1f}" height="{bh}">'
                   f'<title>{_e(f"{name}: {n_pos:,} of {n_tok:,} tokens positive ({f:.1%})")}</title></rect>'
                   f'<text x="{ml + pw + 6}" y="{y + bh - 5}" class="tick">{_e("—" if frac is None else f"{frac:.1%}")}</text>')
    x = ml + pw * overall
    y_end = mt + len(rows) * (bh + gap)
    out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt - 8}" y2="{y_end}" class="tau"/>'
               f'<text x="{x:.1f}" y="{mt - 11}" text-anchor="middle" class="label">{_e(f"overall {overall:.1%}")}</text>')
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<text x="{ml + pw * t:.1f}" y="{y_end + 14}" text-anchor="middle" class="tick">{t:.0%}</text>')
    out.append("</svg>")
    return "".join(out)


def _histogram_quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    cum = np.cumsum(counts)
    if cum.size == 0 or cum[-1] == 0:
        return float(edges[0])
    i = int(np.searchsorted(cum, q * cum[-1]))
    return float(edges[min(i + 1, edges.size - 1)])


def colour_scale(info: dict[str, Any]) -> tuple[float, float]:
    """(centre, half-width): centred on tau so colour and class agree; the half-width covers the
    2nd..98th percentile of the score distribution, so outliers do not wash the colours out."""
    edges = np.asarray(info["histogram"]["edges"], dtype=float)
    counts = np.asarray(info["histogram"]["counts"], dtype=float)
    tau = info["threshold"]
    centre = float(tau) if tau is not None else float(edges[-1])
    lo, hi = _histogram_quantile(edges, counts, 0.02), _histogram_quantile(edges, counts, 0.98)
    half = max(abs(centre - lo), abs(hi - centre))
    return centre, half if half > 0 else 1.0


def _level(score: float, centre: float, half: float) -> str:
    t = (score - centre) / half
    lvl = min(5, max(1, math.ceil(abs(t) * 5)))
    return f"{'p' if t >= 0 else 'n'}{lvl}"


def _show(piece: str) -> str:
    return _e(piece.replace("\n", "↵\n"))


def sample_html(v: SampleView, pieces: list[str], centre: float, half: float) -> str:
    resp = v.labels != IGNORE_INDEX
    n_pos = int((v.token_class == 1).sum())
    n_neg = int((v.token_class == -1).sum())
    mean = float(v.score.mean()) if v.score.size else float("nan")
    head = (f'<div class="sample-head"><code>{_e(v.sample_id)}</code><span class="src">{_e(v.source)}</span>'
            f'<span>row {v.row:,}</span><span>{len(v.input_ids):,} tokens</span>'
            f'<span>{int(resp.sum()):,} response</span><span class="kpos">{n_pos:,} positive</span>'
            f'<span class="kneg">{n_neg:,} negative</span><span>mean score {_fmt(mean)}</span></div>')
    body: list[str] = []
    prompt: list[str] = []
    j = 0  # index into the response-only score arrays
    for i, piece in enumerate(pieces):
        if not resp[i]:
            prompt.append(piece)
            continue
        if prompt:
            body.append(f'<span class="prompt">{_e("".join(prompt))}</span>')
            prompt = []
        cls = "pos" if v.token_class[i] == 1 else "neg"
        s, b, r = float(v.score[j]), float(v.nll_base[j]), float(v.nll_ref[j])
        tip = (f"{json.dumps(piece, ensure_ascii=False)} · id {int(v.input_ids[i])} · score {s:+.4f} · "
               f"NLL base {b:.4f} → ref {r:.4f} · "
               + ("positive (trained)" if cls == "pos" else "negative (forgotten)")
               + ("" if piece else " · byte fragment: the character shows on the next token"))
        frag = " frag" if not piece else ""
        body.append(f'<span class="tk {cls} {_level(s, centre, half)}{frag}" title="{_e(tip)}">{_show(piece)}</span>')
        j += 1
    if prompt:
        body.append(f'<span class="prompt">{_e("".join(prompt))}</span>')
    return (f'<section class="sample" id="sample-{_e(v.sample_id)}" data-sample-id="{_e(v.sample_id)}">'
            f'{head}<div class="tokens">{"".join(body)}</div></section>')


def legend_html(centre: float, half: float) -> str:
    sw = "".join(f'<span class="sw n{k}"></span>' for k in range(5, 0, -1)) + '<span class="mid"></span>'
    sw += "".join(f'<span class="sw p{k}"></span>' for k in range(1, 6))
    return (f'<div class="legend"><span>score ≤ {_e(_fmt(centre - half))}</span>{sw}'
            f'<span>≥ {_e(_fmt(centre + half))}</span><span>(centre τ = {_e(_fmt(centre))})</span>'
            '<span class="legend-note">Colour: red = below τ (negative), blue = above τ (positive), darker = further '
            'from τ · <span class="tk neg n3">underlined</span> = negative, will be forgotten · '
            '<span class="prompt">grey</span> = prompt, not trained · hover a token for its scores</span></div>')


CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d1d1f;margin:0;background:#f6f6f4}
main{max-width:960px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:32px 0 10px;padding-bottom:4px;border-bottom:1px solid #e3e3e0}
.meta{color:#666;font-size:12px;word-break:break-all}.meta code{font-size:12px}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:10px;margin:16px 0 0}
.card{border:1px solid #e3e3e0;border-radius:6px;padding:8px 12px}
.card b{display:block;font-size:19px;font-weight:600;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.card span{color:#666;font-size:12px}.card.kpos b{color:#2166ac}.card.kneg b{color:#b2182b}
svg{display:block;max-width:100%;height:auto;font-family:inherit}
svg .grid{stroke:#eee}svg .axis{stroke:#888}svg .tick{font-size:11px;fill:#555}svg .label{font-size:12px;fill:#333}
svg .bar.pos{fill:#2166ac}svg .bar.neg{fill:#b2182b}svg .tau{stroke:#111;stroke-width:1.5;stroke-dasharray:5 3}
svg .tau-label{font-weight:600}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}th,td{padding:4px 12px;text-align:right;border-bottom:1px solid #eee}
th:first-child,td:first-child{text-align:left}th{font-weight:600;background:#fafaf8}
.legend{display:flex;flex-wrap:wrap;align-items:center;gap:2px;font-size:12px;color:#555;margin:6px 0 12px}
.legend .sw{display:inline-block;width:22px;height:14px}.legend .mid{width:2px;height:20px;background:#111;margin:0 !important}.legend>span:not(.sw){margin:0 6px}
.legend-note{flex-basis:100%;margin:6px 0 0 !important}
.sample{border:1px solid #e3e3e0;border-radius:6px;margin:14px 0;overflow:hidden}
.sample-head{display:flex;flex-wrap:wrap;gap:4px 14px;padding:6px 12px;background:#fafaf8;border-bottom:1px solid #eee;font-size:12px;color:#555}
.sample-head code{color:#111}.sample-head .src{font-weight:600;color:#333}.kpos{color:#2166ac}.kneg{color:#b2182b}
.tokens{padding:10px 12px;white-space:pre-wrap;word-wrap:break-word;font:13px/1.9 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace}
.prompt{color:#9a9a9a}
.tk{padding:1px 0;box-shadow:inset -1px 0 0 rgba(255,255,255,.85)}
.tk.neg{box-shadow:inset -1px 0 0 rgba(255,255,255,.85),inset 0 -2px 0 #67001f}.tk.frag{display:inline-block;min-width:.35em}
.tk:hover{outline:1px solid #111}
.n1,.sw.n1{background:#fbe6dc}.n2,.sw.n2{background:#fddbc7}.n3,.sw.n3{background:#f4a582}.n4,.sw.n4{background:#d6604d;color:#fff}.n5,.sw.n5{background:#b2182b;color:#fff}
.p1,.sw.p1{background:#e3eef6}.p2,.sw.p2{background:#d1e5f0}.p3,.sw.p3{background:#92c5de}.p4,.sw.p4{background:#4393c3;color:#fff}.p5,.sw.p5{background:#2166ac;color:#fff}
.note{color:#666;font-size:12px}
.warn{background:#fdecea;border-left:4px solid #b2182b;padding:8px 12px}
"""


def render_report(inp: PartitionInputs, views: list[SampleView], pieces: list[list[str]], *, model: str = "",
                  random_seed: int | None = None) -> str:
    info = inp.info
    tau, rho, n = info["threshold"], float(info["rho"]), int(info["N"])
    n_pos, n_neg = int(info["n_positive"]), int(info["n_negative"])
    centre, half = colour_scale(info)
    per_source = sorted(
        ((str(name), int(d.get("n_tokens", 0)), int(d.get("n_positive", 0)), d.get("fraction_positive"))
         for name, d in info["fraction_positive_by_source"].items()),
        key=lambda r: (-(r[3] if r[3] is not None else -1.0), r[0]),
    )
    overall = n_pos / n if n else 0.0
    cards = [("N response tokens", f"{n:,}", ""), ("positive (trained)", f"{n_pos:,}", "kpos"),
             ("negative (forgotten)", f"{n_neg:,}", "kneg"), ("threshold τ", _fmt(tau, 5), ""),
             ("ρ (fraction positive)", f"{rho:g}", ""), ("samples", f"{int(info.get('n_samples', 0)):,}", ""),
             ("score range", f"{_fmt(info.get('score_min'), 3)} … {_fmt(info.get('score_max'), 3)}", ""),
             ("ties at τ kept positive", f"{int(info.get('ties_positive', 0)):,}", "")]
    nll = info.get("nll")
    if info.get("n_ignored"):
        cards.append(("left out (ignored)", f"{int(info['n_ignored']):,}", ""))
    if nll:
        q = nll["base_nll_quantiles"]
        cards += [("reference held-out NLL gain", f"{nll['heldout_gain']:.4f} nats ({_fmt(100 * (nll['heldout_gain_relative'] or 0), 3)} %)", ""),
                  ("median base NLL: positives / negatives",
                   f"{_fmt((q['positive'] or {}).get('p50'), 3)} / {_fmt((q['negative'] or {}).get('p50'), 3)}", "")]
    warning = ('<p class="warn" id="barely-differs">The reference barely differs from the base model (tiny held-out '
               "NLL gain, threshold near 0): the negative set is close to arbitrary. Train the reference longer, "
               "with a higher learning rate or on more data.</p>") if info.get("reference_barely_differs") else ""
    src_rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{t:,}</td><td>{p:,}</td><td>{t - p:,}</td>"
        f"<td>{_e('—' if f is None else f'{f:.1%}')}</td></tr>"
        for name, t, p, f in per_source
    )
    if views:
        how = ("chosen sample_ids" if random_seed is None
               else f"{len(views)} random samples (seed {random_seed})")
        samples = (f'<p class="note">{_e(how)}.</p>' + legend_html(centre, half)
                   + "".join(sample_html(v, p, centre, half) for v, p in zip(views, pieces)))
    else:
        samples = '<p class="note">no samples requested.</p>'
    meta = (f"partition <code>{_e(inp.dir)}</code> · key <code>{_e(info.get('key', ''))}</code> · "
            f"score set <code>{_e(info.get('score_key', ''))}</code>" + (f" · tokenizer <code>{_e(model)}</code>" if model else ""))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(f'FORGETTING partition audit · rho={rho:g}')}</title><style>{CSS}</style></head><body><main>"
        f"<h1>FORGETTING partition audit</h1><div class=\"meta\">{meta}</div>{warning}"
        '<div class="cards" id="counts">'
        + "".join(f'<div class="card {c}"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v, c in cards)
        + "</div><h2>Score distribution</h2>"
        '<p class="note">Top ρ of all response tokens by score (global) are positive and trained by likelihood; '
        "the rest are negative and pushed away (forgotten).</p>"
        + histogram_svg(info["histogram"]["edges"], info["histogram"]["counts"], tau, rho)
        + "<h2>Positive fraction by source</h2>"
        + sources_svg(per_source, overall)
        + '<table id="sources"><thead><tr><th>source</th><th>tokens</th><th>positive</th><th>negative</th>'
        f"<th>fraction positive</th></tr></thead><tbody>{src_rows}</tbody></table>"
        + f"<h2>Samples</h2>{samples}</main></body></html>\n"
    )


def render_results(markdown: str, *, meta: str = "") -> str:
    """The result table page: the text ``report.study.results_table`` prints (Markdown tables and lines: each
    model's mean with its 95 % interval, the paired differences and their reading), as HTML."""
    body, table = [], []

    def close_table() -> None:
        if not table:
            return
        header, *rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table
                         if not set(line.replace("|", "").strip()) <= set("-:")]
        body.append("<table><thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in header) + "</tr></thead><tbody>"
                    + "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
                    + "</tbody></table>")
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        close_table()
        if line.strip():
            body.append(f'<p class="note">{_e(line)}</p>')
    close_table()
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>FORGETTING results</title><style>{CSS}</style></head><body><main><h1>Results</h1>"
            f'<div class="meta">{_e(meta)}</div>' + "".join(body) + "</main></body></html>\n")


def write_results_page(markdown: str, out_path: str | Path, *, meta: str = "") -> Path:
    return Path(atomic_write_text(out_path, render_results(markdown, meta=meta)))


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def build_report(run_dir: str | Path, out_path: str | Path, *, tokenizer: "PreTrainedTokenizerBase",
                 samples: list[str] | None = None, n_random: int = 20, seed: int = 0,
                 rho: float | None = None) -> Path:
    """Write the audit page for a partition folder (or the newest one under a run directory)."""
    inp = load_partition(run_dir, rho)
    meta = pq.read_table(inp.table_path, columns=["sample_id", "n_response"])
    rows = select_rows(meta.column("sample_id").to_pylist(), meta.column("n_response").to_numpy(), samples,
                       n_random, seed, str(inp.table_path))
    views = load_samples(inp, rows)
    pieces = [decode_pieces(tokenizer, v.input_ids) for v in views]
    page = render_report(inp, views, pieces, model=str(getattr(tokenizer, "name_or_path", "")),
                         random_seed=None if samples is not None else seed)
    out = atomic_write_text(out_path, page)
    log.info("report: %s (%d samples, %.1f KiB)", out, len(views), out.stat().st_size / 1024)
    return Path(out)


def log_report(tracker: "Tracker", path: str | Path, artifact_path: str = REPORT_ARTIFACT_DIR) -> None:
    """Attach the page to an MLflow run (``<artifact_path>/<file name>``)."""
    tracker.log_artifact(path, artifact_path)


def main_report(cfg: "PipelineConfig", run_dir: str | Path | None = None, out: str | Path | None = None,
                samples: list[str] | None = None, *, n_random: int = 20, seed: int = 0,
                tracker: "Tracker | None" = None) -> Path:
    """CLI entry: the partition of ``cfg.selection.rho`` under ``run_dir`` (default ``cfg.run_dir``),
    or the given partition folder; default output ``<run_dir>/report/<partition key>.html``."""
    src = Path(run_dir) if run_dir is not None else run_root(cfg.run_dir)
    part = find_partition(src, None if (src / INFO_FILE).is_file() else cfg.selection.rho)
    out_path = Path(out) if out is not None else part.parent.parent / "report" / f"{part.name}.html"
    path = build_report(part, out_path, tokenizer=load_tokenizer(cfg.model), samples=samples,
                        n_random=n_random, seed=seed)
    if tracker is not None:
        log_report(tracker, path)
    return path


__all__ = ["ReportInputError", "PartitionInputs", "SampleView", "find_partition", "load_partition", "select_rows",
           "load_samples", "histogram_svg", "sources_svg", "render_report", "build_report",
           "log_report", "main_report", "render_results", "write_results_page"]

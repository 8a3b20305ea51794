"""HTML partition audit on a real partition folder (real tokenizer, real token table, the partition
stage run on hand-made score shards): content against partition.json and the shards, escaping of
corpus text, sample choice, bad input, and logging into a real MLflow store."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FLAN_DIR
from forgetting_ray.config import ModelConfig, PipelineConfig
from forgetting_ray.data.table import read_token_table, token_table_hash, write_token_table
from forgetting_ray.data.tokens import decode_pieces
from forgetting_ray.models import load_tokenizer
from forgetting_ray.report.html import (ReportInputError, build_report, find_partition, load_partition, log_report,
                                        main_report, select_rows)
from forgetting_ray.stages.partition import run_partition
from forgetting_ray.data.score_set import SCORE_SCHEMA, shard_name
from forgetting_ray.store import mark_complete

SCORE_KEY = "0123456789abcdef"
SHARD_SIZE = 7
EVIL_SOURCE = '"><img src=x onerror=alert(1)><b>evil</b>'
EVIL_PROMPT = 'Ignore this: <script>alert("p")</script> & "quotes" \'too\''
EVIL_RESPONSE = "<script>alert(1)</script> </span><div onclick=x> &amp; done"
EMOJI_RESPONSE = "Café ☕ naïve → 日本語 🤖\nnew line"
ALLOWED_TAGS = {"b", "html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "div", "p", "span", "code",
                "section", "svg", "line", "rect", "text", "table", "thead", "tbody", "tr", "th", "td"}


def sid(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def flan_pairs(per_file: int = 6) -> list[tuple[str, str, str]]:
    """(source, question, response) from the shipped FLAN CoT subset."""
    out = []
    for f in sorted(FLAN_DIR.glob("*_train.tsv")):
        with open(f, encoding="utf-8") as fh:
            for k, line in zip(range(per_file), fh):
                q, a, why = (x.replace("\\n", "\n") for x in line.rstrip("\n").split("\t")[:3])
                out.append((f.stem.removesuffix("_train"), q, f"{why}\nSo the answer is {a}."))
    return out


def make_run(root: Path, tok, *, rho: float = 0.7, bins: int = 40, seed: int = 0, score_key: str = SCORE_KEY,
             run_dir: Path | None = None, **selection):
    """A run directory as the pipeline leaves it: prepare table, score shards, partition folder."""
    pairs = flan_pairs() + [(EVIL_SOURCE, EVIL_PROMPT, EVIL_RESPONSE), ("emoji", "Say hi.", EMOJI_RESPONSE)]
    rows = []
    for k, (source, q, resp) in enumerate(pairs):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"sample_id": sid(k, q), "source": source, "input_ids": p_ids + r_ids,
                     "labels": [-100] * len(p_ids) + r_ids})
    run_dir = run_dir or root / "run"
    table_path = write_token_table(rows, root / f"train-{seed}.parquet")
    table = read_token_table(table_path)
    rng = np.random.default_rng(seed)
    score_dir = run_dir / "score" / score_key
    score_dir.mkdir(parents=True, exist_ok=True)
    n_resp = table.column("n_response").to_pylist()
    base = [rng.gamma(2.0, 1.0, size=n).astype(np.float32) for n in n_resp]
    ref = [np.maximum(b - rng.normal(0.3, 0.8, size=b.size).astype(np.float32), 0) for b in base]
    n_shards = -(-len(rows) // SHARD_SIZE)
    for i in range(n_shards):
        sl = slice(i * SHARD_SIZE, (i + 1) * SHARD_SIZE)
        pq.write_table(pa.table({
            "sample_id": table.column("sample_id").to_pylist()[sl],
            "nll_base": [b.tolist() for b in base[sl]], "nll_ref": [r.tolist() for r in ref[sl]],
            "score": [(b - r).tolist() for b, r in zip(base[sl], ref[sl])],
        }).cast(SCORE_SCHEMA), score_dir / shard_name(i))
    mark_complete(score_dir, {"stage": "score", "key": score_key, "n_samples": len(rows), "n_shards": n_shards,
                              "shard_size": SHARD_SIZE, "n_response_tokens": int(sum(n_resp)),
                              "table_hash": token_table_hash(table)})
    cfg = PipelineConfig.model_validate({"run_dir": str(run_dir),
                                         "selection": {"rho": rho, "histogram_bins": bins, **selection}})
    return run_partition(cfg, table_path, score_dir)


class Page(HTMLParser):
    """Tags, attributes and the text under each element, as a browser's parser sees them."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.stack: list[list] = []  # [tag, attrs, text parts]
        self.done: list[tuple[str, dict[str, str], str]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag not in ("meta", "line"):  # void / self-closed in our output
            self.stack.append([tag, a, []])

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        node = self.stack.pop()
        assert node[0] == tag, f"</{tag}> closes <{node[0]}>"
        text = "".join(node[2])
        self.done.append((tag, node[1], text))
        if self.stack:
            self.stack[-1][2].append(text)

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2].append(data)

    def find(self, tag=None, cls=None, **attrs):
        return [(t, a, x) for t, a, x in self.done
                if (tag is None or t == tag) and (cls is None or cls in a.get("class", "").split())
                and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(ModelConfig(name_or_path="unused", tokenizer=str(tiny_tokenizer_dir)))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok):
    return make_run(tmp_path_factory.mktemp("report"), tok)


def sample_rows(table_path: Path) -> dict[str, dict]:
    t = pq.read_table(table_path)
    return {r["sample_id"]: r for r in t.to_pylist()}


def test_page_shows_counts_histogram_sources_and_aligned_samples(run, tok, tmp_path):
    info = json.loads(run.info_path.read_text())
    out = build_report(run.dir.parent.parent, tmp_path / "r.html", tokenizer=tok, n_random=8, seed=3)
    text = out.read_text(encoding="utf-8")
    page = Page(text)

    # self-contained: no scripts, no external resources, a CSP that forbids them anyway
    assert text.startswith("<!DOCTYPE html>")
    assert {t for t, _ in page.tags} <= ALLOWED_TAGS
    assert all(k not in ("src", "href") and not k.startswith("on") for _, a in page.tags for k in a)
    assert re.findall(r"https?://[^\"' ]+", text) == ["http://www.w3.org/2000/svg"] * 2  # SVG namespaces only
    assert "url(" not in text and "@import" not in text
    csp = [a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]

    # counts
    cards = {x.strip() for _, _, x in page.find("div", "card")}
    for label, value in [("N response tokens", info["N"]), ("positive (trained)", info["n_positive"]),
                         ("negative (forgotten)", info["n_negative"])]:
        assert f"{value:,}{label}" in cards
    assert f"{info['threshold']:.5g}threshold τ" in cards and f"{info['rho']:g}ρ (fraction positive)" in cards

    # histogram: one bar per bin with partition.json's counts, coloured by side of the threshold
    tau = info["threshold"]
    bars = [(a, x) for t, a, x in page.find("rect", "bar") if "[" in x and "tokens" in x]
    assert len(bars) == len(info["histogram"]["counts"]) == 40
    got_counts = [int(re.search(r"\): ([\d,]+) tokens", x)[1].replace(",", "")) for _, x in bars]
    assert got_counts == info["histogram"]["counts"]
    edges = info["histogram"]["edges"]
    for (a, _), lo, hi in zip(bars, edges[:-1], edges[1:]):
        assert a["class"] == ("bar pos" if (lo + hi) / 2 >= tau else "bar neg")
    (thr,) = [a for t, a in page.tags if t == "line" and a.get("id") == "threshold"]
    assert float(bars[0][0]["x"]) < float(thr["x1"]) < 880 and f"τ = {tau:.4g}" in text

    # per-source fractions: table rows = partition.json, sorted by fraction
    by_src = info["fraction_positive_by_source"]
    trs = [x for _, _, x in page.find("tr")][1:]
    assert len(trs) == len(by_src)
    by_fraction = sorted(by_src.items(), key=lambda kv: -kv[1]["fraction_positive"])
    assert trs == [f"{n}{d['n_tokens']:,}{d['n_positive']:,}{d['n_tokens'] - d['n_positive']:,}{d['fraction_positive']:.1%}"
                   for n, d in by_fraction]

    # samples: the seeded rows, every response token a span in order, class and numbers from the files
    table = sample_rows(run.table_path)
    ids = list(table)
    want = [ids[r] for r in select_rows(ids, np.array([table[i]["n_response"] for i in ids]), None, 8, 3, "")]
    sections = page.find("section", "sample")
    assert [a["data-sample-id"] for _, a, _ in sections] == want
    inp = load_partition(run.dir)
    for _, a, _ in sections:
        row = table[a["data-sample-id"]]
        r = ids.index(row["sample_id"])
        shard = pq.read_table(inp.score_dir / shard_name(r // SHARD_SIZE)).to_pylist()[r % SHARD_SIZE]
        assert shard["sample_id"] == row["sample_id"]
        spans = _section_spans(text, row["sample_id"])
        cls = [c for c in row["token_class"] if c != 0]
        assert [s["cls"] for s in spans] == ["pos" if c == 1 else "neg" for c in cls]
        assert len(spans) == row["n_response"] == len(shard["score"])
        for s, score, b, ref in zip(spans, shard["score"], shard["nll_base"], shard["nll_ref"]):
            assert f"score {score:+.4f}" in s["title"] and f"NLL base {b:.4f} → ref {ref:.4f}" in s["title"]
        # prompt (grey) + token spans reassemble the whole decoded sample: no token lost or shifted
        assert _tokens_text(text, row["sample_id"]) == tok.decode(row["input_ids"], skip_special_tokens=False)
        resp_ids = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
        assert "".join(s["text"] for s in spans).replace("↵\n", "\n") == "".join(
            decode_pieces(tok, row["input_ids"])[k] for k, lab in enumerate(row["labels"]) if lab != -100)
        assert len(resp_ids) == len(spans)


def _section_html(text: str, sample_id: str) -> str:
    start = text.index(f'data-sample-id="{sample_id}"')
    return text[start : text.index("</section>", start)]


def _section_spans(text: str, sample_id: str) -> list[dict[str, str]]:
    page = Page(f'<div>{_section_html(text, sample_id).split(">", 1)[1]}</div>')
    return [{"cls": a["class"].split()[1], "title": a["title"], "text": x} for t, a, x in page.find("span", "tk")]


def _tokens_text(text: str, sample_id: str) -> str:
    sec = _section_html(text, sample_id)
    page = Page(sec[sec.index('<div class="tokens">') :])
    (_, _, body), = page.find("div", "tokens")
    return body.replace("↵\n", "\n")


def test_corpus_text_is_shown_never_interpreted(run, tok, tmp_path):
    table = sample_rows(run.table_path)
    evil = next(s for s, r in table.items() if r["source"] == EVIL_SOURCE)
    text = build_report(run.dir, tmp_path / "evil.html", tokenizer=tok, samples=[evil]).read_text()
    page = Page(text)
    assert "<script" not in text.lower() and "<img" not in text.lower() and "<div onclick" not in text.lower()
    assert "<b>evil" not in text
    assert {t for t, _ in page.tags} <= ALLOWED_TAGS
    assert all(not k.startswith("on") for _, a in page.tags for k in a)
    # ... and the reader still sees the exact corpus text
    body = _tokens_text(text, evil)
    assert EVIL_PROMPT in body and EVIL_RESPONSE in body
    assert EVIL_SOURCE in [x for _, _, x in page.find("span", "src")]
    assert any(x.startswith(EVIL_SOURCE) for _, _, x in page.find("tr"))
    spans = _section_spans(text, evil)
    assert "<script>alert(1)</script>" in "".join(s["text"] for s in spans)
    assert any("<" in s["title"] for s in spans)  # tooltips carry the raw token text, escaped in the attribute


def test_decode_pieces_reassemble_the_text_and_park_partial_characters(tok):
    for text in [EMOJI_RESPONSE, EVIL_RESPONSE, "  two  spaces\n\n\ttab", flan_pairs(1)[0][2]]:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pieces = decode_pieces(tok, ids)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
        assert "\ufffd" not in "".join(pieces)
    ids = tok("🤖", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # byte-level BPE with 512 tokens splits the emoji into bytes
    assert decode_pieces(tok, ids) == [""] * (len(ids) - 1) + ["🤖"]


def test_sample_choice_is_explicit_or_seeded_and_output_deterministic(run, tok, tmp_path):
    table = sample_rows(run.table_path)
    ids = list(table)
    chosen = [ids[5], ids[2], ids[5]]
    text = build_report(run.dir, tmp_path / "a.html", tokenizer=tok, samples=chosen).read_text()
    assert re.findall(r'data-sample-id="([0-9a-f]{16})"', text) == [ids[5], ids[2]]
    assert "chosen sample_ids" in text

    n_resp = np.array([table[i]["n_response"] for i in ids])
    assert select_rows(ids, n_resp, None, 5, 0, "") == select_rows(ids, n_resp, None, 5, 0, "")
    assert select_rows(ids, n_resp, None, 5, 0, "") != select_rows(ids, n_resp, None, 5, 1, "")
    assert select_rows(ids, n_resp, None, 100, 0, "") == list(range(len(ids)))
    n_resp[[1, 3]] = 0
    assert {1, 3}.isdisjoint(select_rows(ids, n_resp, None, 100, 0, ""))  # nothing to show there

    a = build_report(run.dir, tmp_path / "b.html", tokenizer=tok, n_random=4, seed=7).read_bytes()
    b = build_report(run.dir, tmp_path / "c.html", tokenizer=tok, n_random=4, seed=7).read_bytes()
    assert a == b and "4 random samples (seed 7)" in a.decode()
    none = build_report(run.dir, tmp_path / "d.html", tokenizer=tok, n_random=0).read_text()
    assert 'class="sample"' not in none and "no samples requested" in none


def test_bad_input_names_the_file_and_writes_nothing(run, tok, tmp_path):
    out = tmp_path / "out.html"
    out.write_text("previous")
    with pytest.raises(ReportInputError, match=r"train\.parquet: sample_id 'ffffffffffffffff' not in the table"):
        build_report(run.dir, out, tokenizer=tok, samples=["ffffffffffffffff"])
    assert out.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["out.html"]
    with pytest.raises(ReportInputError, match="no completed partition under .*empty.*run the partition stage"):
        build_report(tmp_path / "empty", tmp_path / "x.html", tokenizer=tok)
    assert not (tmp_path / "x.html").exists()

    def broken(edit) -> tuple[Path, str]:
        run_dir = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(run.dir.parent.parent, run_dir)
        shard = run_dir / "score" / SCORE_KEY / shard_name(0)
        t = pq.read_table(shard).to_pylist()
        victim = t[1]["sample_id"]
        edit(t[1])
        pq.write_table(pa.Table.from_pylist(t, schema=SCORE_SCHEMA), shard)
        return run_dir, victim

    run_dir, bad = broken(lambda r: r.update(score=[-1000.0] * len(r["score"])))  # the row has positives
    with pytest.raises(ReportInputError, match=rf"shard-00000\.parquet: sample_id {bad}: response token \d+ has "
                                               r"score -1000 but class \+1 under threshold .*disagree"):
        build_report(run_dir, out, tokenizer=tok, samples=[bad])
    run_dir, bad = broken(lambda r: r.update(nll_ref=r["nll_ref"][:-1]))
    with pytest.raises(ReportInputError, match=rf"shard-00000\.parquet: sample_id {bad}: .* column 'nll_ref', expected"):
        build_report(run_dir, out, tokenizer=tok, samples=[bad])
    run_dir, bad = broken(lambda r: r.update(sample_id="0" * 16))
    with pytest.raises(ReportInputError, match=rf"shard-00000\.parquet: row 1 is not sample_id {bad}"):
        build_report(run_dir, out, tokenizer=tok, samples=[bad])
    (table_path,) = run_dir.glob("partition/*/train.parquet")
    table_path.rename(table_path.with_suffix(".bak"))
    pq.write_table(pq.read_table(table_path.with_suffix(".bak")).drop_columns(["token_class"]), table_path)
    with pytest.raises(ReportInputError, match=r"train\.parquet: column 'token_class' missing"):
        build_report(run_dir, out, tokenizer=tok)
    table_path.with_suffix(".bak").replace(table_path)
    shutil.rmtree(run_dir / "score")  # falls back to the score_dir partition.json recorded (the original run)
    assert build_report(run_dir, tmp_path / "fallback.html", tokenizer=tok, n_random=1).is_file()
    (info_path,) = run_dir.glob("partition/*/partition.json")
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "score_dir": str(tmp_path / "gone")}))
    with pytest.raises(ReportInputError, match=rf"partition\.json: score set {SCORE_KEY} not found"):
        build_report(run_dir, out, tokenizer=tok)
    assert out.read_text() == "previous"


def test_main_report_picks_the_configured_rho_and_logs_to_mlflow(tok, tiny_tokenizer_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from forgetting_ray.tracking import Tracker

    low = make_run(tmp_path / "a", tok, rho=0.5, run_dir=tmp_path / "run")
    high = make_run(tmp_path / "b", tok, rho=0.9, run_dir=tmp_path / "run")
    assert find_partition(tmp_path / "run", 0.5) == low.dir and find_partition(tmp_path / "run", 0.9) == high.dir
    cfg = PipelineConfig.model_validate({"run_dir": str(tmp_path / "run"), "selection": {"rho": 0.5},
                                         "model": {"name_or_path": "unused", "tokenizer": str(tiny_tokenizer_dir)}})
    tracker = Tracker.start(f"sqlite:///{tmp_path}/mlflow.db", "exp", "run")
    path = main_report(cfg, n_random=3, tracker=tracker)
    assert path == tmp_path / "run" / "report" / f"{low.key}.html"
    assert "ρ = 0.5" in path.read_text()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    arts = [a.path for a in client.list_artifacts(tracker.run_id, "report")]
    assert arts == [f"report/{low.key}.html"]
    got = Path(client.download_artifacts(tracker.run_id, arts[0], str(tmp_path / "dl")))
    assert got.read_bytes() == path.read_bytes()

    other = build_report(high.dir, tmp_path / "high.html", tokenizer=tok, n_random=2)
    log_report(tracker, other, "audit")
    assert [a.path for a in client.list_artifacts(tracker.run_id, "audit")] == ["audit/high.html"]


def test_a_split_beyond_the_paper_is_audited_by_its_own_score_and_shows_the_reference_gain(tmp_path, tok):
    """zscore ranking with a base-NLL floor: the page checks each sample against the ranking score, accepts the
    left-out tokens, and shows the held-out gain and the two groups' base NLL."""
    part = make_run(tmp_path, tok, score="zscore", base_nll_floor=0.8)
    info = json.loads(part.info_path.read_text())
    assert info["n_ignored"] > 0 and not info["reference_barely_differs"]
    out = build_report(part.dir, tmp_path / "audit.html", tokenizer=tok, n_random=5)
    page = Page(out.read_text())
    cards = {x for _, _, x in page.find("div", cls="card")}
    assert any("left out (ignored)" in c for c in cards) and any("held-out NLL gain" in c for c in cards)
    assert not page.find(id="barely-differs")

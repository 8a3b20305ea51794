"""The audit page in a real browser: headless Chromium parses the same DOM we wrote (nothing injected
by corpus text, the charts and token spans present) and paints a non-blank page with both class colours.

Needs Debian's chromium (``apt-get install -y chromium``); skipped with that hint when it is absent.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from test_report import EVIL_RESPONSE, EVIL_SOURCE, make_run  # noqa: E402  (tests/ is on sys.path)

from forgetting_ray.config import ModelConfig
from forgetting_ray.models import load_tokenizer
from forgetting_ray.report.html import NEG_COLOR, POS_COLOR, build_report

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
# CI installs chromium (`make test`), so there a missing browser is a failure, not a silent skip
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="headless Chromium not installed (apt-get install -y chromium)")
WIDTH, HEIGHT = 1280, 2000


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM, "headless Chromium is required here: apt-get install -y chromium"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", *args, page.as_uri()]
    env = {**os.environ, "HOME": str(profile)}  # keep chromium's dot-folders out of the real home
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("browser")
    tok = load_tokenizer(ModelConfig(name_or_path="unused", tokenizer=str(tiny_tokenizer_dir)))
    part = make_run(root, tok)
    rows = pq.read_table(part.table_path, columns=["sample_id", "source", "token_class"]).to_pylist()
    picked = [rows[i] for i in (0, 7, 13)] + [r for r in rows if r["source"] in (EVIL_SOURCE, "emoji")]
    out = build_report(part.dir, root / "report.html", tokenizer=tok, samples=[r["sample_id"] for r in picked])
    return out, picked


def test_chromium_parses_the_page_as_written(report, tmp_path):
    page, picked = report
    res = chromium(page, tmp_path / "profile", "--dump-dom")
    dom = res.stdout
    assert res.returncode == 0 and "<main>" in dom, res.stderr[-2000:]
    assert '<svg id="score-histogram"' in dom and 'id="threshold"' in dom and 'id="source-bars"' in dom
    assert len(re.findall(r'<rect class="bar (?:pos|neg)"[^>]*><title>\[', dom)) == 40
    assert '<table id="sources">' in dom
    # the browser's DOM holds exactly the token spans the files call for: nothing injected, nothing lost
    assert re.findall(r'data-sample-id="([0-9a-f]{16})"', dom) == [r["sample_id"] for r in picked]
    classes = [c for r in picked for c in r["token_class"] if c != 0]
    samples = dom[dom.index('<section class="sample"') :]  # (the legend holds one example span)
    assert samples.count('class="tk pos') == classes.count(1) and samples.count('class="tk neg') == classes.count(-1)
    assert "<script" not in dom.lower() and "<img" not in dom.lower() and "onclick=" not in dom.lower()
    # ... while the reader sees the corpus text itself
    evil = next(r["sample_id"] for r in picked if r["source"] == EVIL_SOURCE)
    section = dom[dom.index(f'data-sample-id="{evil}"') :].split("</section>", 1)[0]
    shown = html.unescape(re.sub(r"<[^>]+>", "", section.split('<div class="tokens">', 1)[1])).replace("↵\n", "\n")
    assert EVIL_RESPONSE in shown and "<script>" in EVIL_RESPONSE
    assert "&lt;b&gt;evil&lt;/b&gt;" in dom and EVIL_SOURCE.endswith("<b>evil</b>")


def test_chromium_paints_a_readable_page(report, tmp_path):
    from PIL import Image

    page, _ = report
    png = tmp_path / "report.png"
    res = chromium(page, tmp_path / "profile", f"--screenshot={png}")
    assert res.returncode == 0 and png.is_file(), res.stderr[-2000:]
    if os.environ.get("FORGETTING_RAY_KEEP_SCREENSHOT"):  # for looking at it by eye
        shutil.copy(png, os.environ["FORGETTING_RAY_KEEP_SCREENSHOT"])
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (HEIGHT, WIDTH, 3)
    flat = img.reshape(-1, 3)
    assert len(np.unique(flat, axis=0)) > 200  # text antialiasing, charts, token colours: not a blank page
    assert (flat.min(axis=1) < 200).mean() > 0.03  # a real amount of non-white ink

    def share(hex_colour: str, tol: int = 12) -> float:
        rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
        return float((np.abs(flat.astype(int) - rgb).max(axis=1) <= tol).mean())

    # both classes are painted (histogram bars, source bars, the darkest token shades)
    assert share(POS_COLOR) > 1e-3 and share(NEG_COLOR) > 1e-4

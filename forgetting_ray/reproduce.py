"""`forgetting-ray reproduce RUN`: rerun a finished run from its run card into a new folder, then compare the
two cards stage by stage.

The card holds the run's resolved config (seeds included), the stage it ran to, the package versions and
the content hash of everything a stage produced: the token tables, the score shards, the partition
threshold, each export's weights, the evaluation scores.  A hash that differs is named with its stage;
so is every input that changed between the runs (a package version, the base model, Python).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .config import PipelineConfig
from .errors import UserError
from .pipeline import run_pipeline
from .runcard import CARD_FILE
from .store import exists, join_storage, read_text


class ReproduceError(UserError, ValueError):
    """RUN has no usable run card, or the target folder already holds a run."""


@dataclass
class Check:
    stage: str
    what: str
    original: Any
    reproduced: Any

    @property
    def matches(self) -> bool:
        return self.original == self.reproduced


def read_card(run: str) -> dict[str, Any]:
    path = join_storage(run, CARD_FILE)
    try:
        card = json.loads(read_text(path))
    except FileNotFoundError:
        raise ReproduceError(f"{path}: no run card (RUN must be the run_dir of a finished run)") from None
    except ValueError as e:
        raise ReproduceError(f"{path}: not a readable run card ({e})") from None
    if "config" not in card:
        raise ReproduceError(f"{path}: written by a version that did not record the config; rerun that run once")
    if card.get("status") != "FINISHED":
        raise ReproduceError(f"{path}: the run did not finish (status {card.get('status')!r}); nothing to compare")
    return card


def outputs(card: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """(stage, what) -> the content hash or result the card records for it."""
    out: dict[tuple[str, str], Any] = {("prepare", f"data.{k}"): v for k, v in card.get("data", {}).items()}
    # content only: a stage's cache key names where its inputs were (the reference export's folder is in the
    # run's own folder), so it differs between two folders holding the same bytes
    scores = card.get("scores") or {}
    for k in ("shards_sha256", "n_response_tokens"):
        if k in scores:
            out[("score", f"scores.{k}")] = scores[k]
    for k, v in (card.get("stages", {}).get("partition") or {}).items():
        if k != "key":
            out[("partition", f"partition.{k}")] = v
    for name, model in card.get("models", {}).items():
        if name != "base":
            out[("reference" if name == "reference" else "train", f"{name}.weights")] = model.get("weights_sha256")
    for name, res in (card.get("stages", {}).get("eval") or {}).items():
        out[("eval", f"{name}.average")] = res.get("average")
        for task, v in (res.get("headline") or {}).items():
            out[("eval", f"{name}.{task}")] = v
    return out


def changed_inputs(original: dict[str, Any], reproduced: dict[str, Any]) -> list[str]:
    """What the runs did not share: package versions, base model, Python, platform, seeds."""
    lines = []
    a, b = original.get("packages", {}), reproduced.get("packages", {})
    lines += [f"package {p}: {a.get(p)} -> {b.get(p)}" for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]
    for key in ("python", "platform", "seeds"):
        if original.get(key) != reproduced.get(key):
            lines.append(f"{key}: {original.get(key)} -> {reproduced.get(key)}")
    base_a, base_b = original.get("models", {}).get("base"), reproduced.get("models", {}).get("base")
    if base_a != base_b:
        lines.append(f"base model: {json.dumps(base_a, sort_keys=True)} -> {json.dumps(base_b, sort_keys=True)}")
    return lines


def compare(original: dict[str, Any], reproduced: dict[str, Any]) -> list[Check]:
    a, b = outputs(original), outputs(reproduced)
    return [Check(stage, what, a.get((stage, what)), b.get((stage, what))) for stage, what in
            list(a) + [k for k in b if k not in a]]


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 16 else text[:12] + "…"


def format_comparison(run: str, into: str, checks: list[Check], inputs: list[str]) -> str:
    lines = [f"reproduce: {run} -> {into}",
             "inputs: " + ("the same packages, base model, Python and seeds" if not inputs else "; ".join(inputs)),
             "| stage | output | original | reproduced | match |", "|---|---|---|---|---|"]
    lines += [f"| {c.stage} | {c.what} | {_short(c.original)} | {_short(c.reproduced)} | "
              f"{'yes' if c.matches else '**no**'} |" for c in checks]
    differ = [f"{c.stage}/{c.what}" for c in checks if not c.matches]
    lines.append(f"every one of the {len(checks)} hashes matches" if not differ
                 else f"{len(differ)} of {len(checks)} differ: {', '.join(differ)}")
    return "\n".join(lines)


def reproduce(run: str, into: str | None = None) -> tuple[list[Check], list[str], str]:
    """Rerun RUN's card into ``into`` (default ``<RUN>-reproduced``); (checks, changed inputs, into)."""
    run = run.rstrip("/")
    original = read_card(run)
    into = (into or f"{run}-reproduced").rstrip("/")
    if into == run or exists(join_storage(into, CARD_FILE)):
        raise ReproduceError(f"{into} already holds a run: reproduce into an empty folder (--into)")
    cfg = PipelineConfig.model_validate({**original["config"], "run_dir": into})
    run_pipeline(cfg, until=original.get("until"))
    reproduced = read_card(into)
    return compare(original, reproduced), changed_inputs(original, reproduced), into

"""Running a study: corrupt (or plant controls), run the product's stages up to partition, measure.

corrupt -> prepare -> reference -> score -> partition -> report, every stage through ``pipeline.run_pipeline``
with its cache: a second mode with the same reference set reuses the reference model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data.readers import Record
from ..pipeline import run_pipeline
from ..store import run_root
from .corruption import corrupt_records, plant_controls, write_jsonl
from .errors import NoiseError
from .metrics import controls_report, recovery_report
from .token_view import TokenView, load_token_view, token_exact_marks


@dataclass
class NoiseRun:
    mode: str
    fraction: float
    report: dict[str, float]
    keys: dict[str, str]  # prepare / reference / score / partition keys
    view: TokenView
    seconds: dict[str, float]


def run_noise_recovery(cfg, reference: Sequence[Record], train: Sequence[Record], *, mode: str, fraction: float,
                       seed: int = 0) -> NoiseRun:
    """Corrupt ``fraction`` of ``train``, then the real prepare, reference, score and partition stages.

    ``cfg`` is a PipelineConfig; its ``data`` files are replaced by the two corpora written under
    ``<run_dir>/noise_inputs/``.  Every stage keeps its cache: a second mode with the same reference
    set reuses the reference model.
    """
    corrupted = corrupt_records(train, fraction, mode, seed)
    if corrupted.n_corrupted == 0:
        raise NoiseError(f"{mode} at fraction {fraction} corrupted no record")
    part, scores, keys, seconds = _prepare_to_partition(cfg, reference, corrupted.records, "reference_clean",
                                                        f"train_{mode}_{fraction:g}_seed{seed}")
    view = load_token_view(part.train_path, scores.dir, corrupted.bad_ids, token_exact_marks(cfg.model, corrupted))
    if not view.bad.any():
        raise NoiseError("no corrupted sample reached the token table (all dropped or truncated away?)")
    return NoiseRun(mode, fraction, recovery_report(view), keys, view, seconds)


def _prepare_to_partition(cfg, reference: Sequence[Record], train: Sequence[Record], ref_name: str, train_name: str):
    """The product's prepare, reference, score and partition stages (``run_pipeline(cfg, until="partition")``) on
    two corpora written under ``<run_dir>/noise_inputs/``. Returns (partition, scores, stage keys, stage seconds)."""
    inputs = run_root(cfg.run_dir) / "noise_inputs"
    ref_path = write_jsonl(reference, inputs / f"{ref_name}.jsonl")
    train_path = write_jsonl(train, inputs / f"{train_name}.jsonl")
    data = cfg.data.model_copy(update={"train_files": [str(train_path)], "reference_files": [str(ref_path)],
                                       "max_samples": None, "format": "jsonl"})
    # A study condition is not a product run: it opens no MLflow run (nor renders the audit page that a tracked
    # partition stage logs); its record is the study's tables.  run_pipeline still writes the condition's
    # <run_dir>/run_card.json, so a study wants a run_dir of its own.
    tracking = cfg.tracking.model_copy(update={"enabled": False})
    result = run_pipeline(cfg.model_copy(update={"data": data, "tracking": tracking}), until="partition")
    out = result.outputs
    keys = {stage: out[stage].key for stage in ("prepare", "reference", "score", "partition")}
    return out["partition"], out["score"], keys, dict(result.seconds)


@dataclass
class ControlRun:
    report: dict[str, Any]
    keys: dict[str, str]
    view: TokenView
    groups: dict[str, str]  # sample_id -> "planted" / "replaced"
    seconds: dict[str, float]


def run_positive_controls(cfg, reference: Sequence[Record], train: Sequence[Record], *, fraction: float = 0.25,
                          seed: int = 0, **phrases: str) -> ControlRun:
    """Plant the controls (:func:`plant_controls`), run prepare -> reference -> score -> partition, and measure
    them on the tokens the planting changed."""
    ref, planted, groups = plant_controls(reference, train, fraction=fraction, seed=seed, **phrases)
    part, scores, keys, seconds = _prepare_to_partition(cfg, ref, planted.records, f"reference_planted_seed{seed}",
                                                        f"train_controls_{fraction:g}_seed{seed}")
    view = load_token_view(part.train_path, scores.dir, planted.bad_ids, token_exact_marks(cfg.model, planted))
    return ControlRun(controls_report(view, groups, cfg.selection.rho), keys, view, groups, seconds)

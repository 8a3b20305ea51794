"""Tune maths without Ray: config validation of the ranges, the space hash guard, trial configs,
the online NLL, the validation split, the best-trial choice; and the run card."""

from __future__ import annotations

import json

import pytest

from forgetting_ray.config import ConfigError, PipelineConfig, load_config
from forgetting_ray.search import (
    SearchSpaceMismatch,
    TuneInputError,
    check_search_space,
    default_max_concurrent,
    in_validation,
    objective_mode,
    online_nll,
    pick_best,
    resolve_objective,
    space_hash,
    space_spec,
    trial_config,
)


@pytest.mark.parametrize("override, field", [
    ("tune.rho={low: 0.9, high: 0.5}", "tune.rho"),
    ("tune.rho={low: 0.5, high: 0.5}", "tune.rho"),
    ("tune.t_max={low: 0.4, high: 0.1}", "tune.t_max"),
    ("tune.t_min={low: 0.2, high: 0.2}", "tune.t_min"),
    ("tune.lr={low: 1.0e-3, high: 1.0e-5, log: true}", "tune.lr"),
    ("tune.rho={low: 0.0, high: 0.5}", "tune.rho"),
    ("tune.rho={low: 0.5, high: 1.5}", "tune.rho"),
    ("tune.lr={low: 0.0, high: 1.0e-3}", "tune.lr"),
    ("tune.lambda_schedules=[]", "tune.lambda_schedules"),
])
def test_bad_search_range_names_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f" {field}:" in str(e.value)


def test_objective_resolution():
    cfg = PipelineConfig()
    assert resolve_objective(cfg) == "eval_mean" and objective_mode("eval_mean") == "max"
    off = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"enabled": False})})
    assert resolve_objective(off) == "val_nll" and objective_mode("val_nll") == "min"
    no_val = off.model_copy(update={"tune": off.tune.model_copy(update={"val_fraction": 0.0})})
    with pytest.raises(TuneInputError, match="tune.val_fraction"):
        resolve_objective(no_val)


def test_space_hash_guard(tmp_path):
    cfg = PipelineConfig()
    spec = space_spec(cfg.tune)
    check_search_space(tmp_path, spec)  # first run records it
    check_search_space(tmp_path, spec)  # same space: a restart is fine
    relaxed = space_spec(cfg.tune.model_copy(update={"max_concurrent_trials": 3}))
    check_search_space(tmp_path, relaxed)  # concurrency is not part of the space
    changed = space_spec(load_config(None, ["tune.rho={low: 0.6, high: 0.95}"]).tune)
    with pytest.raises(SearchSpaceMismatch) as e:
        check_search_space(tmp_path, changed)
    msg = str(e.value)
    assert space_hash(spec) in msg and space_hash(changed) in msg and "tune.rho" in msg
    assert json.loads((tmp_path / "search_space.json").read_text())["hash"] == space_hash(spec)  # not overwritten


def test_trial_config_applies_and_clips():
    cfg = load_config(None, ["training.strategy=sft", "training.t_min=0.01"])
    t = trial_config(cfg, {"rho": 0.6, "lambda_schedule": "cosine", "t_max": 0.2, "t_min": 0.3, "lr": 5e-4},
                     report_every=3)
    assert t.selection.rho == 0.6 and t.training.lambda_schedule == "cosine" and t.training.lr == 5e-4
    assert t.training.t_max == 0.2 and t.training.t_min == 0.2  # clipped to t_max: a valid schedule
    assert t.training.strategy == "forgetting" and t.training.report_every == 3
    assert cfg.selection.rho == 0.7 and cfg.training.strategy == "sft"  # base untouched
    keep = trial_config(cfg, {"rho": 0.8, "t_max": 0.3, "lambda_schedule": "linear"})
    assert keep.training.t_min == 0.01 and keep.training.lr == cfg.training.lr


def test_online_nll_weights_classes_by_count():
    assert online_nll({"pos_nll": 2.0, "neg_nll": 5.0, "n_pos": 3, "n_neg": 1}) == pytest.approx(2.75)
    assert online_nll({"pos_nll": 2.0, "neg_nll": 0.0, "n_pos": 4, "n_neg": 0}) == pytest.approx(2.0)
    assert online_nll({"pos_nll": 0.0, "neg_nll": 0.0, "n_pos": 0, "n_neg": 0}) is None


def test_validation_split_is_seeded_and_sized():
    ids = [f"{i:016x}" for i in range(4000)]
    a = in_validation(ids, 0.1, seed=1)
    assert a.tolist() == in_validation(list(reversed(ids)), 0.1, seed=1)[::-1].tolist()  # by id, not position
    assert 0.08 < a.mean() < 0.12
    assert (a != in_validation(ids, 0.1, seed=2)).any()
    assert not in_validation(ids, 0.0, seed=1).any()


def test_pick_best():
    trials = [{"trial_id": "a", "objective": 2.0}, {"trial_id": "b", "objective": None},
              {"trial_id": "c", "objective": 1.5}, {"trial_id": "d", "objective": float("nan")}]
    assert pick_best(trials, "min")["trial_id"] == "c"
    assert pick_best(trials, "max")["trial_id"] == "a"
    assert pick_best([{"trial_id": "x", "objective": None}], "min") is None


def test_default_max_concurrent():
    cfg = load_config(None, ["resources.num_workers=2", "resources.cpus_per_worker=1"])
    assert default_max_concurrent(cfg, {"CPU": 16}) == 7  # 2.1 CPUs per trial
    assert default_max_concurrent(cfg, {"CPU": 1}) == 1
    gpu = load_config(None, ["resources.num_workers=2", "resources.use_gpu=true"])
    assert default_max_concurrent(gpu, {"CPU": 64, "GPU": 8}) == 4


def test_run_card(tmp_path):
    from types import SimpleNamespace

    from forgetting_ray.runcard import RunCard

    cfg = load_config(None, [f"run_dir={tmp_path}", "tune.seed=7"])
    (tmp_path / "train.parquet").write_bytes(b"abc")
    export = tmp_path / "export"
    (export / "merged").mkdir(parents=True)
    (export / "merged" / "model.safetensors").write_bytes(b"weights")
    card = RunCard(cfg)
    card.add_data(SimpleNamespace(key="k1", train_path=tmp_path / "train.parquet",
                                  reference_path=tmp_path / "missing.parquet", manifest_path=tmp_path / "train.parquet"))
    card.add_model("train", export)
    data = json.loads(card.write().read_text())
    assert data["data"]["train_table"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert data["data"]["reference_table"] is None
    assert len(data["models"]["train"]["sha256"]) == 64 and data["models"]["train"]["uri"].startswith("file://")
    assert data["seeds"]["tune.seed"] == 7 and data["packages"]["torch"] and data["packages"]["ray"]
    (export / "merged" / "model.safetensors").write_bytes(b"other")
    card.add_model("train", export)
    assert card.card["models"]["train"]["sha256"] != data["models"]["train"]["sha256"]


def test_unreachable_tracking_server_fails_before_any_compute(tmp_path):
    from forgetting_ray.pipeline import run_pipeline
    from forgetting_ray.tracking import TrackingError

    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run_dir}", "tracking.tracking_uri=http://127.0.0.1:9", "tune.enabled=true",
                             "model.name_or_path=/nonexistent/model"])
    with pytest.raises(TrackingError, match="unreachable"):
        run_pipeline(cfg, until="tune")
    assert not run_dir.exists()  # nothing prepared, no run card


def test_tune_stage_needs_tune_enabled(tmp_path):
    from forgetting_ray.pipeline import run_pipeline

    with pytest.raises(ValueError, match="tune.enabled"):
        run_pipeline(load_config(None, [f"run_dir={tmp_path}"]), until="tune")


def test_search_that_cannot_run_fails_before_tracking(tmp_path):
    from forgetting_ray.pipeline import run_pipeline

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "tune.enabled=true", "eval.enabled=false",
                             "tune.val_fraction=0"])
    with pytest.raises(TuneInputError, match="tune.val_fraction"):
        run_pipeline(cfg, until="tune")
    assert not (tmp_path / "run").exists()

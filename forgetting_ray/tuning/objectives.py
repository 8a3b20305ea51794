"""What a Tune trial reports once it has trained: the objective the search compares trials on.

* ``val_nll``: the mean NLL of every response token of the held-out validation split under the trial's
  exported model (:func:`validation_nll`, on :func:`forgetting_ray.scoring.response_token_nlls`);
* ``eval_mean``: the mean eval score of the exported model on a seeded dev subset of the benchmarks.

Either way the last report also carries ``online_nll`` over the trial's last two training reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from ..cluster.capacity import gpu_node_resources
from ..config import ModelConfig, PipelineConfig
from ..data.batching import plan_batches
from ..models import load_model, load_tokenizer
from ..scoring import response_token_nlls
from ..search import OBJECTIVE_METRIC, ONLINE_METRIC, TuneInputError, online_nll
from ..stages.evaluate import resolve_eval_model, run_eval
from ..stages.train import FinetuneResult
from ..store import local_copy, portable
from ..tracking import Tracker


def validation_nll(model_dir: str, val_table: str, *, model_cfg: ModelConfig, batch_tokens: int,
                   chunk_size: int | None = None) -> dict[str, float]:
    """Mean NLL of every response token of ``val_table`` under the model in ``model_dir`` (either may be a
    URI: this may run as a GPU task on a node that sees the run only through its bucket).

    The rows go in batches of at most ``batch_tokens`` padded tokens (scoring's budget), and the tokens'
    NLLs are summed in float64."""
    path = resolve_eval_model(local_copy(model_dir))
    mc = model_cfg.model_copy(update={"name_or_path": path, "tokenizer": None, "revision": None})
    tok = load_tokenizer(mc)
    model = load_model(mc, device="cuda" if torch.cuda.is_available() else "cpu")
    rows = pq.read_table(val_table, columns=["input_ids", "labels"]).to_pylist()
    batches = plan_batches(np.array([len(r["input_ids"]) for r in rows]), batch_tokens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    nlls = response_token_nlls(model, rows, pad, batches=batches, chunk_size=chunk_size)
    count = sum(x.size for x in nlls)
    if count == 0:
        raise TuneInputError(f"validation split {val_table} has no response tokens")
    return {"val_nll": float(np.concatenate(nlls).sum(dtype=np.float64)) / count, "val_tokens": count}


def val_nll_objective(ctx: dict[str, Any], base: PipelineConfig, res: FinetuneResult) -> dict[str, Any]:
    kwargs = {"model_cfg": base.model, "batch_tokens": base.scoring.batch_tokens,
              "chunk_size": base.scoring.chunk_size}
    if base.eval.num_gpus_per_actor > 0:  # a GPU task outside the trial's 0.1-CPU placement group
        # ray is imported where a search uses it: it takes seconds, and the pipeline imports this module
        # for runs without a search too.
        import ray

        task = ray.remote(validation_nll).options(num_cpus=base.eval.num_cpus_per_actor,
                                                    num_gpus=base.eval.num_gpus_per_actor,
                                                    resources=gpu_node_resources(base.resources,
                                                                                 base.eval.num_gpus_per_actor),
                                                    scheduling_strategy="DEFAULT")
        v = ray.get(task.remote(portable(res.export_dir), portable(ctx["val_table"]), **kwargs))
    else:  # on CPU here: the trial process has torch loaded and its fit has released the workers
        v = validation_nll(str(res.export_dir), str(ctx["val_table"]), **kwargs)
    return {**v, OBJECTIVE_METRIC: v["val_nll"]}


def eval_objective(ctx: dict[str, Any], cfg: PipelineConfig, res: FinetuneResult, folder: Path,
                   trial_id: str) -> dict[str, Any]:
    ecfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
        "limit": float(ctx["eval_limit"]), "limit_mode": "random"})})
    # the trial reports its eval numbers through Tune; the driver logs them (MLflow is reached from there only)
    ev = run_eval(ecfg, str(res.export_dir), folder / "eval" / trial_id, tracker=Tracker.disabled())
    out: dict[str, Any] = {f"eval.{k}": v for k, v in ev.headline.items()}
    # the mean over the tasks this search evaluates (ev.average is None unless all five ran)
    out["eval_mean"] = float(np.mean([ev.headline[task] for task in cfg.eval.tasks]))
    out[OBJECTIVE_METRIC] = out["eval_mean"]
    return out


def final_metrics(ctx: dict[str, Any], base: PipelineConfig, cfg: PipelineConfig, res: FinetuneResult,
                  folder: Path, trial_id: str) -> dict[str, Any]:
    """The trial's last report: the objective, and the online NLL of its last two training reports."""
    final: dict[str, Any] = {"step": res.total_steps, "trained": 1}
    if ctx["objective"] == "val_nll":
        final.update(val_nll_objective(ctx, base, res))
    else:
        final.update(eval_objective(ctx, cfg, res, folder, trial_id))
    online = [online_nll(m) for m in res.metrics[-2:]]
    online = [x for x in online if x is not None]
    if online:
        final[ONLINE_METRIC] = float(np.mean(online))
    return final

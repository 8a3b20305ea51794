"""Stage recipe: the reference SFT (stage 1) and the forgetting fine-tune (stage 4) on Ray Train.

resolve inputs (table, model, LoRA targets, storage) -> key the output by everything that changes
the numbers -> build Ray Data datasets and the TorchTrainer -> fit (resuming from Ray storage when
this run was interrupted) -> write result.json + metrics.jsonl and mark the stage complete.

The per-worker maths lives in ``forgetting_ray.train.loop``; this module is the only Ray glue.  The
workers get what they need as one typed :class:`~forgetting_ray.train.loop.FinetuneJob`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..cluster.capacity import check_worker_group, placement_timeout_error, worker_bundle
from ..cluster.relay import step_relay
from ..cluster.session import default_storage_path, init_ray
from ..config import FinetuneConfig, PipelineConfig, ReferenceConfig, TrainingConfig, config_to_dict
from ..errors import UserError
from ..exports import model_identity
from ..faults import TRAIN_FAULT_ENV, parse_train_fault
from ..models import load_tokenizer, portable_model_ref, resolve_model_path
from ..store import (
    atomic_write_json,
    atomic_write_text,
    content_hash,
    fetch,
    file_sha256,
    is_complete,
    join_storage,
    mark_complete,
    StorageNotWritable,
    portable,
    probe_storage,
    stage_dir,
)
from ..train.checkpoint import fingerprint, fingerprint_parts, read_state
from ..train.deepspeed_setup import LoraTargetError, build_deepspeed_config, meta_model, resolve_lora_targets
from ..train.data_plan import DataPlan
from ..train.loop import FinetuneJob, columns_for, strategy_of, train_loop_per_worker

if TYPE_CHECKING:  # pragma: no cover
    from ray.train import Result

log = logging.getLogger(__name__)

Stage = Literal["reference", "train"]
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"


class FinetuneInputError(UserError, ValueError):
    """Bad input found before any worker starts (table, model, LoRA targets, storage)."""


@dataclass
class FinetuneResult:
    stage: str
    key: str
    out_dir: Path
    export_dir: Path | None
    checkpoint_path: str | None  # latest Ray Train checkpoint (DeepSpeed shards + state)
    total_steps: int
    global_step: int
    stop_reason: str | None  # set when the guardrail stopped the run
    resumed_at: list[int] = field(default_factory=list)
    guardrail_events: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per optimizer step
    nodes: list[str] = field(default_factory=list)  # Ray node id of each rank (of the last fit)
    # each rank's peak resident memory in the fit (before the export), and including the export
    peak_rss_bytes: list[int] = field(default_factory=list)
    export_peak_rss_bytes: list[int] = field(default_factory=list)

    @property
    def final_metrics(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("metrics")
        d["out_dir"] = str(self.out_dir)
        d["export_dir"] = str(self.export_dir) if self.export_dir else None
        return d


# ------------------------------------------------------------------------------------------
# input checks (driver side, before Ray)
# ------------------------------------------------------------------------------------------
def table_files(table: str | Path) -> list[Path]:
    p = Path(table)
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise FinetuneInputError(f"token table folder {p} holds no *.parquet files")
        return files
    if not p.is_file():
        raise FinetuneInputError(f"token table {p} does not exist")
    return [p]


def check_table(files: list[Path], strategy: str, *, shuffle: bool) -> int:
    """Required columns present in every file; returns the row count."""
    need = ["input_ids", "labels"] + (["token_class"] if strategy in ("forgetting", "ignore") else [])
    if shuffle:
        need.append("sample_id")  # the seeded order is keyed by sample id
    rows = 0
    for f in files:
        try:
            schema = pq.read_schema(f)
            rows += pq.ParquetFile(f).metadata.num_rows
        except Exception as e:  # noqa: BLE001 - any unreadable file is a bad input
            raise FinetuneInputError(f"{f}: not a readable parquet file: {e}") from e
        for col in need:
            if col not in schema.names:
                hint = (" (run the partition stage first: it adds token_class)" if col == "token_class" else "")
                raise FinetuneInputError(
                    f"{f}: column {col!r} is missing, strategy {strategy!r} needs it{hint}; "
                    f"columns present: {', '.join(schema.names)}"
                )
    if rows == 0:
        raise FinetuneInputError(f"token table {files[0].parent} has no rows")
    return rows


def check_storage(path: str | Path) -> str:
    """Create the Ray Train storage (a folder, or an object-storage URI such as ``s3://bucket/prefix``) and
    prove it is writable, before any worker starts. Returns it as Ray Train gets it."""
    try:
        return probe_storage(path)
    except StorageNotWritable as e:
        raise FinetuneInputError(
            f"Ray Train storage path {e.target} is not writable ({e.reason}): resources.storage_path (default "
            "<run_dir>/ray_storage) must be a folder or bucket every node writes; "
            "for s3:// set AWS_ENDPOINT_URL (S3-compatible servers) and credentials (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or the instance profile)"
        ) from None


def check_lora_targets(model_path: str, ft: FinetuneConfig, trust_remote_code: bool) -> None:
    if not ft.lora.enabled:
        return
    try:
        resolve_lora_targets(meta_model(model_path, trust_remote_code=trust_remote_code), ft.lora.target_modules)
    except LoraTargetError as e:
        raise FinetuneInputError(f"model {model_path}: {e}") from e


def _order_key(batch, *, seed: int, epoch: int):
    """Seeded shuffle key from the sample id: the order depends on the data, never on block layout."""
    ids = batch.column("sample_id").to_pylist()
    keys = [int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{s}".encode(), digest_size=8).digest(), "big") >> 1
            for s in ids]
    return batch.append_column("_order", pa.array(np.asarray(keys, dtype=np.int64)))


# ------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Inputs:
    """The checked inputs of a fine-tune."""

    table: str
    files: list[Path]
    plan: DataPlan
    model_path: str
    tokenizer_path: str
    pad_token_id: int


@dataclass(frozen=True)
class _RunIdentity:
    table_hash: str
    parts: dict[str, Any]  # what checkpoints must share
    run_name: str  # same inputs -> same run -> Ray resumes its latest checkpoint
    key: str  # names the output folder


def run_finetune(cfg: PipelineConfig, stage: Stage, table: str | Path, out_dir: str | Path | None = None, *,
                 inject_fault: str | None = None, callbacks: list[Any] | None = None,
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``table`` with Ray Train; ``stage`` picks cfg.reference or cfg.training.

    The reference stage is plain SFT; the train stage uses ``cfg.training.strategy``.  Rerunning with
    the same inputs returns the finished result without training; an interrupted run resumes from
    its latest checkpoint in Ray storage.  ``inject_fault`` (recovery tests; default
    $FORGETTING_RAY_INJECT_FAULT): ``rank=R,after_step=K,marker=PATH`` makes rank R exit once after step K.
    ``callbacks``: Ray Train ``UserCallback``s for the fit (a Tune trial passes one that forwards each
    report to Tune, so ASHA can stop it early).  ``on_step``: called in this process with each optimizer
    step's metrics while the fit runs (the pipeline logs them to MLflow live); not called for a finished run.
    """
    ft = _finetune_config(cfg, stage)
    inputs = _check_inputs(cfg, ft, table)
    run = _identify(cfg, stage, ft, inputs)
    out = Path(out_dir) if out_dir is not None else stage_dir(cfg.run_dir, stage, run.key)
    if is_complete(out) and (out / RESULT_FILE).is_file():
        log.info("%s stage %s already complete in %s", stage, run.key, out)
        return load_result(out)
    if ft.resume_from:
        read_state(ft.resume_from, run.parts)  # a foreign checkpoint fails here, before any worker starts
    storage = check_storage(cfg.resources.storage_path or default_storage_path(cfg.run_dir))

    ray = init_ray(cfg.resources.ray_address)
    check_worker_group(ray, cfg.resources, error=FinetuneInputError)
    datasets = _datasets(inputs, ft)
    with step_relay(_with_progress(on_step, f"{stage} {run.key}", inputs.plan.total_steps)) as relay:
        job = _worker_job(cfg, stage, ft, inputs, run, out, join_storage(storage, run.run_name), inject_fault, relay)
        result = _fit(cfg, ft, job, datasets, storage, run.run_name, callbacks)

    finished = _finished(result, stage, run.key, out, inputs.plan)
    _write_outputs(finished)
    return finished


def _with_progress(on_step: Callable[[dict[str, Any]], None] | None, desc: str,
                   total: int) -> Callable[[dict[str, Any]], None] | None:
    """``on_step`` that also moves a progress bar of optimizer steps (loss and lambda beside it)."""
    if on_step is None:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", mininterval=1.0, dynamic_ncols=True)

    def step(row: dict[str, Any]) -> None:
        on_step(row)
        bar.update(max(0, int(row.get("step", 0)) - bar.n))
        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", lam=f"{row.get('lambda', 0.0):.3g}", refresh=False)
        if bar.n >= total:
            bar.close()

    return step


def _finetune_config(cfg: PipelineConfig, stage: Stage) -> ReferenceConfig | TrainingConfig:
    if stage not in ("reference", "train"):
        raise ValueError(f"stage must be 'reference' or 'train', got {stage!r}")
    return cfg.reference if stage == "reference" else cfg.training


def _check_inputs(cfg: PipelineConfig, ft: FinetuneConfig, table: str | Path) -> _Inputs:
    """Table, data plan, DeepSpeed settings, model and LoRA targets: every input error before Ray starts."""
    res = cfg.resources
    files = table_files(table)
    num_rows = check_table(files, strategy_of(ft), shuffle=ft.shuffle)
    plan = DataPlan.of(ft, num_rows, res.num_workers)
    try:
        plan.check(str(table))
    except ValueError as e:
        raise FinetuneInputError(str(e)) from None
    if ft.deepspeed.enabled:
        try:
            build_deepspeed_config(ft, world_size=res.num_workers, bf16=res.use_gpu)
        except ValueError as e:
            raise FinetuneInputError(str(e)) from None
    model_path = resolve_model_path(cfg.model)
    check_lora_targets(model_path, ft, cfg.model.trust_remote_code)
    tok = load_tokenizer(cfg.model.model_copy(update={"name_or_path": model_path}))
    return _Inputs(table=str(table), files=files, plan=plan, model_path=model_path,
                   tokenizer_path=cfg.model.tokenizer or model_path, pad_token_id=tok.pad_token_id)


def _identify(cfg: PipelineConfig, stage: Stage, ft: FinetuneConfig, inputs: _Inputs) -> _RunIdentity:
    """Key the run by everything that changes the numbers (and the output also by the export settings)."""
    table_hash = content_hash([(f.name, file_sha256(f)) for f in inputs.files])
    model = model_identity(inputs.model_path, revision=cfg.model.revision, tokenizer=inputs.tokenizer_path)
    parts = fingerprint_parts(stage=stage, finetune=config_to_dict(ft), model=model,
                              table_hash=table_hash, world_size=cfg.resources.num_workers)
    run_id = fingerprint(parts)
    key = content_hash({"run": run_id, "export": ft.export, "export_dtype": ft.export_dtype,
                        "export_max_shard_size": ft.export_max_shard_size})
    return _RunIdentity(table_hash=table_hash, parts=parts, run_name=f"{stage}-{run_id}", key=key)


def _datasets(inputs: _Inputs, ft: FinetuneConfig) -> dict[str, Any]:
    """One Ray dataset per epoch in its seeded order when shuffling, else one in file order."""
    # ray stays lazy: it takes seconds to import, and a stage found complete returns without it
    import ray.data

    # The token columns go into the object store once, from the driver: no read tasks per worker
    # (their start-up cost 10-30 s per fit on a busy 2-core box) and no shared filesystem needed
    # on multi-node clusters.  Token ids are small next to the model (50k x 2k tokens ~ 0.9 GB).
    columns = list(columns_for(strategy_of(ft)))
    if ft.shuffle:
        # Sorted here, not by a Ray Data sort: its tasks need a free CPU, and workers that hold every CPU of
        # the cluster (cpus_per_worker = the node's CPUs) would wait for one forever.  One copy per epoch.
        table = pa.concat_tables([pq.read_table(f, columns=columns + ["sample_id"]) for f in inputs.files])
        datasets = {
            f"train_{e}": ray.data.from_arrow(_order_key(table, seed=ft.seed, epoch=e).sort_by("_order"))
            for e in range(inputs.plan.num_epochs)
        }
    else:
        datasets = {"train": ray.data.from_arrow([pq.read_table(f, columns=columns) for f in inputs.files])}
    for ds in datasets.values():
        ds.context.enable_progress_bars = False  # one bar per worker per epoch floods the driver log
    return datasets


def _worker_job(cfg: PipelineConfig, stage: Stage, ft: ReferenceConfig | TrainingConfig, inputs: _Inputs,
                run: _RunIdentity, out: Path, run_storage: str, inject_fault: str | None,
                relay: str | None = None) -> FinetuneJob:
    res = cfg.resources
    fault = parse_train_fault(inject_fault or os.environ.get(TRAIN_FAULT_ENV))
    if fault:
        fault["run_storage"] = run_storage
    return FinetuneJob(
        stage=stage,
        finetune=ft,
        fingerprint_parts=run.parts,
        num_rows=inputs.plan.num_rows,
        table=inputs.table,
        model_path=portable_model_ref(inputs.model_path),  # workers may run on nodes without the driver's files
        tokenizer_path=portable_model_ref(inputs.tokenizer_path),
        pad_token_id=inputs.pad_token_id,
        trust_remote_code=cfg.model.trust_remote_code,
        use_gpu=res.use_gpu,
        torch_threads=max(1, int(res.cpus_per_worker)),
        chunk_size=cfg.scoring.chunk_size,
        export_dir=portable((out / "export").resolve()) if ft.export else None,
        train_config={"stage": stage, "strategy": strategy_of(ft), "finetune": config_to_dict(ft),
                      "model": config_to_dict(cfg.model), "table": inputs.table, "table_hash": run.table_hash,
                      "key": run.key, "num_workers": res.num_workers,
                      "base_identity": run.parts["model"]},  # exports.check_export_base compares it
        fault=fault,
        step_relay=relay,
        system_metrics=cfg.tracking.system_metrics,
        attn_implementation=cfg.model.attn_implementation,
        dtype=cfg.model.dtype,
        cpu_stands_in=res.cpu_stands_in_for_gpu,
    )


def _fit(cfg: PipelineConfig, ft: FinetuneConfig, job: FinetuneJob, datasets: dict[str, Any], storage: str,
         run_name: str, callbacks: list[Any] | None) -> "Result":
    """Build the TorchTrainer and fit; Ray resumes the run named ``run_name`` from its latest checkpoint."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = cfg.resources
    # Ray Train retries a worker group it could not place forever (controller_failure_limit -1): bound the wait
    # to one start attempt of placement_timeout_s; the variable reaches the controller (Ray propagates it)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{res.placement_timeout_s:g}"
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # every worker must see the rows in the same, fixed order
    per_worker = worker_bundle(res)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_loop_config(),
        # GPU workers rehearsed on CPUs (resources.cpu_stands_in_for_gpu) need gloo; None: Ray's choice (NCCL on GPUs)
        torch_config=TorchConfig(backend="gloo" if res.use_gpu and res.cpu_stands_in_for_gpu else None),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=ft.keep_checkpoints),
            failure_config=FailureConfig(max_failures=ft.max_failures, controller_failure_limit=0),
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
    )
    from ray.train import ControllerError

    try:
        return trainer.fit()
    except ControllerError as e:
        if type(e.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
            raise
        import ray

        gpu = " and 1 GPU" if res.use_gpu else ""
        raise placement_timeout_error(f"{run_name}: {res.num_workers} training worker(s) of "
                                      f"{res.cpus_per_worker:g} CPU{gpu} each", "resources.num_workers or "
                                      "resources.cpus_per_worker", res.placement_timeout_s, ray) from None


def _finished(result: "Result", stage: str, key: str, out: Path, plan: DataPlan) -> FinetuneResult:
    """The fit's outcome, from rank 0's return value and Ray's latest checkpoint."""
    rv = result.return_value or {}
    state = rv.get("state", {})
    return FinetuneResult(
        stage=stage,
        key=key,
        out_dir=out,
        # rank 0 wrote it where the run is stored (perhaps a bucket): make it present here too
        export_dir=fetch(out / "export") if rv.get("export_dir") else None,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        total_steps=int(rv.get("total_steps", plan.total_steps)),
        global_step=int(state.get("global_step", 0)),
        stop_reason=state.get("stop_reason"),
        resumed_at=list(state.get("resumed_at", [])),
        guardrail_events=list(state.get("guardrail", {}).get("events", [])),
        metrics=list(rv.get("history", [])),
        nodes=list(rv.get("nodes", [])),
        peak_rss_bytes=list(rv.get("peak_rss_bytes", [])),
        export_peak_rss_bytes=list(rv.get("export_peak_rss_bytes", [])),
    )


def _write_outputs(finished: FinetuneResult) -> None:
    """metrics.jsonl and result.json, then the completion marker that makes a rerun a no-op."""
    out = finished.out_dir
    atomic_write_text(out / METRICS_FILE, "".join(json.dumps(m, sort_keys=True) + "\n" for m in finished.metrics))
    atomic_write_json(out / RESULT_FILE, finished.to_json())
    if finished.stop_reason:
        log.warning("%s stage stopped early: %s", finished.stage, finished.stop_reason)
    mark_complete(out, {"stage": finished.stage, "key": finished.key, "stop_reason": finished.stop_reason,
                        "exported": finished.export_dir is not None})


def load_result(out_dir: str | Path) -> FinetuneResult:
    out = Path(out_dir)
    d = json.loads((out / RESULT_FILE).read_text())
    metrics_path = out / METRICS_FILE
    lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    metrics = [json.loads(x) for x in lines if x.strip()]
    return FinetuneResult(
        stage=d["stage"], key=d["key"], out_dir=out,  # where it is now (a mirror may sit elsewhere on each node)
        export_dir=out / "export" if d.get("export_dir") else None,
        checkpoint_path=d.get("checkpoint_path"), total_steps=d["total_steps"], global_step=d["global_step"],
        stop_reason=d.get("stop_reason"), resumed_at=d.get("resumed_at", []),
        guardrail_events=d.get("guardrail_events", []), metrics=metrics, nodes=d.get("nodes", []),
        peak_rss_bytes=d.get("peak_rss_bytes", []), export_peak_rss_bytes=d.get("export_peak_rss_bytes", []),
    )


def model_params(cfg: PipelineConfig, stage: str, reference: Path | None = None) -> dict[str, Any]:
    """A fine-tune as its LoggedModel's parameters say it: the method's knobs (strategy, rho, the lambda
    schedule) for the train stage, and for every fine-tune its base, reference, seed and adapter."""
    ft = cfg.reference if stage == "reference" else cfg.training
    params: dict[str, Any] = {"stage": stage, "base": cfg.model.name_or_path, "seed": ft.seed, "lr": ft.lr,
                              "lora_r": ft.lora.r if ft.lora.enabled else "full"}
    if stage == "reference":
        return params | {"strategy": "sft", "data": "reference split"}
    params |= {"strategy": ft.strategy, "reference": portable(reference) if reference else None}
    if ft.strategy != "sft":
        params |= {"rho": cfg.selection.rho}
    if ft.strategy == "forgetting":
        params |= {"lambda_schedule": ft.lambda_schedule, "t_min": ft.t_min, "t_max": ft.t_max,
                   "forget_loss": ft.forget_loss}
    return {k: v for k, v in params.items() if v is not None}

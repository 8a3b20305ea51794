"""The per-worker training loop of the reference and forgetting fine-tunes (Ray Train).

Reads top to bottom (``train_loop_per_worker``): validate the :class:`FinetuneJob` -> set up the
engine -> restore -> for each optimizer step: fetch ``grad_accum`` micro-batches -> (global
normalisation: all-reduce the step's class counts) -> forward/backward each -> step -> all-reduce
metrics -> guardrail -> report (+ checkpoint) -> export.

Data order is reproducible by construction: every worker iterates the *whole* table in a fixed
order (``preserve_order``; a seeded sort for shuffling) in global micro-batches of
``micro_batch_size * world`` rows and keeps rows ``rank::world``.  Ray Train's default
``streaming_split`` hands blocks to whichever worker asks first, which is not reproducible, and
it cannot skip to a resume position.  The price is that each worker reads every row (token ids
only; cheap next to the forward pass).

Pure helpers (``prepare_micro_batch``, ``class_counts``, ``loss_multiplier``; ``DataPlan`` in
``data_plan.py``, ``Guardrail`` in ``guardrail.py``) carry the maths and are unit-tested without Ray.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from ..cluster.devices import PeakMemory
from ..config import FinetuneConfig, ReferenceConfig, TrainingConfig
from ..constants import IGNORE_INDEX
from ..data.collate import collate
from ..exports import MANIFEST
from ..faults import maybe_crash_after_step
from ..losses import classes_from_labels, forgetting_loss, lambda_schedule
from ..models import load_tokenizer, resolve_model_path, stage_device
from ..store import cache_root, content_hash, is_uri, upload_tree
from .checkpoint import TrainState, checkpoint_tag, read_state, write_state
from .data_plan import DataPlan, rank_rows
from .deepspeed_setup import DDPRunner, Runner, create_runner
from .export import export_model
from .guardrail import GUARDRAIL_CODES, Guardrail

COLUMNS_WITH_CLASS = ("input_ids", "labels", "token_class")
COLUMNS_NO_CLASS = ("input_ids", "labels")


# ------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------
def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout RNG per (step, rank): a resumed run draws exactly what the uninterrupted one drew."""
    return (seed * 1_000_003 + step * 10_007 + rank) % (2**63 - 1)


def prepare_micro_batch(batch: dict[str, torch.Tensor], strategy: str) -> dict[str, torch.Tensor]:
    """Add the class column the loss needs, and keep the graph connected when nothing is trained.

    sft (and the reference model) trains every response token: classes come from the labels.  A
    micro-batch without any label would give a loss with no gradient path, and a rank that skips
    backward deadlocks the others' all-reduce; one class-0 label keeps it a zero-gradient step.
    """
    labels = batch["labels"]
    if strategy == "sft" or "token_class" not in batch:
        if strategy != "sft":
            raise ValueError(f"strategy {strategy!r} needs a token_class column")
        cls = classes_from_labels(labels)
    else:
        cls = batch["token_class"]
    out = dict(batch, token_class=cls)
    if not bool((labels != IGNORE_INDEX).any()):
        labels = labels.clone()
        labels[0, 1] = batch["input_ids"][0, 1]  # class stays 0: weighted by zero
        out["labels"] = labels
    return out


def class_counts(token_class: torch.Tensor, strategy: str) -> tuple[int, int]:
    """(#positive, #negative) as the loss counts them (sft counts every response token positive)."""
    pos, neg = int((token_class > 0).sum()), int((token_class < 0).sum())
    if strategy == "sft":
        return pos + neg, 0
    return pos, neg


def loss_multiplier(normalization: str, grad_accum: int, world_size: int) -> float:
    """Factor applied before backward, given that both engines average gradients over ranks.

    micro_batch: the paper averages micro-batch losses over accumulation and devices -> 1/GA.
    global: each micro-batch loss is already Sum/N_global, so the step must *sum* them -> x world.
    """
    return 1.0 / grad_accum if normalization == "micro_batch" else float(world_size)


# ------------------------------------------------------------------------------------------
# the job: what the driver hands every worker
# ------------------------------------------------------------------------------------------
def strategy_of(ft: FinetuneConfig) -> str:
    """The loss a fine-tune trains with: the reference model is plain SFT."""
    return ft.strategy if isinstance(ft, TrainingConfig) else "sft"


def columns_for(strategy: str) -> tuple[str, ...]:
    """Token-table columns a strategy reads (sft takes its classes from the labels)."""
    return COLUMNS_NO_CLASS if strategy == "sft" else COLUMNS_WITH_CLASS


class FinetuneJob(BaseModel):
    """Everything a worker needs, typed.  Ray's ``train_loop_config`` must be a dict, so the job
    crosses as its JSON dump (:meth:`to_loop_config`) and is validated once on the worker
    (:meth:`from_loop_config`), ``finetune`` into the class of ``stage``.

    The reference stage's :class:`ReferenceConfig` has no strategy, normalisation or guardrail
    fields: the properties below give it plain SFT's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Literal["reference", "train"]  # declared before finetune: it picks finetune's class
    finetune: TrainingConfig | ReferenceConfig
    fingerprint_parts: dict[str, Any]  # what a checkpoint must share with this run
    num_rows: int
    table: str  # names the data in errors; the rows come from Ray Data
    model_path: str
    tokenizer_path: str
    pad_token_id: int
    trust_remote_code: bool = False
    use_gpu: bool
    torch_threads: int
    chunk_size: int | None  # None: token_nll sizes the chunks from the vocabulary
    export_dir: str | None = None  # None: no export
    train_config: dict[str, Any]  # recorded in the export manifest
    fault: dict[str, Any] | None = None  # faults.parse_train_fault's one-shot crash (recovery tests)
    step_relay: str | None = None  # named actor rank 0 sends each step's metrics to (cluster.relay.step_relay)
    system_metrics: bool = False  # rank 0 adds its CPU, memory and GPU memory to each step's metrics
    attn_implementation: str | None = None  # model.attn_implementation
    dtype: str = "auto"  # model.dtype: the compute precision (bfloat16 = bf16 mixed precision over fp32 masters)
    cpu_stands_in: bool = False  # resources.cpu_stands_in_for_gpu

    @field_validator("finetune", mode="before")
    @classmethod
    def _finetune_of_stage(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, dict):
            return (TrainingConfig if info.data.get("stage") == "train" else ReferenceConfig).model_validate(value)
        return value

    @classmethod
    def from_loop_config(cls, config: dict[str, Any]) -> "FinetuneJob":
        return cls.model_validate(config)

    def to_loop_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def strategy(self) -> str:
        return strategy_of(self.finetune)

    @property
    def normalization(self) -> str:
        return self.finetune.normalization if isinstance(self.finetune, TrainingConfig) else "micro_batch"

    @property
    def forget_loss(self) -> str:
        return self.finetune.forget_loss if isinstance(self.finetune, TrainingConfig) else "nll"

    @property
    def columns(self) -> tuple[str, ...]:
        return columns_for(self.strategy)

    def lambda_of_step(self, total_steps: int) -> Callable[[int], float]:
        """lambda(k) of the forgetting term; 0 for the strategies without one."""
        ft = self.finetune
        if isinstance(ft, TrainingConfig) and ft.strategy == "forgetting":
            return lambda_schedule(ft.lambda_schedule, t_max=ft.t_max, t_min=ft.t_min, total_steps=total_steps)
        return lambda k: 0.0

    def guardrail(self) -> Guardrail:
        ft = self.finetune
        if isinstance(ft, TrainingConfig):
            return Guardrail(ft.guardrail_neg_nll_max, ft.guardrail_pos_nll_factor, ft.guardrail_action)
        return Guardrail()  # no bounds: only a non-finite loss stops the reference SFT


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def _list_column(tbl, name: str) -> list[np.ndarray]:
    col = tbl.column(name)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    if not flat.flags.writeable:  # zero-copy Arrow memory; torch wants writable arrays
        flat = flat.copy()
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def micro_batches(iterator, plan: DataPlan, *, rank: int, skip: int, columns: tuple[str, ...],
                  pad_token_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's collated micro-batches of one epoch, after skipping ``skip`` global ones."""
    for i, tbl in enumerate(iterator.iter_batches(batch_size=plan.global_batch_rows, batch_format="pyarrow",
                                                  drop_last=False, prefetch_batches=2)):
        if i >= plan.micro_batches_per_epoch:
            return
        if i < skip:
            continue  # resume: already trained on
        mine = tbl.take(rank_rows(tbl.num_rows, rank, plan.world_size))
        yield collate({c: _list_column(mine, c) for c in columns}, pad_token_id, pad_to_multiple_of=8)


# ------------------------------------------------------------------------------------------
# the worker loop
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Worker:
    """What stays fixed over one worker's run."""

    job: FinetuneJob
    plan: DataPlan
    runner: Runner
    rank: int
    world: int
    device: torch.device
    lambda_of_step: Callable[[int], float]
    loss_multiplier: float
    relay: Any = None  # rank 0's handle on the driver's step relay


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train entry point; ``config`` is a :class:`FinetuneJob` dump made by ``forgetting_ray.stages.train``."""
    memory = PeakMemory()  # before the model loads: the load is part of the fit's peak
    w = _set_up(FinetuneJob.from_loop_config(config))
    state, history = _restore(w)
    guard = w.job.guardrail()
    guard.load(state.guardrail)
    while state.global_step < w.plan.total_steps and state.stop_reason is None:
        _train_epoch(w, state, history, guard)
    fit_peak = memory.peak_bytes(reset=True)
    export_dir = _export(w, w.job.export_dir) if state.stop_reason is None and w.job.export_dir else None
    ranks = _gather_from_ranks(w, {"node": _node_id(), "peak_rss_bytes": fit_peak,
                                   "export_peak_rss_bytes": memory.peak_bytes()})
    if w.rank != 0:
        return None
    return {"state": state.to_json(), "history": history, "export_dir": export_dir,
            "nodes": [r["node"] for r in ranks], "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
            "export_peak_rss_bytes": [r["export_peak_rss_bytes"] for r in ranks],
            "total_steps": w.plan.total_steps, "dropped_rows_per_epoch": w.plan.dropped_rows_per_epoch()}


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _gather_from_ranks(w: _Worker, mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``mine``, in rank order (recorded with the result: where the fit ran, what it held)."""
    if w.world == 1 or not dist.is_initialized():
        return [mine]
    out: list[Any] = [None] * w.world
    dist.all_gather_object(out, mine)
    return out


def _set_up(job: FinetuneJob) -> _Worker:
    """This worker's rank, data plan and engine (model, LoRA, optimizer, schedule)."""
    # ray stays lazy: the driver imports this module (FinetuneJob) before Ray is needed
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.torch_threads)
    ft = job.finetune
    plan = DataPlan.of(ft, job.num_rows, world)
    plan.check(job.table)
    lambda_of_step = job.lambda_of_step(plan.total_steps)
    mult = loss_multiplier(job.normalization, ft.grad_accum, world)
    device = _device(job.use_gpu, job.cpu_stands_in)
    # an alias converts, a URI is fetched once per node; a hub id or shared path loads as it is
    runner = create_runner(resolve_model_path(job.model_path), ft, world_size=world, total_steps=plan.total_steps,
                           device=device, chunk_size=job.chunk_size, trust_remote_code=job.trust_remote_code,
                           attn_implementation=job.attn_implementation, dtype=job.dtype)
    relay = None
    if job.step_relay and rank == 0:
        try:
            relay = ray.get_actor(job.step_relay)
        except ValueError:  # the driver's relay is gone: its steps reach the driver with the result instead
            relay = None
    return _Worker(job, plan, runner, rank, world, device, lambda_of_step, mult, relay)


def _device(use_gpu: bool, cpu_stands_in: bool) -> torch.device:
    if stage_device(use_gpu, "resources.use_gpu", cpu_stands_in=cpu_stands_in).type == "cpu":
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()  # the GPU Ray assigned to this worker


def _restore(w: _Worker) -> tuple[TrainState, list[dict[str, Any]]]:
    """State, history and engine from Ray's latest checkpoint, else ``resume_from``, else a fresh start."""
    import ray.train

    state, history = TrainState(), []
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and w.job.finetune.resume_from:
        ckpt = ray.train.Checkpoint.from_directory(w.job.finetune.resume_from)
    if ckpt is None:
        return state, history
    with ckpt.as_directory() as d:
        saved, saved_history = read_state(d, w.job.fingerprint_parts)  # raises on a foreign checkpoint
        if saved.has_weights:
            if (saved.epoch, saved.micro_batches_in_epoch) != w.plan.position(saved.global_step):
                raise RuntimeError(
                    f"checkpoint {d}: data position (epoch {saved.epoch}, micro-batch "
                    f"{saved.micro_batches_in_epoch}) does not follow from step {saved.global_step}"
                )
            w.runner.load(Path(d), checkpoint_tag(saved.global_step))
            state, history = saved, saved_history
            state.resumed_at.append(state.global_step)
    return state, history


def _train_epoch(w: _Worker, state: TrainState, history: list[dict[str, Any]], guard: Guardrail) -> None:
    """The optimizer steps left in the current epoch, up to the run's last step or a guardrail stop."""
    import ray.train

    ft = w.job.finetune
    epoch, consumed = state.epoch, state.micro_batches_in_epoch
    name = f"train_{epoch}" if ft.shuffle else "train"
    batches = micro_batches(ray.train.get_dataset_shard(name), w.plan, rank=w.rank, skip=consumed,
                            columns=w.job.columns, pad_token_id=w.job.pad_token_id)
    for _ in range(w.plan.steps_per_epoch - consumed // ft.grad_accum):
        step = state.global_step
        metrics = _train_step(w, state, batches, epoch)
        if w.job.system_metrics and w.rank == 0:
            metrics.update(process_metrics(w.device))
        _apply_guardrail(w, guard, state, step, metrics)
        history.append(metrics)
        if w.relay is not None:
            w.relay.put.remote(metrics)  # fire and forget: the driver logs it to MLflow while the fit runs
        last = state.global_step >= w.plan.total_steps or state.stop_reason is not None
        _report(w, state, history, metrics, last=last)
        maybe_crash_after_step(w.job.fault, w.rank, state.global_step)
        if last:
            return


def without_timings(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step metrics less what the clock and the machine decide: what a resumed fit must reproduce exactly."""
    return [{k: v for k, v in m.items() if k != "tokens_per_s" and not k.startswith(("time/", "system/"))}
            for m in history]


def process_metrics(device: torch.device) -> dict[str, float]:
    """This process's CPU use since the last call, resident memory, and on a GPU its memory (now, peak, held
    by the allocator), as ``system/rank0_*`` step metrics."""
    import psutil

    me = psutil.Process()
    out = {"system/rank0_cpu_percent": me.cpu_percent(), "system/rank0_rss_gib": me.memory_info().rss / 2**30}
    if device.type == "cuda":
        out.update({"system/rank0_gpu_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
                    "system/rank0_gpu_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                    "system/rank0_gpu_reserved_gib": torch.cuda.memory_reserved(device) / 2**30})
    return out


def _train_step(w: _Worker, state: TrainState, batches: Iterator[dict[str, torch.Tensor]],
                epoch: int) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches; advances ``state``, returns the step's metrics."""
    t0 = time.perf_counter()
    ft, strategy, step = w.job.finetune, w.job.strategy, state.global_step
    torch.manual_seed(step_seed(ft.seed, step, w.rank))
    group = [prepare_micro_batch(next(batches), strategy) for _ in range(ft.grad_accum)]
    counts = [class_counts(b["token_class"], strategy) for b in group]
    step_counts = None
    if w.job.normalization == "global":  # every token of the step weighs the same, on every rank
        step_counts = _all_reduce([sum(c[0] for c in counts), sum(c[1] for c in counts)], w.device)
    lam = w.lambda_of_step(step) * state.lambda_multiplier
    lr = w.runner.lr()  # the rate this step applies (the scheduler advances inside step)
    acc, grad_norm, split = _accumulate(w, group, counts, lam, step_counts)
    s = _all_reduce(acc.tolist(), w.device)
    state.global_step += 1
    state.epoch, state.micro_batches_in_epoch = w.plan.position(state.global_step)  # the next to read
    state.microbatches_without_positive += int(s[5])
    dt = time.perf_counter() - t0
    return {
        "step": state.global_step, "epoch": epoch,
        "loss": s[4] / w.world, "pos_nll": s[0] / max(s[1], 1), "neg_nll": s[2] / max(s[3], 1),
        "lambda": lam, "lambda_multiplier": state.lambda_multiplier, "lr": lr,
        "grad_norm": grad_norm, "tokens_per_s": s[6] / dt, "n_pos": int(s[1]), "n_neg": int(s[3]),
        "n_tokens": int(s[6]), "n_microbatches_without_positive": int(s[5]),
        "n_microbatches_without_positive_total": state.microbatches_without_positive,
        **{f"time/{k}_s": v for k, v in split.items()},
    }


def _accumulate(w: _Worker, group: list[dict[str, torch.Tensor]], counts: list[tuple[int, int]], lam: float,
                step_counts: list[float] | None) -> tuple[np.ndarray, float | None, dict[str, float]]:
    """Forward and backward every micro-batch (the engine steps after the last); this rank's sums, and its
    seconds in forward, backward and the optimizer step (on rank 0: where a step's time goes)."""
    n_pos_step, n_neg_step = step_counts if step_counts is not None else (None, None)
    acc = np.zeros(7)  # sum_pos, n_pos, sum_neg, n_neg, loss, micro-batches without positives, tokens
    split = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    grad_norm = None
    for i, (mb, (n_pos, _)) in enumerate(zip(group, counts)):
        boundary = i == w.job.finetune.grad_accum - 1
        if isinstance(w.runner, DDPRunner):
            w.runner.set_boundary(boundary)
        t0 = time.perf_counter()
        nll = w.runner.forward(mb)
        out = forgetting_loss(nll, mb["token_class"].to(nll.device), lam, strategy=w.job.strategy,
                              normalization=w.job.normalization, n_pos=n_pos_step, n_neg=n_neg_step,
                              forget_loss=w.job.forget_loss)
        t1 = time.perf_counter()
        w.runner.backward(out.loss * w.loss_multiplier, boundary)
        t2 = time.perf_counter()
        grad_norm = w.runner.step(boundary)
        split["forward"] += t1 - t0
        split["backward"] += t2 - t1
        split["optimizer"] += time.perf_counter() - t2
        acc += [float(out.pos_nll) * out.n_pos, out.n_pos, float(out.neg_nll) * out.n_neg, out.n_neg,
                float(out.loss.detach()) * w.loss_multiplier, n_pos == 0, int(mb["attention_mask"].sum())]
    return acc, grad_norm, split


def _apply_guardrail(w: _Worker, guard: Guardrail, state: TrainState, step: int, metrics: dict[str, Any]) -> None:
    decision = guard.check(step, loss=metrics["loss"], pos_nll=metrics["pos_nll"],
                           neg_nll=metrics["neg_nll"], n_pos=metrics["n_pos"], n_neg=metrics["n_neg"],
                           can_backoff=w.job.strategy == "forgetting")
    if decision.action == "backoff":
        state.lambda_multiplier *= 0.5
    elif decision.action == "stop":
        state.stop_reason = decision.reason
    metrics["guardrail"] = GUARDRAIL_CODES[decision.action]
    state.guardrail = guard.state()


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _report(w: _Worker, state: TrainState, history: list[dict[str, Any]], metrics: dict[str, Any], *,
            last: bool) -> None:
    """Every rank reports on the same steps.  A checkpoint every ``checkpoint_every`` steps and at the
    end holds the engine; without ``checkpoint_every`` the last report holds state and history only."""
    import ray.train

    ft = w.job.finetune
    every = ft.checkpoint_every
    full = bool(every) and (state.global_step % every == 0 or last)
    if full or (last and not every):
        _report_checkpoint(w, state, history, metrics, full=full)
    elif state.global_step % ft.report_every == 0:
        ray.train.report(metrics)


def _report_checkpoint(w: _Worker, state: TrainState, history: list[dict[str, Any]], metrics: dict[str, Any], *,
                       full: bool) -> None:
    """With ``full`` every rank adds its engine shard to the checkpoint; rank 0 adds state and history."""
    import ray.train

    folder = Path(tempfile.mkdtemp(prefix="forgetting-ckpt-"))
    try:
        state.has_weights = full
        if full:
            w.runner.save(folder, checkpoint_tag(state.global_step))
        if w.rank == 0:
            write_state(folder, state, w.job.fingerprint_parts, history)
        has_files = any(folder.iterdir())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if has_files else None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        state.has_weights = True


def _export(w: _Worker, export_dir: str) -> str:
    """Collective on every rank: export gathers ZeRO-3 partitions, rank 0 writes and validates.

    To a bucket (``export_dir`` a URI), rank 0 writes and validates in a node-local staging folder and
    then uploads it, the manifest last."""
    ft = w.job.finetune
    local = cache_root() / "staging" / content_hash(export_dir) if is_uri(export_dir) else Path(export_dir)
    export_model(w.runner.export_handle(), load_tokenizer(w.job.tokenizer_path), local,
                 lora=ft.lora.enabled, dtype=ft.export_dtype, base_model_path=w.job.model_path,
                 max_shard_size=ft.export_max_shard_size,
                 train_config=w.job.train_config)
    if is_uri(export_dir) and w.rank == 0:
        upload_tree(local, export_dir, last=MANIFEST)
        shutil.rmtree(local, ignore_errors=True)
    return export_dir

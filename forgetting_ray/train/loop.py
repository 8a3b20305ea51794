"""The per-worker training loop of the reference and forgetting fine-tunes (Ray Train).

Reads top to bottom: restore -> for each optimizer step: fetch ``grad_accum`` micro-batches ->
(global normalisation: all-reduce the step's class counts) -> forward/backward each -> step ->
all-reduce metrics -> guardrail -> report (+ checkpoint) -> export.

Data order is reproducible by construction: every worker iterates the *whole* table in a fixed
order (``preserve_order``; a seeded sort for shuffling) in global micro-batches of
``micro_batch_size * world`` rows and keeps rows ``rank::world``.  Ray Train's default
``streaming_split`` hands blocks to whichever worker asks first, which is not reproducible, and
it cannot skip to a resume position.  The price is that each worker reads every row (token ids
only; cheap next to the forward pass).

Pure helpers (``DataPlan``, ``Guardrail``, ``prepare_micro_batch``, ``class_counts``,
``loss_multiplier``) carry the maths and are unit-tested without Ray.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..constants import IGNORE_INDEX
from ..data.collate import collate
from ..losses import classes_from_labels, forgetting_loss, lambda_schedule
from .checkpoint import TrainState, checkpoint_tag, read_state, write_state

COLUMNS_WITH_CLASS = ("input_ids", "labels", "token_class")
COLUMNS_NO_CLASS = ("input_ids", "labels")
MAX_BACKOFFS = 10  # lambda multiplier 2**-10 ~ 1e-3: halving further cannot rescue a run
GUARDRAIL_CODES = {"none": 0, "backoff": 1, "stop": 2}  # metrics stay numeric (MLflow); reasons go to events
FAULT_ENV = "FORGETTING_RAY_INJECT_FAULT"  # "rank=1,after_step=3,marker=/path" (tests of recovery)


# ------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataPlan:
    """How a table of ``num_rows`` maps onto micro-batches, optimizer steps and epochs.

    A global micro-batch is ``micro_batch_size * world_size`` consecutive rows; rank r takes rows
    r, r+world, ...  A final global micro-batch with fewer than ``world_size`` rows would leave a
    rank empty and is dropped, as are trailing micro-batches that do not fill an optimizer step.
    """

    num_rows: int
    world_size: int
    micro_batch_size: int
    grad_accum: int
    epochs: int = 1
    max_steps: int | None = None

    @property
    def global_batch_rows(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def micro_batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_rows, self.global_batch_rows)
        return full + (1 if rest >= self.world_size else 0)

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_batches_per_epoch // self.grad_accum

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps else self.epochs * self.steps_per_epoch

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def check(self, origin: str = "the table") -> None:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{origin} has {self.num_rows} rows, fewer than one optimizer step needs "
                f"(micro_batch_size {self.micro_batch_size} x workers {self.world_size} x "
                f"grad_accum {self.grad_accum} = {self.global_batch_rows * self.grad_accum})"
            )

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, global micro-batches consumed in that epoch) before optimizer step ``step``."""
        return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.grad_accum

    def dropped_rows_per_epoch(self) -> int:
        return self.num_rows - min(self.num_rows, self.steps_per_epoch * self.grad_accum * self.global_batch_rows)


def rank_rows(n_rows: int, rank: int, world_size: int) -> np.ndarray:
    """Rows of a global micro-batch that belong to ``rank`` (interleaved, so sizes differ by <= 1)."""
    return np.arange(rank, n_rows, world_size)


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


@dataclass
class GuardrailDecision:
    action: str  # "none" | "backoff" | "stop"
    reason: str = ""


@dataclass
class Guardrail:
    """Watches the step's negative and positive NLL; backs lambda off or stops the run.

    ``neg_nll_max``: the forgetting term is unbounded gradient ascent (docs/method.md §11.6), so a
    negative-token NLL past this value means it is running away.  ``pos_factor``: the positive NLL
    above ``pos_factor`` x its first value means training diverges.  A non-finite loss always stops.
    """

    neg_nll_max: float | None = None
    pos_factor: float | None = None
    action: str = "backoff"
    pos_baseline: float | None = None
    backoffs: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {"pos_baseline": self.pos_baseline, "backoffs": self.backoffs, "events": list(self.events)}

    def load(self, state: dict[str, Any]) -> None:
        self.pos_baseline = state.get("pos_baseline")
        self.backoffs = int(state.get("backoffs", 0))
        self.events = list(state.get("events", []))

    def check(self, step: int, *, loss: float, pos_nll: float, neg_nll: float, n_pos: int, n_neg: int,
              can_backoff: bool) -> GuardrailDecision:
        if not math.isfinite(loss):
            return self._record(step, "stop", f"non-finite loss {loss} at step {step}")
        if self.pos_baseline is None and n_pos > 0:
            self.pos_baseline = pos_nll
        breach = ""
        if self.neg_nll_max is not None and n_neg > 0 and neg_nll > self.neg_nll_max:
            breach = f"negative-token NLL {neg_nll:.4g} > guardrail_neg_nll_max {self.neg_nll_max:.4g}"
        elif (self.pos_factor is not None and self.pos_baseline is not None and n_pos > 0
              and pos_nll > self.pos_factor * self.pos_baseline):
            breach = (f"positive-token NLL {pos_nll:.4g} > guardrail_pos_nll_factor {self.pos_factor:g} x "
                      f"first value {self.pos_baseline:.4g}")
        if not breach:
            return GuardrailDecision("none")
        if self.action == "backoff" and can_backoff and self.backoffs < MAX_BACKOFFS:
            self.backoffs += 1
            return self._record(step, "backoff", f"{breach} at step {step}: lambda multiplier halved "
                                                 f"to {0.5 ** self.backoffs:g}")
        why = "guardrail_action is 'stop'" if self.action == "stop" else (
            "lambda cannot be backed off further" if can_backoff else "no lambda to back off for this strategy")
        return self._record(step, "stop", f"{breach} at step {step} ({why})")

    def _record(self, step: int, action: str, reason: str) -> GuardrailDecision:
        self.events.append({"step": step, "action": action, "reason": reason})
        return GuardrailDecision(action, reason)


def parse_fault(text: str | None) -> dict[str, Any] | None:
    """``rank=1,after_step=3,marker=/tmp/x`` -> dict (a one-shot crash for recovery tests)."""
    if not text:
        return None
    kv = dict(item.split("=", 1) for item in text.split(",") if item)
    try:
        return {"rank": int(kv["rank"]), "after_step": int(kv["after_step"]), "marker": kv["marker"]}
    except KeyError as e:
        raise ValueError(f"{FAULT_ENV}={text!r} lacks {e.args[0]} (want rank=..,after_step=..,marker=..)") from None


def _has_registered_checkpoint(run_storage: Path) -> bool:
    try:
        snapshot = json.loads((run_storage / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False
    return bool(snapshot.get("checkpoint_results"))


def _maybe_crash(fault: dict[str, Any] | None, rank: int, step_done: int) -> None:
    if not fault or fault["rank"] != rank or fault["after_step"] != step_done:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return  # one crash only: the restarted worker passes this step
    # Ray Train registers a checkpoint only once every rank's report of it has been polled (every
    # 2 s); crash after that, so the test exercises a resume and not a restart from scratch.
    deadline = time.monotonic() + 60
    while fault.get("run_storage") and time.monotonic() < deadline and not _has_registered_checkpoint(
        Path(fault["run_storage"])
    ):
        time.sleep(0.2)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"crashed after step {step_done}\n")
    os._exit(1)


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def _list_column(tbl, name: str) -> list[np.ndarray]:
    import pyarrow.compute as pc

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
def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _finetune_config(stage: str, data: dict[str, Any]):
    from ..config import ReferenceConfig, TrainingConfig

    return (TrainingConfig if stage == "train" else ReferenceConfig).model_validate(data)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train entry point; ``config`` is built by ``forgetting_ray.stages.train``."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["torch_threads"])
    stage = config["stage"]
    ft = _finetune_config(stage, config["finetune"])
    strategy = getattr(ft, "strategy", "sft")
    normalization = getattr(ft, "normalization", "micro_batch")
    parts = config["fingerprint_parts"]
    plan = DataPlan(config["num_rows"], world, ft.micro_batch_size, ft.grad_accum, ft.epochs, ft.max_steps)
    plan.check(config["table"])
    total = plan.total_steps
    lam_fn = (lambda_schedule(ft.lambda_schedule, t_max=ft.t_max, t_min=ft.t_min, total_steps=total)
              if strategy == "forgetting" else (lambda k: 0.0))
    columns = COLUMNS_NO_CLASS if strategy == "sft" else COLUMNS_WITH_CLASS
    mult = loss_multiplier(normalization, ft.grad_accum, world)

    # --- model, optimizer, engine ---------------------------------------------------------
    from .deepspeed_setup import DDPRunner, create_runner

    if config["use_gpu"]:
        import ray.train.torch

        device = ray.train.torch.get_device()  # the GPU Ray assigned to this worker
    else:
        device = torch.device("cpu")
    runner = create_runner(config["model_path"], ft, world_size=world, total_steps=total, device=device,
                           chunk_size=config["chunk_size"], trust_remote_code=config.get("trust_remote_code", False))

    # --- restore ----------------------------------------------------------------------------
    state, history = TrainState(), []
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and ft.resume_from:
        ckpt = ray.train.Checkpoint.from_directory(ft.resume_from)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved, saved_history = read_state(d, parts)  # raises on a foreign checkpoint
            if saved.has_weights:
                if (saved.epoch, saved.micro_batches_in_epoch) != plan.position(saved.global_step):
                    raise RuntimeError(
                        f"checkpoint {d}: data position (epoch {saved.epoch}, micro-batch "
                        f"{saved.micro_batches_in_epoch}) does not follow from step {saved.global_step}"
                    )
                runner.load(Path(d), checkpoint_tag(saved.global_step))
                state, history = saved, saved_history
                state.resumed_at.append(state.global_step)
    guard = Guardrail(getattr(ft, "guardrail_neg_nll_max", None), getattr(ft, "guardrail_pos_nll_factor", None),
                      getattr(ft, "guardrail_action", "backoff"))
    guard.load(state.guardrail)
    fault = config.get("fault")

    # --- train ------------------------------------------------------------------------------
    while state.global_step < total and state.stop_reason is None:
        epoch, consumed = state.epoch, state.micro_batches_in_epoch
        name = f"train_{epoch}" if ft.shuffle else "train"
        batches = micro_batches(ray.train.get_dataset_shard(name), plan, rank=rank, skip=consumed,
                                columns=columns, pad_token_id=config["pad_token_id"])
        for _ in range(plan.steps_per_epoch - consumed // ft.grad_accum):
            t0 = time.perf_counter()
            step = state.global_step
            torch.manual_seed(step_seed(ft.seed, step, rank))
            group = [prepare_micro_batch(next(batches), strategy) for _ in range(ft.grad_accum)]
            counts = [class_counts(b["token_class"], strategy) for b in group]
            n_pos_step = n_neg_step = None
            if normalization == "global":  # every token of the step weighs the same, on every rank
                n_pos_step, n_neg_step = _all_reduce([sum(c[0] for c in counts), sum(c[1] for c in counts)], device)
            lam = lam_fn(step) * state.lambda_multiplier
            lr = runner.lr()  # the rate this step applies (the scheduler advances inside step)
            acc = np.zeros(7)  # sum_pos, n_pos, sum_neg, n_neg, loss, micro-batches without positives, tokens
            for i, (mb, (n_pos, _)) in enumerate(zip(group, counts)):
                boundary = i == ft.grad_accum - 1
                if isinstance(runner, DDPRunner):
                    runner.set_boundary(boundary)
                nll = runner.forward(mb)
                out = forgetting_loss(nll, mb["token_class"].to(nll.device), lam, strategy=strategy,
                                      normalization=normalization, n_pos=n_pos_step, n_neg=n_neg_step)
                runner.backward(out.loss * mult, boundary)
                grad_norm = runner.step(boundary)
                acc += [float(out.pos_nll) * out.n_pos, out.n_pos, float(out.neg_nll) * out.n_neg, out.n_neg,
                        float(out.loss.detach()) * mult, n_pos == 0, int(mb["attention_mask"].sum())]
            s = _all_reduce(acc.tolist(), device)
            state.global_step += 1
            state.epoch, state.micro_batches_in_epoch = plan.position(state.global_step)  # the next to read
            state.microbatches_without_positive += int(s[5])
            dt = time.perf_counter() - t0
            metrics = {
                "step": state.global_step, "epoch": epoch,
                "loss": s[4] / world, "pos_nll": s[0] / max(s[1], 1), "neg_nll": s[2] / max(s[3], 1),
                "lambda": lam, "lambda_multiplier": state.lambda_multiplier, "lr": lr,
                "grad_norm": grad_norm, "tokens_per_s": s[6] / dt, "n_pos": int(s[1]), "n_neg": int(s[3]),
                "n_tokens": int(s[6]), "n_microbatches_without_positive": int(s[5]),
                "n_microbatches_without_positive_total": state.microbatches_without_positive,
            }
            decision = guard.check(step, loss=metrics["loss"], pos_nll=metrics["pos_nll"],
                                   neg_nll=metrics["neg_nll"], n_pos=metrics["n_pos"], n_neg=metrics["n_neg"],
                                   can_backoff=strategy == "forgetting")
            if decision.action == "backoff":
                state.lambda_multiplier *= 0.5
            elif decision.action == "stop":
                state.stop_reason = decision.reason
            metrics["guardrail"] = GUARDRAIL_CODES[decision.action]
            state.guardrail = guard.state()
            history.append(metrics)
            last = state.global_step >= total or state.stop_reason is not None
            every = ft.checkpoint_every
            full = bool(every) and (state.global_step % every == 0 or last)
            if full or last or state.global_step % ft.report_every == 0:
                _report(runner, state, parts, history, metrics, rank, full=full, light=last and not every)
            _maybe_crash(fault, rank, state.global_step)
            if last:
                break

    # --- export -----------------------------------------------------------------------------
    export_dir = None
    if state.stop_reason is None and config.get("export_dir"):
        export_dir = _export(runner, ft, config)
    if rank == 0:
        return {"state": state.to_json(), "history": history, "export_dir": export_dir,
                "total_steps": total, "dropped_rows_per_epoch": plan.dropped_rows_per_epoch()}
    return None


def _report(runner, state: TrainState, parts, history, metrics, rank: int, *, full: bool, light: bool) -> None:
    """Every rank reports; with ``full`` every rank adds its engine shard to the checkpoint."""
    import ray.train

    if not (full or light):
        ray.train.report(metrics)
        return
    folder = Path(tempfile.mkdtemp(prefix="forgetting-ckpt-"))
    try:
        state.has_weights = full
        if full:
            runner.save(folder, checkpoint_tag(state.global_step))
        if rank == 0:
            write_state(folder, state, parts, history)
        has_files = any(folder.iterdir())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if has_files else None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        state.has_weights = True


def _export(runner, ft, config: dict[str, Any]) -> str:
    """Collective on every rank: export gathers ZeRO-3 partitions, rank 0 writes and validates."""
    from ..models import load_tokenizer
    from .export import export_model

    tok = load_tokenizer(config["tokenizer_path"])
    out = export_model(runner.export_handle(), tok, Path(config["export_dir"]), lora=ft.lora.enabled,
                       dtype=ft.export_dtype, base_model_path=config["model_path"],
                       train_config=config["train_config"])
    return str(out)

"""The training half without a Ray cluster: DeepSpeed config, schedules, data plan, guardrail,
normalisation maths, checkpoint fingerprints, and the worker loop itself run in-process with
``ray.train``'s four worker functions replaced by a local harness (DDP engine, one worker)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import make_partitioned_table
from forgetting_ray.config import FinetuneConfig, TrainingConfig, config_to_dict
from forgetting_ray.exports import model_identity
from forgetting_ray.losses import forgetting_loss, lambda_schedule
from forgetting_ray.train import checkpoint as ck
from forgetting_ray.train.deepspeed_setup import (
    DDP_STATE_FILE,
    LoraTargetError,
    build_deepspeed_config,
    linear_module_names,
    lr_factor,
    meta_model,
    resolve_lora_targets,
    warmup_steps,
)
from forgetting_ray.train.data_plan import DataPlan, rank_rows
from forgetting_ray.train.guardrail import GUARDRAIL_CODES, MAX_BACKOFFS, Guardrail
from forgetting_ray.train.loop import (
    class_counts,
    loss_multiplier,
    micro_batches,
    prepare_micro_batch,
    train_loop_per_worker,
    without_timings,
)


# ------------------------------------------------------------------------------------------
# DeepSpeed config, lr schedule, LoRA targets
# ------------------------------------------------------------------------------------------
def test_deepspeed_config_builder():
    ft = FinetuneConfig(micro_batch_size=4, grad_accum=3, max_grad_norm=1.5)
    for stage in (0, 1, 2, 3):
        ft.deepspeed.zero_stage = stage
        cfg = build_deepspeed_config(ft, world_size=2, bf16=False)
        assert cfg["train_batch_size"] == 4 * 3 * 2
        assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
        assert cfg["zero_optimization"]["stage"] == stage
        assert cfg["gradient_clipping"] == 1.5
        assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
        assert cfg["zero_allow_untested_optimizer"] is True and "optimizer" not in cfg
        assert ("stage3_gather_16bit_weights_on_model_save" in cfg["zero_optimization"]) == (stage == 3)
        assert cfg["zero_optimization"].get("reduce_bucket_size") == (500_000_000 if stage else None)
    assert build_deepspeed_config(ft, world_size=1, bf16=True)["bf16"]["enabled"] is True
    assert build_deepspeed_config(FinetuneConfig(), world_size=1, bf16=False)["gradient_clipping"] == 0.0

    ft.deepspeed.zero_stage = 3
    ft.deepspeed.offload_optimizer = ft.deepspeed.offload_params = True
    z = build_deepspeed_config(ft, world_size=2, bf16=False)["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    ft.deepspeed.zero_stage = 2
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        build_deepspeed_config(ft, world_size=2, bf16=False)
    ft.deepspeed.offload_params = False
    ft.deepspeed.zero_stage = 0
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage >= 1"):
        build_deepspeed_config(ft, world_size=2, bf16=False)


@pytest.mark.parametrize("total,ratio", [(100, 0.03), (7, 0.0), (10, 0.5), (1, 0.03)])
def test_lr_schedule_matches_transformers(total, ratio):
    from transformers import get_linear_schedule_with_warmup

    warm = warmup_steps(total, ratio)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, warm, total)
    for k in range(total + 2):
        assert lr_factor(k, warmup=warm, total=total) == pytest.approx(sched.get_last_lr()[0], abs=1e-12)
        opt.step()
        sched.step()
    assert lr_factor(total, warmup=warm, total=total) == 0.0


def test_lora_all_linear_excludes_head_and_unknown_targets_list_names(tiny_models):
    for arch in ("llama", "qwen2", "gpt_neo"):  # qwen2's head is tied to the embedding
        model = meta_model(str(tiny_models[arch]))
        names = linear_module_names(model)
        head = model.get_output_embeddings()
        assert head is not None and all(model.get_submodule(n) is not head for n in names)
        targets = resolve_lora_targets(model, "all-linear")
        assert "lm_head" not in targets and targets
        covered = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        assert covered == names  # every linear layer but the head is adapted
    llama = meta_model(str(tiny_models["llama"]))
    assert set(resolve_lora_targets(llama, "all-linear")) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"}
    assert resolve_lora_targets(llama, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(LoraTargetError) as e:
        resolve_lora_targets(llama, ["q_proj", "query_key_value"])
    assert "lora.target_modules ['query_key_value'] match no linear layer" in str(e.value) and "gate_proj" in str(e.value)


# ------------------------------------------------------------------------------------------
# data plan, rank split, position skipping
# ------------------------------------------------------------------------------------------
def test_data_plan_counts_and_positions():
    p = DataPlan(num_rows=50, world_size=2, micro_batch_size=2, grad_accum=3, epochs=2)
    assert p.global_batch_rows == 4
    assert p.micro_batches_per_epoch == 13  # 12 full + a last one of 2 rows (>= world)
    assert p.steps_per_epoch == 4 and p.total_steps == 8 and p.num_epochs == 2
    assert p.dropped_rows_per_epoch() == 50 - 4 * 3 * 4
    assert [p.position(k) for k in (0, 1, 3, 4, 5)] == [(0, 0), (0, 3), (0, 9), (1, 0), (1, 3)]
    assert DataPlan(49, 4, 2, 1).micro_batches_per_epoch == 6  # remainder 1 < world: dropped
    q = DataPlan(50, 2, 2, 3, epochs=1, max_steps=10)  # max_steps overrides epochs, data repeats
    assert q.total_steps == 10 and q.num_epochs == 3 and q.position(9) == (2, 3)
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        DataPlan(5, 2, 2, 3).check("t.parquet")


def test_rank_rows_partition_every_row_once():
    for n in (1, 4, 7, 8):
        parts = [rank_rows(n, r, 4) for r in range(4)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


class FakeIterator:
    """What ``ray.train.get_dataset_shard`` returns, over an in-memory table, in file order."""

    def __init__(self, table: pa.Table):
        self.table = table

    def iter_batches(self, *, batch_size, batch_format, drop_last, prefetch_batches):
        assert batch_format == "pyarrow"
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


def test_micro_batches_skip_equals_tail_and_ranks_interleave(tiny_tokenizer_dir):
    table = make_partitioned_table(tiny_tokenizer_dir, n=20)
    plan = DataPlan(20, 2, 2, 1)
    cols = ("input_ids", "labels", "token_class")
    full = [list(micro_batches(FakeIterator(table), plan, rank=r, skip=0, columns=cols, pad_token_id=0))
            for r in (0, 1)]
    assert len(full[0]) == len(full[1]) == 5
    tail = list(micro_batches(FakeIterator(table), plan, rank=1, skip=3, columns=cols, pad_token_id=0))
    assert len(tail) == 2
    for a, b in zip(tail, full[1][3:]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # global micro-batch 0 = rows 0..3: rank 0 gets rows 0 and 2, rank 1 rows 1 and 3
    ids = table.column("input_ids").to_pylist()
    got = full[1][0]["input_ids"]
    assert got[0, : len(ids[1])].tolist() == ids[1] and got[1, : len(ids[3])].tolist() == ids[3]
    assert full[0][0]["token_class"].dtype == torch.int8


# ------------------------------------------------------------------------------------------
# loss pieces: normalisation, empty micro-batches, the last position (docs/method.md §11.1)
# ------------------------------------------------------------------------------------------
def test_global_normalization_multiplier_gives_sum_over_global_count():
    """2 ranks x 3 micro-batches; engines average over ranks: the step gradient must equal d/dw of
    Sum_pos NLL / N_pos_global - lam * Sum_neg NLL / N_neg_global over all 6 micro-batches."""
    g = torch.Generator().manual_seed(0)
    world, ga, lam = 2, 3, 0.3
    w = torch.nn.Parameter(torch.tensor(1.7))
    mbs = [(torch.rand(2, 5, generator=g), torch.randint(-1, 2, (2, 5), generator=g).to(torch.int8))
           for _ in range(world * ga)]
    n_pos = sum(int((c > 0).sum()) for _, c in mbs)
    n_neg = sum(int((c < 0).sum()) for _, c in mbs)
    for normalization in ("global", "micro_batch"):
        mult = loss_multiplier(normalization, ga, world)
        rank_grads = []
        for r in range(world):
            w.grad = None
            for base, cls in mbs[r * ga:(r + 1) * ga]:
                out = forgetting_loss(base * w, cls, lam, normalization=normalization, n_pos=n_pos, n_neg=n_neg)
                (out.loss * mult).backward()
            rank_grads.append(w.grad.clone())
        step_grad = torch.stack(rank_grads).mean()  # DDP / ZeRO average over ranks
        w.grad = None
        if normalization == "global":
            nll = torch.cat([b.flatten() for b, _ in mbs]) * w
            cls = torch.cat([c.flatten() for _, c in mbs])
            target = (nll * (cls > 0)).sum() / n_pos - lam * (nll * (cls < 0)).sum() / n_neg
        else:  # the paper: mean over micro-batches and devices of per-micro-batch losses
            target = torch.stack([forgetting_loss(b * w, c, lam).loss for b, c in mbs]).mean()
        target.backward()
        assert torch.allclose(step_grad, w.grad, rtol=1e-6), normalization


def test_class_counts_per_strategy():
    cls = torch.tensor([[0, 1, 1, -1], [1, -1, -1, 0]], dtype=torch.int8)
    assert class_counts(cls, "forgetting") == (3, 3)
    assert class_counts(cls, "ignore") == (3, 3)
    assert class_counts(cls, "sft") == (6, 0)


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def test_microbatch_without_labels_keeps_graph_and_trains_nothing(tiny_lm):
    from forgetting_ray.scoring import token_nll

    ids = torch.randint(0, 100, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100),
             "token_class": torch.zeros_like(ids, dtype=torch.int8)}
    for strategy in ("forgetting", "sft"):
        mb = prepare_micro_batch(batch, strategy)
        nll = token_nll(tiny_lm, mb["input_ids"], mb["attention_mask"], mb["labels"])
        out = forgetting_loss(nll, mb["token_class"], 0.2, strategy=strategy)
        assert out.loss.requires_grad and out.n_pos == 0 and out.n_neg == 0
        tiny_lm.zero_grad()
        out.loss.backward()  # must not raise: every rank runs backward every micro-batch
        assert all(p.grad is None or not p.grad.any() for p in tiny_lm.parameters())
    with pytest.raises(ValueError, match="needs a token_class"):
        prepare_micro_batch({k: v for k, v in batch.items() if k != "token_class"}, "forgetting")


def test_last_position_of_longest_row_is_trained(tiny_lm):
    """docs/method.md §11.1: the paper's masks drop position L-1; here it carries its loss and gradient."""
    from forgetting_ray.data.collate import collate
    from forgetting_ray.scoring import token_nll

    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, -100, 9], "token_class": [0, 0, 0, 0, 1]},
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "token_class": [0, -1, -1]}]
    b = prepare_micro_batch(collate(rows, pad_token_id=0), "forgetting")  # no padding to a multiple
    assert b["input_ids"].shape[1] == 5
    nll = token_nll(tiny_lm, b["input_ids"], b["attention_mask"], b["labels"])
    out = forgetting_loss(nll, b["token_class"], 0.0)
    assert out.n_pos == 1 and float(nll[0, 4].detach()) > 0
    assert float(out.loss.detach()) == pytest.approx(float(nll[0, 4].detach()))
    tiny_lm.zero_grad()
    out.loss.backward()
    assert tiny_lm.lm_head.weight.grad[9].abs().sum() > 0


# ------------------------------------------------------------------------------------------
# guardrail
# ------------------------------------------------------------------------------------------
def test_guardrail_backoff_stop_and_state_roundtrip():
    g = Guardrail(neg_nll_max=8.0, pos_factor=2.0, action="backoff")
    kw = dict(n_pos=10, n_neg=5, can_backoff=True)
    assert g.check(0, loss=1.0, pos_nll=3.0, neg_nll=6.0, **kw).action == "none"
    assert g.pos_baseline == 3.0
    d = g.check(1, loss=1.0, pos_nll=3.0, neg_nll=9.0, **kw)
    assert d.action == "backoff" and "negative-token NLL 9 > guardrail_neg_nll_max 8" in d.reason
    d = g.check(2, loss=1.0, pos_nll=6.5, neg_nll=6.0, **kw)
    assert d.action == "backoff" and "positive-token NLL" in d.reason and g.backoffs == 2
    assert g.check(3, loss=1.0, pos_nll=9.0, neg_nll=9.0, n_pos=0, n_neg=0, can_backoff=True).action == "none"
    saved = g.state()
    h = Guardrail(neg_nll_max=8.0, pos_factor=2.0)
    h.load(saved)
    assert (h.pos_baseline, h.backoffs, len(h.events)) == (3.0, 2, 2)
    for k in range(MAX_BACKOFFS - 2):
        assert h.check(10 + k, loss=1.0, pos_nll=3.0, neg_nll=9.0, **kw).action == "backoff"
    d = h.check(99, loss=1.0, pos_nll=3.0, neg_nll=9.0, **kw)
    assert d.action == "stop" and "cannot be backed off further" in d.reason

    s = Guardrail(neg_nll_max=8.0, action="stop")
    d = s.check(4, loss=1.0, pos_nll=3.0, neg_nll=8.5, **kw)
    assert d.action == "stop" and "guardrail_action is 'stop'" in d.reason
    assert Guardrail().check(0, loss=float("nan"), pos_nll=1, neg_nll=1, **kw).action == "stop"
    sft = Guardrail(pos_factor=1.5)
    sft.check(0, loss=1.0, pos_nll=2.0, neg_nll=0.0, n_pos=5, n_neg=0, can_backoff=False)
    d = sft.check(1, loss=1.0, pos_nll=3.5, neg_nll=0.0, n_pos=5, n_neg=0, can_backoff=False)
    assert d.action == "stop" and "no lambda to back off" in d.reason


# ------------------------------------------------------------------------------------------
# checkpoint fingerprint
# ------------------------------------------------------------------------------------------
def _parts(**over):
    ft = config_to_dict(TrainingConfig(**over))
    return ck.fingerprint_parts(stage="train", finetune=ft, model={"path": "/m", "config_sha256": "ab"},
                                table_hash="t1", world_size=2)


def test_fingerprint_ignores_neutral_fields_and_names_differences(tmp_path):
    base = _parts()
    assert ck.fingerprint(base) == ck.fingerprint(_parts(checkpoint_every=5, export_dtype="float32", max_failures=3))
    ck.write_state(tmp_path, ck.TrainState(global_step=4, epoch=0, micro_batches_in_epoch=12), base, [{"step": 1}])
    state, hist = ck.read_state(tmp_path, base)
    assert state.global_step == 4 and state.micro_batches_in_epoch == 12 and hist == [{"step": 1}]
    with pytest.raises(ck.CheckpointMismatchError) as e:
        ck.read_state(tmp_path, _parts(lr=3e-4, t_max=0.5))
    msg = str(e.value)
    assert "finetune.lr: checkpoint has 0.0001, this run has 0.0003" in msg and "finetune.t_max" in msg
    other_model = dict(base, model={"path": "/other", "config_sha256": "cd"})
    with pytest.raises(ck.CheckpointMismatchError, match="model.config_sha256"):
        ck.check_compatible(base, other_model, tmp_path)
    with pytest.raises(ck.CheckpointMismatchError, match="is not a forgetting-ray checkpoint"):
        ck.read_state(tmp_path / "nowhere", base)


# ------------------------------------------------------------------------------------------
# the worker loop in-process (DDP engine, world 1, ray.train functions replaced)
# ------------------------------------------------------------------------------------------
class Crash(RuntimeError):
    pass


class LocalTrain:
    """Stands in for Ray Train's worker API: serves the table, keeps reports and checkpoint copies."""

    def __init__(self, table: pa.Table, root: Path, monkeypatch, *, crash_after: int | None = None):
        import ray.train

        self.table, self.root, self.crash_after = table, root, crash_after
        self.reports: list[dict] = []
        self.checkpoints: list[Path] = []
        self.resume = None

        class Ctx:
            def get_world_rank(self):
                return 0

            def get_world_size(self):
                return 1

        monkeypatch.setattr(ray.train, "get_context", lambda: Ctx())
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: self.resume)
        monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: FakeIterator(self.table))
        monkeypatch.setattr(ray.train, "report", self.report)

    def report(self, metrics, checkpoint=None):
        import ray.train

        if checkpoint is not None:  # Ray copies the folder into storage; the loop deletes its own
            dst = self.root / f"ckpt_{len(self.checkpoints)}"
            shutil.copytree(checkpoint.path, dst)
            self.checkpoints.append(dst)
        self.reports.append(dict(metrics))
        if self.crash_after is not None and metrics["step"] == self.crash_after:
            self.crash_after = None
            raise Crash(f"injected after step {metrics['step']}")

    def resume_from_latest(self):
        import ray.train

        self.resume = ray.train.Checkpoint.from_directory(str(self.checkpoints[-1]))


def loop_config(model_dir: Path, table: pa.Table, **training) -> dict:
    ft = TrainingConfig(**{"lr": 2e-3, "micro_batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.2,
                           "lora": {"enabled": False}, "deepspeed": {"enabled": False}, **training})
    d = config_to_dict(ft)
    return {
        "stage": "train", "finetune": d,
        "fingerprint_parts": ck.fingerprint_parts(stage="train", finetune=d, model=model_identity(model_dir),
                                                  table_hash="t", world_size=1),
        "num_rows": table.num_rows, "table": "mem.parquet", "model_path": str(model_dir),
        "tokenizer_path": str(model_dir), "pad_token_id": 0, "use_gpu": False, "torch_threads": 1,
        "chunk_size": 64, "export_dir": None, "train_config": {}, "fault": None,
    }


def trained_params(ckpt: Path) -> dict[str, torch.Tensor]:
    state = ck.read_state(ckpt)[0]
    return torch.load(ckpt / ck.checkpoint_tag(state.global_step) / DDP_STATE_FILE, weights_only=True)["model"]


@pytest.fixture(scope="module")
def table16(tiny_tokenizer_dir):
    return make_partitioned_table(tiny_tokenizer_dir, n=16)


def test_loop_lambda_follows_global_step_across_epochs(tiny_llama, table16, tmp_path, monkeypatch):
    """docs/method.md §11.4: lambda and lr come from the global optimizer step, not the in-epoch counter."""
    rt = LocalTrain(table16, tmp_path, monkeypatch)
    cfg = loop_config(tiny_llama, table16, epochs=2, lambda_schedule="linear", t_max=0.4, t_min=0.0)
    out = train_loop_per_worker(cfg)
    hist = out["history"]
    assert [m["step"] for m in hist] == list(range(1, 9)) and [m["epoch"] for m in hist] == [0] * 4 + [1] * 4
    lam = lambda_schedule("linear", t_max=0.4, t_min=0.0, total_steps=8)
    assert [m["lambda"] for m in hist] == pytest.approx([lam(k) for k in range(8)])
    assert hist[4]["lambda"] > hist[3]["lambda"] > 0  # no reset at the epoch boundary
    warm = warmup_steps(8, 0.2)
    assert [m["lr"] for m in hist] == pytest.approx([2e-3 * lr_factor(k, warmup=warm, total=8) for k in range(8)])
    assert all(m["n_pos"] > 0 and m["n_neg"] > 0 and math.isfinite(m["grad_norm"]) for m in hist)
    assert hist == rt.reports  # one report per optimizer step
    assert out["state"]["global_step"] == 8 and out["state"]["stop_reason"] is None
    assert len(rt.checkpoints) == 1 and not ck.read_state(rt.checkpoints[0])[0].has_weights  # light final report


def test_loop_resume_is_exact(tiny_llama, table16, tmp_path, monkeypatch):
    """Crash after step 3 with checkpoints every 2 steps; the resumed run equals the uninterrupted one
    bit for bit (weights, optimizer, lr schedule, lambda, data position, LoRA dropout RNG)."""
    kw = dict(epochs=2, checkpoint_every=2, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1},
              lr=5e-3, normalization="global")
    a = LocalTrain(table16, tmp_path / "a", monkeypatch)
    full = train_loop_per_worker(loop_config(tiny_llama, table16, **kw))

    b = LocalTrain(table16, tmp_path / "b", monkeypatch, crash_after=5)
    with pytest.raises(Crash):
        train_loop_per_worker(loop_config(tiny_llama, table16, **kw))
    assert ck.read_state(b.checkpoints[-1])[0].global_step == 4
    b.resume_from_latest()
    resumed = train_loop_per_worker(loop_config(tiny_llama, table16, **kw))
    assert resumed["state"]["resumed_at"] == [4]
    assert without_timings(resumed["history"]) == without_timings(full["history"])  # restored history + identical tail
    wa, wb = trained_params(a.checkpoints[-1]), trained_params(b.checkpoints[-1])
    assert wa.keys() == wb.keys() and any("lora_B" in k for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # the same checkpoint under another configuration is refused, not half-loaded
    b.resume_from_latest()
    with pytest.raises(ck.CheckpointMismatchError, match="finetune.lr"):
        train_loop_per_worker(loop_config(tiny_llama, table16, **{**kw, "lr": 1e-3}))


def test_loop_guardrail_backs_off_then_stops(tiny_llama, table16, tmp_path, monkeypatch):
    """Forced divergence: a huge constant lambda drives the negative NLL past the bound."""
    LocalTrain(table16, tmp_path, monkeypatch)
    kw = dict(epochs=4, lr=3e-2, lambda_schedule="constant", t_max=50.0, warmup_ratio=0.0)
    first = train_loop_per_worker(loop_config(tiny_llama, table16, epochs=1, max_steps=1, lr=1e-9))
    bound = first["history"][0]["neg_nll"] + 0.5
    out = train_loop_per_worker(loop_config(tiny_llama, table16, guardrail_neg_nll_max=bound, **kw))
    hist, state = out["history"], out["state"]
    backoffs = [m for m in hist if m["guardrail"] == GUARDRAIL_CODES["backoff"]]
    assert backoffs and backoffs[0]["neg_nll"] > bound
    muls = [m["lambda_multiplier"] for m in hist]
    assert muls[0] == 1.0 and min(muls) < 1.0 and all(b <= a for a, b in zip(muls, muls[1:]))
    assert [e["action"] for e in state["guardrail"]["events"]][: len(backoffs)] == ["backoff"] * len(backoffs)

    out = train_loop_per_worker(loop_config(tiny_llama, table16, guardrail_neg_nll_max=bound,
                                            guardrail_action="stop", **kw))
    assert out["state"]["stop_reason"] and "guardrail_neg_nll_max" in out["state"]["stop_reason"]
    assert out["state"]["global_step"] < out["total_steps"]
    assert out["history"][-1]["guardrail"] == GUARDRAIL_CODES["stop"]


def test_shuffle_order_key_is_seeded_and_layout_free(table16):
    from forgetting_ray.stages.train import _order_key

    tbl = table16.select(["sample_id"])
    k = _order_key(tbl, seed=42, epoch=0).column("_order").to_numpy()
    assert len(set(k.tolist())) == len(k) and (k >= 0).all()
    # the key of a row does not depend on which block it sits in
    halves = np.concatenate([_order_key(tbl.slice(0, 7), seed=42, epoch=0).column("_order").to_numpy(),
                             _order_key(tbl.slice(7), seed=42, epoch=0).column("_order").to_numpy()])
    assert np.array_equal(k, halves)
    order = np.argsort(k)
    assert not np.array_equal(order, np.arange(len(k)))
    assert not np.array_equal(order, np.argsort(_order_key(tbl, seed=42, epoch=1).column("_order").to_numpy()))
    assert not np.array_equal(order, np.argsort(_order_key(tbl, seed=7, epoch=0).column("_order").to_numpy()))

"""Ray Train worker of test_export_zero3.  Ray workers cannot import the tests package, so the test
registers this module with cloudpickle to be shipped by value.

Imports live inside the function: cloudpickle ships a by-value function together with the
submodules of its global modules that the code names, and ``torch.distributed.config`` (found via
``model.config``) cannot be pickled.
"""

from __future__ import annotations

STEPS = 3


def train_and_export(cfg: dict) -> None:
    import json
    import os
    from pathlib import Path

    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    torch.set_num_threads(1)
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from forgetting_ray.losses import forgetting_loss
    from forgetting_ray.scoring import token_nll
    from forgetting_ray.train import export as ex

    deepspeed.init_distributed(dist_backend="gloo")  # reuses Ray's gloo group
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * world,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }
    hf_ds = HfDeepSpeedConfig(ds)  # kept alive (weakly referenced): from_pretrained partitions under zero.Init
    model = AutoModelForCausalLM.from_pretrained(cfg["base"], dtype=torch.float32, use_safetensors=True)
    if model.model.embed_tokens.weight.numel() != 0:
        raise AssertionError("expected ZeRO-3 partitioned parameters")
    torch.manual_seed(0)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    )

    class TokenNLL(torch.nn.Module):  # the train loop's shape: engine -> wrapper.module -> PEFT model
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, ids, mask, labels):
            return token_nll(self.module, ids, mask, labels)

    wrapper = TokenNLL(model)
    opt = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=opt, config=ds)
    vocab = model.config.vocab_size

    def train(engine) -> None:
        g = torch.Generator().manual_seed(100 + rank)
        for step in range(STEPS):
            ids = torch.randint(0, vocab, (2, 24), generator=g)
            labels = ids.clone()
            labels[:, :4] = -100  # a "prompt"
            cls = torch.where(torch.rand(ids.shape, generator=g) < 0.7, 1, -1).to(torch.int8) * (labels != -100)
            nll = engine(ids, torch.ones_like(ids), labels)
            out = forgetting_loss(nll, cls, lam=0.1 * step / STEPS)
            engine.backward(out.loss)
            engine.step()

    train(engine)

    # Records for the driver, taken the independent way: a forward of the live model and an
    # explicit gather of the LoRA weights (both collectives).
    probe = ex.probe_inputs(vocab, seed=99)
    live_logits = ex.model_logits(model, probe)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with deepspeed.zero.GatheredParameters(list(lora.values()), modifier_rank=None):
        gathered = {n: p.detach().clone() for n, p in lora.items()}

    if cfg["show_trap"] and rank == 0:
        # The trap itself: PEFT saving without a gather writes empty tensors, and the check sees it.
        trap = Path(cfg["trap_dir"])
        model.save_pretrained(trap)
        try:
            ex.check_tensors(trap)
            trap_error = None
        except ex.ExportValidationError as e:
            trap_error = str(e)
        Path(cfg["trap_result"]).write_text(json.dumps({"error": trap_error}))

    tok = AutoTokenizer.from_pretrained(cfg["base"])
    out = ex.export_model(engine, tok, cfg["out"], lora=True, dtype="float32", base_model_path=cfg["base"],
                          train_config={"test": "zero3", "steps": STEPS})
    if not (Path(out) == Path(cfg["out"]) and (Path(out) / "manifest.json").is_file()):
        raise AssertionError(f"rank {rank}: export_model returned before the export was in place")

    # Second engine in the same workers: ZeRO-2, full fine-tune (weights whole on every rank).
    del hf_ds
    unset_hf_deepspeed_config()
    full = AutoModelForCausalLM.from_pretrained(cfg["base"], dtype=torch.float32, use_safetensors=True)
    ds2 = {**ds, "zero_optimization": {"stage": 2}}
    engine2, *_ = deepspeed.initialize(model=TokenNLL(full), optimizer=torch.optim.AdamW(full.parameters(), lr=1e-3),
                                       config=ds2)
    train(engine2)
    full_logits = ex.model_logits(full, probe)
    ex.export_model(engine2, tok, cfg["out_zero2"], lora=False, dtype="float32", base_model_path=cfg["base"],
                    train_config={"test": "zero2", "steps": STEPS})
    if rank == 0:
        save_file({"probe": probe, "logits": live_logits, "zero2_logits": full_logits, **gathered}, cfg["records"])
    ray.train.report({"rank": rank})

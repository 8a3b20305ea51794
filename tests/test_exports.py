"""The export folder's format and model identity: what to load from a location, and that every cache key built
on ``exports.model_identity`` (reference/train runs, score, eval) follows the model's content and nothing else.

No Ray and no DeepSpeed: the models are tiny random ones, the exports written by hand with the product's
manifest writer."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_partitioned_table
from forgetting_ray import exports
from forgetting_ray.aliases import ALIASES, PROVENANCE_FILE
from forgetting_ray.config import PipelineConfig
from forgetting_ray.data.table import write_token_table
from forgetting_ray.exports import ADAPTER, MANIFEST, MERGED, model_identity
from forgetting_ray.stages import train as train_stage
from forgetting_ray.stages.evaluate import eval_key, resolve_eval_model
from forgetting_ray.stages.score import ScoreInputError, resolve_reference, score_location

ALIAS = next(iter(ALIASES))


@pytest.fixture(autouse=True)
def own_hash_memo(tmp_path, monkeypatch):
    """The file-hash memo lives in the node's cache: each test starts with an empty one."""
    monkeypatch.setenv("FORGETTING_RAY_CACHE", str(tmp_path / "cache"))


def _touch(folder: Path, *names: str) -> Path:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


# ------------------------------------------------------------------------------------------
# resolve
# ------------------------------------------------------------------------------------------
def test_resolve_names_what_to_load(tmp_path):
    export = _touch(tmp_path / "export", f"{ADAPTER}/adapter_config.json", f"{ADAPTER}/tokenizer.json",
                    f"{MERGED}/config.json", f"{MERGED}/tokenizer_config.json", MANIFEST)
    adapter, merged = str(export / ADAPTER), str(export / MERGED)
    assert exports.resolve(export, prefer=ADAPTER) == exports.ModelSource(ADAPTER, adapter, str(export), adapter)
    assert exports.resolve(export) == exports.ModelSource(MERGED, merged, str(export), merged)
    peft = _touch(tmp_path / "peft", "adapter_config.json")
    assert exports.resolve(peft, prefer=ADAPTER) == exports.ModelSource(ADAPTER, str(peft), None, None)
    plain = _touch(tmp_path / "plain", "config.json", "tokenizer.json")
    assert exports.resolve(plain) == exports.ModelSource(exports.PLAIN, str(plain), None, str(plain))
    assert exports.resolve("org/model") is None and exports.resolve(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="prefer"):
        exports.resolve(export, prefer="plain")

    # each stage keeps its own answer to a location that is no model folder
    assert resolve_eval_model(export) == merged and resolve_eval_model(plain) == str(plain)
    assert resolve_eval_model("org/model") == "org/model"
    assert resolve_reference(export).path == adapter
    with pytest.raises(ScoreInputError, match="is not a folder"):
        resolve_reference(tmp_path / "missing")
    with pytest.raises(ScoreInputError, match=rf"^reference model {tmp_path / 'other'}: expected an export folder"):
        resolve_reference(_touch(tmp_path / "other", "notes.txt"))


# ------------------------------------------------------------------------------------------
# model_identity
# ------------------------------------------------------------------------------------------
def test_identity_of_aliases_hub_ids_and_exports(tmp_path):
    assert model_identity(ALIAS) == {"alias": ALIAS}
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / PROVENANCE_FILE).write_text(json.dumps({"alias": ALIAS}))
    assert model_identity(converted) == {"alias": ALIAS}  # wherever this node converted it
    assert model_identity("org/model") == {"hub_id": "org/model", "revision": "main"}
    assert model_identity("org/model", revision="v2") == {"hub_id": "org/model", "revision": "v2"}

    # an export by the files its manifest lists: not by when, where or how fast it was written
    export = _touch(tmp_path / "export", f"{MERGED}/config.json")
    exports.write_manifest(export, {"created": "monday", "base_model_path": "/node/a"})
    first = model_identity(export)
    exports.write_manifest(export, {"created": "tuesday", "base_model_path": "/node/b"})
    assert model_identity(export) == first and set(first) == {"export"}
    (export / MERGED / "config.json").write_text('{"changed": 1}')
    exports.write_manifest(export, {})
    assert model_identity(export) != first

    # an export layout without its manifest still answers by the files of merged/ and adapter/
    bare = _touch(tmp_path / "bare", f"{MERGED}/config.json", f"{MERGED}/model.safetensors")
    assert set(model_identity(bare)["files"]) == {f"{MERGED}/config.json", f"{MERGED}/model.safetensors"}


def test_file_hashes_are_remembered_by_stamp(tmp_path, monkeypatch):
    folder = _touch(tmp_path / "model", "config.json")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    calls = []
    real = exports.file_sha256
    monkeypatch.setattr(exports, "file_sha256", lambda p: calls.append(Path(p).name) or real(p))

    # just written: a second write in the same timestamp tick could keep the stamp, so nothing is remembered
    first = model_identity(folder)
    model_identity(folder)
    assert calls.count("model.safetensors") == 2

    old = time.time() - 3600
    for f in folder.iterdir():
        os.utime(f, (old, old))
    calls.clear()
    assert model_identity(folder) == first == model_identity(folder)
    assert calls == ["config.json", "model.safetensors"]  # hashed once, then served from the memo

    # same size, its old mtime put back (rsync -t, cp -p): the ctime still tells
    weights.write_bytes(b"b" * 64)
    os.utime(weights, (old, old))
    assert model_identity(folder) != first


# ------------------------------------------------------------------------------------------
# every cache key follows the model's content, and only it
# ------------------------------------------------------------------------------------------
def _perturb_weights(folder: Path, seed: int) -> None:
    """New values in one tensor of the same shape: every file keeps its size."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(f)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(seed))
    save_file(tensors, f, metadata={"format": "pt"})


def _write_export(base: Path, out: Path, *, seed: int) -> Path:
    """An export as the writer lays it out: the LoRA adapter, the merged model, both with the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero: a trained adapter has moved it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out / ADAPTER)
    tok.save_pretrained(out / ADAPTER)
    model.merge_and_unload().save_pretrained(out / MERGED)
    tok.save_pretrained(out / MERGED)
    exports.write_manifest(out, {"lora": True, "base_model_path": str(base)})
    return out


def _merged_only(export: Path, out: Path) -> Path:
    """The same merged weights, exported without LoRA (no adapter/)."""
    shutil.copytree(export / MERGED, out / MERGED)
    exports.write_manifest(out, {"lora": False})
    return out


def _change_chat_template(*folders: Path) -> None:
    for folder in folders:
        cfg_file = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["chat_template"] = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
        cfg_file.write_text(json.dumps(cfg))
        (folder / "chat_template.jinja").unlink(missing_ok=True)


def _cfg(run_dir: Path, base: Path, tokenizer: Path | None = None) -> PipelineConfig:
    small = {"micro_batch_size": 2, "grad_accum": 1, "deepspeed": {"enabled": False}}
    return PipelineConfig.model_validate({
        "run_dir": str(run_dir),
        "model": {"name_or_path": str(base), "tokenizer": str(tokenizer) if tokenizer else None},
        "reference": small, "training": small,
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "eval": {"tasks": ["asdiv"]},
        "tracking": {"enabled": False},
    })


def _finetune_key(cfg: PipelineConfig, stage: str, table: Path) -> str:
    ft = train_stage._finetune_config(cfg, stage)
    return train_stage._identify(cfg, stage, ft, train_stage._check_inputs(cfg, ft, table)).key


def _keys(run_dir: Path, base: Path, export: Path, tables: dict[str, Path]) -> dict[str, str]:
    """Every cache key that a model enters, computed by the stages' own functions."""
    cfg = _cfg(run_dir, base)
    return {
        "reference": _finetune_key(cfg, "reference", tables["classes"]),
        "train": _finetune_key(cfg, "train", tables["classes"]),
        "score": score_location(cfg, tables["tokens"], export)[0],
        # as pipeline._evaluate keys each model it evaluates
        "eval_base": eval_key(cfg, model_identity(str(base))),
        "eval_export": eval_key(cfg, model_identity(str(export))),
    }


@pytest.fixture
def world(tiny_llama, tiny_tokenizer_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    tables = tmp_path / "tables"
    tables.mkdir()
    write_token_table(make_partitioned_table(tiny_tokenizer_dir, n=8, with_class=False), tables / "tokens.parquet")
    pq.write_table(make_partitioned_table(tiny_tokenizer_dir, n=8), tables / "classes.parquet")
    return {"run_dir": tmp_path / "run", "base": base, "export": _write_export(base, tmp_path / "export", seed=0),
            "tables": {"tokens": tables / "tokens.parquet", "classes": tables / "classes.parquet"}, "tmp": tmp_path}


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in before if before[k] != after[k]}


def test_every_cache_key_follows_the_model_and_nothing_else(world):
    run_dir, base, export, tables, tmp = (world[k] for k in ("run_dir", "base", "export", "tables", "tmp"))
    keys = _keys(run_dir, base, export, tables)
    assert len(set(keys.values())) == len(keys)

    # the same files elsewhere on this node, or with every mtime touched: the same keys
    shutil.copytree(base, tmp / "elsewhere" / "base")
    shutil.copytree(export, tmp / "elsewhere" / "export")
    assert _keys(run_dir, tmp / "elsewhere" / "base", tmp / "elsewhere" / "export", tables) == keys
    later = time.time() + 3600
    for f in [*base.rglob("*"), *export.rglob("*")]:
        os.utime(f, (later, later))
    assert _keys(run_dir, base, export, tables) == keys

    # another adapter (a re-export, merged/ follows it): what scores or evaluates the export
    other = _write_export(base, tmp / "export_other_adapter", seed=1)
    assert _changed(keys, _keys(run_dir, base, other, tables)) == {"score", "eval_export"}

    # the same model exported without LoRA: the score loads merged/ instead of base + adapter
    merged_only = _merged_only(export, tmp / "export_merged_only")
    assert exports.resolve(merged_only, prefer=ADAPTER).mode == MERGED
    assert _changed(keys, _keys(run_dir, base, merged_only, tables)) == {"score", "eval_export"}

    # other base weights of the same shapes: everything built on the base
    new_base = tmp / "base_perturbed"
    shutil.copytree(base, new_base)
    _perturb_weights(new_base, seed=1)
    assert _changed(keys, _keys(run_dir, new_base, export, tables)) == {"reference", "train", "score", "eval_base"}

    # another tokenizer (in the base and, as score requires, in the reference): every key
    new_tok_base, new_tok_export = tmp / "base_new_tokenizer", tmp / "export_new_tokenizer"
    shutil.copytree(base, new_tok_base)
    shutil.copytree(export, new_tok_export)
    _change_chat_template(new_tok_base, new_tok_export / MERGED, new_tok_export / ADAPTER)
    exports.write_manifest(new_tok_export, {"lora": True})
    assert _changed(keys, _keys(run_dir, new_tok_base, new_tok_export, tables)) == set(keys)


def test_a_tokenizer_from_elsewhere_enters_the_finetune_keys(world):
    run_dir, base, tables, tmp = (world[k] for k in ("run_dir", "base", "tables", "tmp"))
    tok = tmp / "tokenizer"
    tok.mkdir()
    for f in base.iterdir():
        if f.name in exports.TOKENIZER_FILES:
            shutil.copy2(f, tok / f.name)
    keys = {stage: _finetune_key(_cfg(run_dir, base, tok), stage, tables["classes"]) for stage in ("reference", "train")}
    own = {stage: _finetune_key(_cfg(run_dir, base), stage, tables["classes"]) for stage in ("reference", "train")}
    assert keys != own  # keyed by the tokenizer folder's files too
    _change_chat_template(tok)
    changed = {stage: _finetune_key(_cfg(run_dir, base, tok), stage, tables["classes"]) for stage in keys}
    assert _changed(keys, changed) == {"reference", "train"}


# ------------------------------------------------------------------------------------------
# an export of another base model
# ------------------------------------------------------------------------------------------
def _recorded_base(world: dict, base: Path) -> dict:
    """train_config.base_identity as the train stage hands it to the export writer (its driver-side job)."""
    cfg = _cfg(world["run_dir"], base)
    ft = train_stage._finetune_config(cfg, "reference")
    inputs = train_stage._check_inputs(cfg, ft, world["tables"]["classes"])
    run = train_stage._identify(cfg, "reference", ft, inputs)
    job = train_stage._worker_job(cfg, "reference", ft, inputs, run, world["tmp"] / "out", "unused", None)
    return job.train_config["base_identity"]


def test_an_export_of_another_base_is_refused_naming_both(world, tiny_models):
    base, export, tmp = world["base"], world["export"], world["tmp"]
    before = exports.file_hashes(export)
    # the hand-written export records no base identity: its architecture is compared with the base's
    exports.check_export_base(str(export), str(base))
    with pytest.raises(exports.ExportError, match=rf"^reference export {export} was trained from a different base "
                                                 rf"model \({base}\) than model\.name_or_path '{tiny_models['qwen2']}': "
                                                 r"merged/config\.json differs in model_type: 'llama' vs 'qwen2'"):
        exports.check_export_base(str(export), str(tiny_models["qwen2"]))
    # an export that records its base (as the train stage's exports do): other weights of the same shapes are caught
    recorded = tmp / "export_recorded"
    shutil.copytree(export, recorded)
    exports.write_manifest(recorded, {"lora": True, "base_model": str(base),
                                      "train_config": {"base_identity": _recorded_base(world, base)}})
    exports.check_export_base(str(recorded), str(base))
    exports.check_export_base(None, str(tiny_models["qwen2"]))  # a plain folder: nothing recorded, nothing checked
    other = tmp / "base_perturbed"
    shutil.copytree(base, other)
    _perturb_weights(other, seed=1)
    with pytest.raises(exports.ExportError, match=rf"^reference export {recorded} was trained from a different base "
                                                 rf"model \({base}; manifest\.json train_config\.base_identity\) than "
                                                 rf"model\.name_or_path '{other}'"):
        exports.check_export_base(str(recorded), str(other))
    assert isinstance(exports.ExportError("x"), exports.UserError)
    assert exports.file_hashes(export) == before and not world["run_dir"].exists()  # nothing written

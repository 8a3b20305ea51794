"""The val_nll objective: the mean NLL of every response token of the validation split, batched to scoring's
token budget."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_partitioned_table
from forgetting_ray.config import ModelConfig
from forgetting_ray.models import load_model
from forgetting_ray.scoring import naive_token_nll
from forgetting_ray.search import TuneInputError
from forgetting_ray.tuning.objectives import validation_nll


def test_validation_nll_is_the_mean_over_every_response_token(tiny_llama, tiny_tokenizer_dir, tmp_path):
    table = make_partitioned_table(tiny_tokenizer_dir, n=12, max_len=48, with_class=False)
    pq.write_table(table, tmp_path / "val.parquet")
    model_cfg = ModelConfig(name_or_path=str(tiny_llama))
    model = load_model(str(tiny_llama)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in table.to_pylist():  # one row at a time: no padding, full logits
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            scored = labels[0, 1:] != -100
            total += float(naive_token_nll(model, ids, torch.ones_like(ids), labels)[0, 1:][scored].double().sum())
            count += int(scored.sum())
    # a budget of a few rows per batch: padded batches, a ragged last chunk at the head
    got = validation_nll(str(tiny_llama), str(tmp_path / "val.parquet"), model_cfg=model_cfg, batch_tokens=150,
                         chunk_size=7)
    assert got["val_tokens"] == count
    assert got["val_nll"] == pytest.approx(total / count, rel=1e-5)


def test_validation_split_without_response_tokens_is_refused(tiny_llama, tiny_tokenizer_dir, tmp_path):
    table = make_partitioned_table(tiny_tokenizer_dir, n=2, max_len=16, with_class=False)
    no_labels = [[-100] * len(x) for x in table.column("labels").to_pylist()]
    table = table.set_column(table.schema.get_field_index("labels"), "labels", [no_labels])
    pq.write_table(table, tmp_path / "val.parquet")
    with pytest.raises(TuneInputError, match="no response tokens"):
        validation_nll(str(tiny_llama), str(tmp_path / "val.parquet"),
                       model_cfg=ModelConfig(name_or_path=str(tiny_llama)), batch_tokens=1024)

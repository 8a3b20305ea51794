import numpy as np
import pytest
import torch

from forgetting_ray.data.collate import collate


def test_right_pads_classes_with_labels():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "token_class": np.array([0, 1, -1], dtype=np.int8)},
        {"input_ids": [8], "labels": [-100], "token_class": np.array([0], dtype=np.int8)},
    ]
    b = collate(rows, pad_token_id=0, pad_to_multiple_of=4)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100], [-100, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert b["token_class"].dtype == torch.int8
    assert b["token_class"].tolist() == [[0, 1, -1, 0], [0, 0, 0, 0]]


def test_column_batches_and_no_class():
    b = collate({"input_ids": [np.array([1, 2]), np.array([3])], "labels": [np.array([1, 2]), np.array([3])]}, 9)
    assert "token_class" not in b and b["input_ids"].tolist() == [[1, 2], [3, 9]]


def test_misaligned_classes_are_an_error():
    with pytest.raises(ValueError, match="misaligned"):
        collate([{"input_ids": [1, 2], "labels": [-100, 2], "token_class": [1, 1]}], 0)

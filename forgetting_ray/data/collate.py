"""Right-padding collator for token-table rows.

``token_class`` is padded with 0 together with ``labels`` (padded with -100), so the positive and
negative masks of a batch come from the batch alone: O(batch) per step, never a scan of the corpus
(docs/method.md §11 item 13).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..constants import IGNORE_INDEX



def _pad(rows: Sequence[Any], width: int, value: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        r = torch.as_tensor(np.asarray(r))
        out[i, : r.numel()] = r
    return out


def collate(
    batch: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Rows with ``input_ids``, ``labels`` and optionally ``token_class`` -> padded tensors.

    Accepts a list of row dicts or a dict of columns (a Ray Data / Arrow batch).
    """
    cols = batch if isinstance(batch, Mapping) else {k: [row[k] for row in batch] for k in batch[0]}
    ids = cols["input_ids"]
    labels = cols["labels"]
    width = max(len(r) for r in ids)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = {
        "input_ids": _pad(ids, width, pad_token_id, torch.long),
        "labels": _pad(labels, width, IGNORE_INDEX, torch.long),
        "attention_mask": _pad([np.ones(len(r), dtype=np.int64) for r in ids], width, 0, torch.long),
    }
    if "token_class" in cols and cols["token_class"] is not None:
        out["token_class"] = _pad(cols["token_class"], width, 0, torch.int8)
        if (out["token_class"].ne(0) & out["labels"].eq(IGNORE_INDEX)).any():
            raise ValueError("token_class marks a position whose label is -100: classes and labels are misaligned")
    return out

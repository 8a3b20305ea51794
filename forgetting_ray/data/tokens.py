"""Token ids back to text, one piece per token: what the audit page colours and the noise study aligns with
the characters a corruption changed."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase


def decode_pieces(tokenizer: "PreTrainedTokenizerBase", ids: Sequence[int]) -> list[str]:
    """Text of each token such that ``"".join(pieces)`` is the decoded sequence.

    Decoding tokens one by one loses leading spaces (SentencePiece) and splits multi-byte
    characters; instead decode a small window and keep the new suffix.  A token that ends inside a
    character gets ``""`` and the character goes to the token that completes it.
    """
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ids = [int(i) for i in ids]
    pieces: list[str] = []
    prefix = read = 0  # ids[prefix:read] is already-emitted context
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], **kw) if read > prefix else ""
        now = tokenizer.decode(ids[prefix : i + 1], **kw)
        if now.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")  # incomplete character: wait for the next token
            continue
        # A decoder may rewrite the context's tail once more tokens follow; keep what is new.
        pieces.append(now[len(before if now.startswith(before) else os.path.commonprefix([before, now])) :])
        prefix, read = read, i + 1
    return pieces

"""Token ids in: the one check of (prompt_ids, response_ids) pairs against the model.

Every caller's ids pass here once (the server at its edge, Python callers inside
Scorer.score); what comes out is a TokenPair the forward trusts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from anchorcredit.backend import TokenPair
from anchorcredit.errors import InputError


def as_ids(x: Any, field: str, index: int, vocab: int) -> np.ndarray:
    """One id list -> int64 array; InputError naming `field` and the sequence if bad."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().to("cpu").numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise InputError(f"must be a 1-D list of token ids, got shape {arr.shape}", field, index)
    if arr.size == 0:
        raise InputError("must hold at least one token id", field, index)
    if arr.dtype.kind not in "iu":
        raise InputError(f"token ids must be integers, got dtype {arr.dtype}", field, index)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab))
    if bad.size:
        j = int(bad[0])
        raise InputError(
            f"token id {int(arr[j])} at position {j} is outside [0, {vocab})", field, index
        )
    return arr.astype(np.int64, copy=False)


def validate_pairs(
    pairs: Sequence[Any], vocab_size: int, max_positions: int | None
) -> list[TokenPair]:
    """Check every (prompt_ids, response_ids) pair; InputError names the field and index.

    Pairs that are already TokenPairs checked against this vocabulary pass through.
    """
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Sequence):
        raise InputError("expected a list of (prompt_ids, response_ids) pairs", "sequences")
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, TokenPair) and pair.vocab_size == vocab_size:
            out.append(pair)
            continue
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise InputError("expected a (prompt_ids, response_ids) pair", f"sequences[{i}]", i)
        p = as_ids(pair[0], f"sequences[{i}].prompt_ids", i, vocab_size)
        r = as_ids(pair[1], f"sequences[{i}].response_ids", i, vocab_size)
        if max_positions is not None and len(p) + len(r) > max_positions:
            raise InputError(
                f"prompt + response is {len(p) + len(r)} tokens, over the model's "
                f"{max_positions} positions",
                f"sequences[{i}].response_ids",
                i,
            )
        out.append(TokenPair(p, r, vocab_size))
    return out

"""Token budgets and out-of-memory splitting: the one definition of each (torch-free).

`greedy_chunks` cuts work into in-order groups under a token budget; the server's batcher,
the client (server limits) and the CLI (flush groups) all cut with it. `halve_on_oom` is
the one place a batch is split after the device runs out of memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from anchorcredit.errors import DeviceOutOfMemory, is_oom

T = TypeVar("T")
R = TypeVar("R")


def greedy_chunks(
    lengths: Sequence[int], max_tokens: int = 0, max_items: int = 0
) -> list[list[int]]:
    """Indices 0..len-1 in order, cut into groups of at most max_tokens tokens and max_items
    items (0 = unbounded). An item longer than the budget goes alone.

    In order (not length-sorted): an item's batch mates, hence its float rounding, stay a
    pure function of the input, so the same input gives bit-identical results.
    """
    out: list[list[int]] = []
    cur: list[int] = []
    tokens = 0
    for i, n in enumerate(lengths):
        full = (max_items and len(cur) >= max_items) or (max_tokens and tokens + n > max_tokens)
        if cur and full:
            out.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += n
    if cur:
        out.append(cur)
    return out


def halve_on_oom(
    run: Callable[[list[T]], list[R]],
    items: Sequence[T],
    on_split: Callable[[int], None] | None = None,
) -> list[R]:
    """run(items), splitting the items in halves (in order) whenever the device runs out of
    memory, down to single items; a single item that still does not fit raises
    DeviceOutOfMemory. `on_split(n)` is told the size of every batch that was split.

    The retry happens outside the except block, so the failed attempt's frames (and the
    tensors they hold) are freed first.
    """
    results: list[R] = []
    todo: list[list[T]] = [list(items)]
    while todo:
        batch = todo.pop(0)
        try:
            got = run(batch)
        except Exception as exc:
            if not is_oom(exc):
                raise
            if len(batch) == 1:
                raise DeviceOutOfMemory(
                    "one sequence does not fit on the device even alone; send a shorter one"
                ) from exc
            got = None
        if got is None:
            if on_split is not None:
                on_split(len(batch))
            h = len(batch) // 2
            todo[:0] = [batch[:h], batch[h:]]
            continue
        results.extend(got)
    return results

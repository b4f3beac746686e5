"""anchorcredit.budget: the one token-budget splitter and the one out-of-memory split."""

from __future__ import annotations

import pytest

from anchorcredit.budget import greedy_chunks, halve_on_oom
from anchorcredit.errors import DeviceOutOfMemory


def test_greedy_chunks_in_order_within_budget_and_item_cap():
    assert greedy_chunks([3, 3, 3, 10, 1], max_tokens=6) == [[0, 1], [2], [3], [4]]
    assert greedy_chunks([1, 1, 1], max_items=2) == [[0, 1], [2]]
    assert greedy_chunks([5, 5], max_tokens=0, max_items=0) == [[0, 1]]  # 0 = unbounded
    assert greedy_chunks([]) == []


class OutOfMemoryError(RuntimeError):
    """Named like torch's: anchorcredit.errors.is_oom recognises it without torch."""


def test_halve_on_oom_splits_in_order_until_it_fits():
    calls, splits = [], []

    def run(batch):
        calls.append(list(batch))
        if len(batch) > 1:
            raise OutOfMemoryError("simulated")
        return [x * 10 for x in batch]

    assert halve_on_oom(run, [1, 2, 3, 4], on_split=splits.append) == [10, 20, 30, 40]
    assert [len(c) for c in calls][:3] == [4, 2, 1] and splits == [4, 2, 2]


def test_halve_on_oom_single_item_and_other_errors():
    def oom(batch):
        raise OutOfMemoryError("CUDA out of memory")

    with pytest.raises(DeviceOutOfMemory, match="does not fit"):
        halve_on_oom(oom, [1])

    def broken(batch):
        raise ValueError("not an OOM")

    with pytest.raises(ValueError, match="not an OOM"):  # never split: only OOM is
        halve_on_oom(broken, [1, 2])

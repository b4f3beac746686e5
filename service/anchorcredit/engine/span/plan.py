"""Host side of the span kernel: block tables per batch layout and the launches of one call.

A call is planned once per layout: the block tables (one int32 table, pinned, copied
without blocking) and everything about its launches that does not depend on the values of
q and k (checks, tiles, grids, constexprs) are cached, so every selected layer of a batch
after the first only allocates its outputs and binds its tensors. No host sync when
cu_seqlens/prompt_lens are Python ints and check_finite=False.

Outputs: the LSE (and the one-pass path's per-column span sums) per token position; span
rows, WAAD and FAI per response position, the batch's response positions end to end
(`OUT_SHIFT` moves a sequence's position to its slot), so a layer's statistics are one
[Hq, n_resp] tensor per field (PackedStats) with no gather.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from anchorcredit.engine.types import PackedStats


@dataclass(frozen=True)
class Layout:
    """One batch layout's int32 tables on the device, slices of one tensor copied once.

    cu [B+1]; row blocks (sequence, first row, index in its sequence) over the responses;
    column tiles (sequence, first column) over the responses (column pass) and over whole
    sequences (the one-pass LSE path), longest first; resp_start [B] each sequence's first
    response position, out_shift [B] its response slot minus that position; resp [n_resp]
    the response positions, resp_end [n_resp] the end of each one's sequence (FAI's |T(s)|
    when the band is folded into the row pass); resp_bounds [B+1] where each sequence's
    response starts among them, resp_counts [B] its length.
    """

    cu: torch.Tensor
    row_seq: torch.Tensor
    row_start: torch.Tensor
    row_index: torch.Tensor
    col_seq: torch.Tensor
    col_start: torch.Tensor
    all_seq: torch.Tensor
    all_start: torch.Tensor
    resp_start: torch.Tensor
    out_shift: torch.Tensor
    resp: torch.Tensor
    resp_end: torch.Tensor
    resp_bounds: torch.Tensor
    resp_counts: torch.Tensor
    offsets: tuple[int, ...]  # B + 1 response offsets (host ints)
    total: int  # tokens in the batch
    host: torch.Tensor  # the (pinned) source of the copy: kept alive while it may run

    @property
    def n_resp(self) -> int:
        return self.offsets[-1]


def _tiles(begin: np.ndarray, end: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every tile [start, start + size) covering [begin[b], end[b]) of each sequence b:
    (sequence of each tile, its start), sequence after sequence."""
    count = -(-(end - begin) // size)
    seq = np.repeat(np.arange(len(begin)), count)
    within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    return seq, begin[seq] + within * size


def build_layout(
    cu: list[int], prompts: list[int], bm: int, bn: int, all_bn: int, longest_first: bool,
    device: torch.device,
) -> Layout:  # fmt: skip
    cu_a = np.asarray(cu, dtype=np.int64)
    starts, ends = cu_a[:-1] + np.asarray(prompts, dtype=np.int64), cu_a[1:]
    counts = ends - starts
    offsets = np.concatenate([[0], np.cumsum(counts)])
    # The heaviest blocks first (a stable sort), so the long causal rows do not trail at the
    # end of the grid: row blocks by causal length, tiles by the rows still to visit.
    row_seq, row_start = _tiles(starts, ends, bm)
    rows = np.argsort(cu_a[row_seq] - row_start, kind="stable")
    col_seq, col_start = _tiles(starts, ends, bn)
    if longest_first:
        cols = np.argsort(col_start - ends[col_seq], kind="stable")
        col_seq, col_start = col_seq[cols], col_start[cols]
    all_seq, all_start = _tiles(cu_a[:-1], ends, all_bn)
    whole = np.argsort(np.maximum(all_start, starts[all_seq]) - ends[all_seq], kind="stable")
    resp_seq = np.repeat(np.arange(len(counts)), counts)
    parts = [
        cu_a, row_seq[rows], row_start[rows], ((row_start - starts[row_seq]) // bm)[rows],
        col_seq, col_start, all_seq[whole], all_start[whole],
        starts, offsets[:-1] - starts,
        np.arange(int(offsets[-1])) - offsets[:-1][resp_seq] + starts[resp_seq],
        ends[resp_seq], offsets, counts,
    ]  # fmt: skip
    host = torch.from_numpy(np.concatenate(parts).astype(np.int32))
    if device.type == "cuda":  # pinned, so the copy is asynchronous (no host stall)
        host = host.pin_memory()
    table = host.to(device, non_blocking=True)
    pieces = table.split([len(p) for p in parts])
    return Layout(*pieces, offsets=tuple(offsets.tolist()), total=cu[-1], host=host)


@dataclass(frozen=True)
class Launch:
    """One kernel launch, exactly as span_stats_packed makes it (the AOT compile binds the
    same arguments through the JIT's binder)."""

    kernel: Any
    grid: tuple[int, int]
    args: tuple
    options: dict[str, Any]  # constexprs and launch options

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.options)


@dataclass(frozen=True)
class FoldedFai:
    """band="fold"'s second step: FAI from the row pass's per-slot column sums, for the
    response positions, in a few batched ops (the slots summed in a fixed order, then
    divided by |T(s)| = min(end - 1, s + h_hi) - (s + h_lo) + 1; 0 where T(s) is empty)."""

    part: torch.Tensor  # [Hq, slots, total_N] fp32, zeroed once: every run rewrites the same
    layout: Layout
    h_lo: int
    h_hi: int
    fai: torch.Tensor  # [Hq, >= n_resp] (response slots)

    def __call__(self) -> None:
        lay = self.layout
        sums = self.part.index_select(2, lay.resp).sum(1)  # [Hq, n_resp]
        last = torch.minimum(lay.resp_end - 1, lay.resp + self.h_hi)
        count = (last - lay.resp - self.h_lo + 1).float()
        self.fai[:, : lay.n_resp] = torch.where(count > 0, sums / count.clamp(min=1.0), 0.0)


@dataclass(frozen=True)
class Plan:
    """The launches of one call with their outputs; run() launches, collect() reads back.

    Two-pass (the row pass computes the LSE): launches = (row pass, column pass or the
    folded band's FoldedFai), `span` holds each response row's mean distance. One-pass (the
    LSE given): launches = (WAAD's band, the LSE pass), `span` holds per-column sums over
    every position of each sequence."""

    launches: tuple[Launch | FoldedFai, ...]
    layout: Layout
    one_pass: bool
    lse: torch.Tensor  # [Hq, total_N] (base 2 for the row pass's; the given one otherwise)
    span: torch.Tensor
    waad: torch.Tensor
    fai: torch.Tensor

    @property
    def row(self) -> Launch | FoldedFai:
        return self.launches[0]

    @property
    def col(self) -> Launch | FoldedFai:
        return self.launches[1]

    def run(self) -> None:
        for launch in self.launches:
            launch()

    def collect(self) -> PackedStats:
        """The batch's statistics: WAAD/FAI as written, and each sequence's span per head
        (a float64 segment sum, deterministic, no host sync) in a few batched ops."""
        lay = self.layout
        n_resp = lay.n_resp
        if self.one_pass:  # sum over every column of the sequence / |R|
            bounds, values = lay.cu, self.span[:, : lay.total]
        else:  # the mean of the row distances over each response
            bounds, values = lay.resp_bounds, self.span[:, :n_resp]
        # Segment sums as differences of a float64 prefix sum: parallel on the GPU (a
        # per-segment loop would run a 32K-token sequence through one thread per head).
        prefix = torch.nn.functional.pad(values.double().cumsum(1), (1, 0))
        sums = prefix.index_select(1, bounds[1:]) - prefix.index_select(1, bounds[:-1])
        spans = (sums / lay.resp_counts).t()
        return PackedStats(spans.float(), self.waad[:, :n_resp], self.fai[:, :n_resp], lay.offsets)


# Layouts per (device, stream, cu_seqlens, prompt_lens, tiles, horizon mode): every selected
# layer of a batch reuses the first layer's tables. A trainer's batches rarely repeat a
# layout, so the cache stays small (each entry holds ~4 bytes per token, pinned and on the
# device); the lock keeps it consistent when several threads score.
_LAYOUTS: OrderedDict[tuple, Layout] = OrderedDict()
_LAYOUTS_LOCK = threading.Lock()
LAYOUT_CACHE_SIZE = 16


def layout_for(
    cu: list[int], prompts: list[int], bm: int, bn: int, all_bn: int, longest_first: bool,
    device: torch.device,
) -> Layout:  # fmt: skip
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, tuple(cu), tuple(prompts), bm, bn, all_bn, longest_first)
    with _LAYOUTS_LOCK:
        got = _LAYOUTS.get(key)
        if got is None:
            got = build_layout(cu, prompts, bm, bn, all_bn, longest_first, device)
            _LAYOUTS[key] = got
            while len(_LAYOUTS) > LAYOUT_CACHE_SIZE:
                _LAYOUTS.popitem(last=False)
        else:
            _LAYOUTS.move_to_end(key)
        return got

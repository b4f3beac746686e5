"""Launch defaults of the span kernel: tiles per device and toolchain.

Each pass takes the first tile of its preference list that fits the device's shared memory
(queried from the device, else the table below by compute capability). Shared memory per
launch is Triton's allocation: the operand streamed through the software pipeline takes one
buffer per stage on sm_90+ (TMA/wgmma) and `stages - 1` on sm_80-class GPUs (cp.async), the
resident operand one, plus ~1 KiB of scratch (`shared_bytes`, checked against every cubin
of the AOT table: bench/span_aot.py, tests/bench/test_span_aot.py). Registers: every GPU
here has 64K per SM and 255 per thread, so a tile's register cost shows as spills, which the
AOT check keeps at zero under both toolchains (triton 3.6, the GPU image's, and CI's).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

KIB = 1024


@dataclass(frozen=True)
class Blocks:
    """One pass's launch configuration."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Max dynamic shared memory per block (opt-in), bytes, per compute capability (CUDA C
# Programming Guide, technical specifications): A100/A30 163 KiB; A10/A40/RTX 30 (sm_86),
# L4/L40/RTX 40 (sm_89) and RTX 50 / RTX PRO (sm_120) 99 KiB; H100/H200/B200 227 KiB.
SHARED_OPTIN = {
    (8, 0): 163 * KIB, (8, 6): 99 * KIB, (8, 7): 163 * KIB, (8, 9): 99 * KIB,
    (9, 0): 227 * KIB, (10, 0): 227 * KIB, (10, 3): 227 * KIB, (11, 0): 227 * KIB,
    (12, 0): 99 * KIB, (12, 1): 99 * KIB,
}  # fmt: skip
UNKNOWN_SHARED = 99 * KIB  # the smallest of the table: an unknown GPU gets tiles that fit it
CPU_SHARED = 227 * KIB  # planning on the CPU without a capability (the interpreter)

# Preference lists, largest tile first (16-bit inputs). "row": the row pass (streams K);
# "col": the column pass to the end (streams Q); "band": the column pass of a finite h_hi (a
# few query tiles per key tile); "lse": the one-pass path's LSE pass (streams Q; two fp32
# accumulators per tile element, so 64 x 64 on 8 warps keeps it at <= 128 registers and
# two programs an SM, where 128 x 64 takes 231-255); "waad": its row band.
CANDIDATES = {
    "row": (Blocks(128, 64, 8, 3), Blocks(128, 64, 8, 2), Blocks(64, 64, 4, 2)),
    "col": (Blocks(128, 64, 8, 3), Blocks(128, 64, 8, 2), Blocks(64, 64, 4, 2)),
    "band": (Blocks(64, 32, 4, 2), Blocks(32, 32, 4, 2)),
    "lse": (Blocks(64, 64, 8, 3), Blocks(64, 64, 8, 2), Blocks(64, 32, 4, 2)),
    "waad": (Blocks(64, 32, 4, 2), Blocks(32, 32, 4, 2)),
}
STREAMED = {"row": "n", "col": "m", "band": "m", "lse": "m", "waad": "n"}
FP32 = Blocks(16, 16, 4, 1)  # IEEE fp32 dots on the FMA units: small tiles, no spills
INTERPRETED = Blocks(32, 32, 4, 1)  # fewer (slow) Python steps under the interpreter


@dataclass(frozen=True)
class Device:
    """What the defaults need to know about the GPU a launch is for."""

    capability: tuple[int, int] | None  # None: not a CUDA device (the interpreter)
    shared_bytes: int  # max dynamic shared memory per block

    @property
    def async_pipeline(self) -> bool:
        """sm_90+: TMA/wgmma pipelines keep one shared buffer per stage."""
        return self.capability is not None and self.capability[0] >= 9


def device_for(capability: tuple[int, int] | None, device: torch.device | None = None) -> Device:
    """The device's limits: queried from `device` (CUDA) when given, else the table."""
    if device is not None and device.type == "cuda":
        return _queried(device.index if device.index is not None else torch.cuda.current_device())
    if capability is None:
        return Device(None, CPU_SHARED)
    return Device(tuple(capability), SHARED_OPTIN.get(tuple(capability), UNKNOWN_SHARED))


@functools.lru_cache(maxsize=16)
def _queried(index: int) -> Device:
    cap = torch.cuda.get_device_capability(index)
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", None)
    if not shared:  # older torch: the table, by capability
        shared = SHARED_OPTIN.get(cap, UNKNOWN_SHARED)
    return Device(cap, int(shared))


def shared_bytes(kind: str, cfg: Blocks, head_dim: int, element: int, dev: Device) -> int:
    """Triton's shared memory for one launch of pass `kind` (an upper estimate)."""
    streamed_rows, resident_rows = (
        (cfg.block_n, cfg.block_m) if STREAMED[kind] == "n" else (cfg.block_m, cfg.block_n)
    )
    buffers = cfg.num_stages if dev.async_pipeline else max(cfg.num_stages - 1, 1)
    tile = head_dim * element
    return (buffers * streamed_rows + resident_rows) * tile + KIB


def default_blocks(
    kind: str, dtype: torch.dtype, block_d: int, dev: Device, interpreting: bool = False
) -> Blocks:
    """The launch configuration of pass `kind` ("row", "col", "band", "lse", "waad") for inputs of
    `dtype` with padded head dim `block_d` on `dev`: the first candidate that fits its
    shared memory. benchmark/AOT tools sweep others (bench/span_benchmark.py, span_aot.py)."""
    if interpreting:
        return INTERPRETED
    if dtype == torch.float32:
        return FP32
    element = torch.finfo(dtype).bits // 8
    for cfg in CANDIDATES[kind]:
        if shared_bytes(kind, cfg, block_d, element, dev) <= dev.shared_bytes:
            return cfg
    return CANDIDATES[kind][-1]

"""Ahead-of-time compile of the span kernels exactly as a launch compiles them, and their resources.

    python bench/span_aot.py                # 16-bit table: sm_80/86/89/90 (docs/KERNEL.md)
    python bench/span_aot.py --quick        # bf16, head dim 128 only
    python bench/span_aot.py --fp32         # the fp32 (debug) tiles as well
    python bench/span_aot.py --gqa-pack     # row pass: GQA-packed vs one head per program
    python bench/span_aot.py --fold         # row pass with the band folded in
    PYTHONPATH=<a triton 3.6 install> python bench/span_aot.py   # the GPU image's toolchain

No GPU needed: Triton ships ptxas and cuobjdump (triton/backends/nvidia/bin). For each
configuration, span_stats_packed's own planning (plan_packed, with the tiles it picks for
that GPU's shared memory) builds the launches on CPU tensors; the arguments then go through
the JIT's binder for a CUDA target (the code a launch runs: the same divisibility/alignment
specialisation and launch options), and triton.compile produces the cubin. Registers, spill
stack and local memory come from `cuobjdump -res-usage`, shared memory from the compiled
metadata (checked against the GPU's per-block limit: a launch over it fails), and the loops
(a backward branch in the SASS) from `cuobjdump -sass`: their instruction counts and the
cross-warp traffic inside them (SHFL shuffles, BAR barriers). Exits 1 when a 16-bit
configuration spills or needs more shared memory than its GPU has.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from anchorcredit.engine.span import triton_kernel as tk
from anchorcredit.engine.span.defaults import SHARED_OPTIN, UNKNOWN_SHARED

ARCHS = (80, 86, 89, 90)
DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128, 256)
# (pass, horizon mode, attention variant): the two-pass path (row pass; column pass of the
# band and to the end) and the one-pass path given the LSE (its LSE pass and WAAD's band),
# each plain and with every model-true option (soft-capping, sinks, sliding window).
KERNELS = (
    ("row", "band", "plain"),
    ("row", "band", "variants"),
    ("col", "band", "plain"),
    ("col", "end", "plain"),
    ("col", "end", "variants"),
    ("lse", "end", "plain"),
    ("lse", "end", "variants"),
    ("lse", "band", "plain"),
    ("waad", "end", "plain"),
    ("waad", "end", "variants"),
)
# The GQA-packing sweep: the row pass, bf16, d 64/128, Qwen3-8B's group of 4, one head per
# program vs the group packed, at the same tile (rows x key columns; packed rows = 4 heads
# x rows/4 positions), each with its warps and stages.
PACK_GROUP = 4
PACK_TILES = ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3))
PACK_HEAD_DIMS = (64, 128)
COLUMNS = (
    "triton", "arch", "dtype", "d", "pass", "horizon", "attention", "tile", "warps", "stages",
    "regs", "spill B", "shared KiB", "limit KiB", "loops: SASS instr / SHFL / BAR",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    arch: int
    dtype: torch.dtype
    head_dim: int
    pass_: str  # "row", "col", "lse" or "waad"
    horizon: str  # "band" (h_hi=100) or "end" (h_hi=None)
    attention: str  # "plain" or "variants"
    group: int = 2  # query heads per kv head
    gqa_pack: bool = False  # the row pass packs the group into one program
    tile: tuple[int, int, int, int] | None = None  # rows, columns, warps, stages; None: default
    band: str = "columns"  # plan_packed's band: "fold" sums FAI's band in the row pass

    @property
    def sixteen_bit(self) -> bool:
        return self.dtype in (torch.bfloat16, torch.float16)

    @property
    def shared_limit(self) -> int:
        return SHARED_OPTIN.get(divmod(self.arch, 10), UNKNOWN_SHARED)


@dataclass(frozen=True)
class Loop:
    instructions: int
    shuffles: int
    barriers: int


@dataclass(frozen=True)
class Resources:
    config: Config
    launch: tk.Launch
    registers: int
    spill_bytes: int  # ptxas' spill stack plus local memory: 0 means no spills
    shared_bytes: int
    loops: tuple[Loop, ...]
    specialization: str  # the JIT's cache key of this launch

    @property
    def over_limit(self) -> bool:
        return self.shared_bytes > self.config.shared_limit


def tool(name: str) -> str:
    """Path of one of Triton's bundled CUDA tools (ptxas, cuobjdump), or a clear error."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is missing: this triton build has no CUDA tools")
    return path


def toolchain_present() -> bool:
    try:
        tool("ptxas")
        tool("cuobjdump")
    except (ImportError, FileNotFoundError):
        return False
    return True


def plan_for(config: Config, n: int = 1000) -> tk.Plan:
    """span_stats_packed's plan of a two-sequence batch with the config's inputs, on the CPU
    (the launches are only bound and compiled, never run)."""
    if tk.tiles.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the AOT compile needs the real JIT")
    hkv, d = 2, config.head_dim
    hq = hkv * config.group
    q = torch.zeros(hq, n, d, dtype=config.dtype)
    k = torch.zeros(hkv, n, d, dtype=config.dtype)
    variant: dict[str, Any] = {}
    if config.attention == "variants":
        variant = {"softcap": 30.0, "sinks": torch.zeros(hq), "sliding_window": 64}
    if config.pass_ in ("lse", "waad"):  # the one-pass path: the layer's LSE given
        variant.update(lse=torch.zeros(hq, n), one_pass=True)
    h_hi = 100 if config.horizon == "band" else None
    if config.tile is not None:
        rows, cols, warps, stages = config.tile
        per_head = rows // config.group if config.gqa_pack else rows  # group a power of two
        variant.update(block_m=per_head, block_n=cols, num_warps=warps, num_stages=stages)
    return tk.plan_packed(
        q, k, [0, 600, n], [100, 50], h_hi=h_hi, check_finite=False,
        gqa_pack=config.gqa_pack, capability=divmod(config.arch, 10), band=config.band,
        **variant,
    )  # fmt: skip


def launch_for(config: Config) -> tk.Launch:
    plan = plan_for(config)
    return plan.row if config.pass_ in ("row", "waad") else plan.col


def bind(launch: tk.Launch, arch: int) -> tuple[Any, dict, dict, dict, dict, Any, str]:
    """What JITFunction.run does before compiling, for a CUDA target instead of the
    current device: (source args, options, target, key). Mirrors triton 3.x's run()."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.options)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # the latter is 3.9's
        if hasattr(knobs.compilation, knob):  # run() passes those its triton has (3.6: one)
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    key = compute_cache_key({}, specialization, options)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return kernel, signature, constexprs, attrs, options.__dict__, target, key


def specialization_key(launch: tk.Launch, arch: int = 90) -> str:
    """The JIT's cache key for this launch: a launch with a new key compiles a new kernel."""
    return bind(launch, arch)[-1]


def compile_launch(launch: tk.Launch, arch: int) -> tuple[Any, str]:
    import triton
    from triton.compiler import ASTSource

    kernel, signature, constexprs, attrs, options, target, key = bind(launch, arch)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options), key


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(0x[0-9a-f]+)")


def sass_loops(sass: str) -> tuple[Loop, ...]:
    """Every loop of a SASS listing (a branch back to an earlier address), in code order."""
    code = []
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, ins in code:
        m = _BRANCH.search(ins)
        if m and int(m.group(1), 16) < addr:
            body = [i for a, i in code if int(m.group(1), 16) <= a <= addr]
            loops.append(
                Loop(
                    instructions=len(body),
                    shuffles=sum("SHFL" in i for i in body),
                    barriers=sum(re.search(r"\bBAR\.(SYNC|ARV|RED)", i) is not None for i in body),
                )
            )
    return tuple(loops)


def resources(config: Config) -> Resources:
    launch = launch_for(config)
    compiled, key = compile_launch(launch, config.arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output:\n{usage}")
    return Resources(
        config=config,
        launch=launch,
        registers=int(m.group(1)),
        spill_bytes=int(m.group(2)) + int(m.group(3)),
        shared_bytes=int(compiled.metadata.shared),
        loops=sass_loops(sass),
        specialization=key,
    )


def configs(archs=ARCHS, dtypes=DTYPES, head_dims=HEAD_DIMS, kernels=KERNELS) -> Iterator[Config]:
    for arch in archs:
        for dtype in dtypes:
            for d in head_dims:
                for pass_, horizon, attention in kernels:
                    yield Config(arch, dtype, d, pass_, horizon, attention)


def pack_configs(archs=ARCHS, head_dims=PACK_HEAD_DIMS) -> Iterator[Config]:
    """The GQA-packing sweep: each tile one head per program, then the group packed."""
    for arch in archs:
        for d in head_dims:
            for tile in PACK_TILES:
                for pack in (False, True):
                    yield Config(arch, torch.bfloat16, d, "row", "band", "plain",
                                 group=PACK_GROUP, gqa_pack=pack, tile=tile)  # fmt: skip


def fold_configs(archs=ARCHS, dtypes=DTYPES, head_dims=HEAD_DIMS) -> Iterator[Config]:
    """The band-fold sweep: the row pass (band horizon, plain and model-true attention), its
    column sums folded in, for the 16-bit dtypes."""
    for arch in archs:
        for dtype in dtypes:
            for d in head_dims:
                for attention in ("plain", "variants"):
                    yield Config(arch, dtype, d, "row", "band", attention, band="fold")


def row(r: Resources) -> str:
    import triton

    c, o = r.config, r.launch.options
    tile = f"{o['BLOCK_M']}x{o['BLOCK_N']}"
    if o.get("GQA_PACK", 1) > 1:  # heads x positions x key columns
        tile = f"{o['GQA_PACK']}x{tile}"
    pass_ = c.pass_ + ("+fold" if o.get("FOLD_BAND") else "")
    loops = "; ".join(f"{lp.instructions} / {lp.shuffles} / {lp.barriers}" for lp in r.loops)
    shared = f"{r.shared_bytes / 1024:.1f}" + (" OVER" if r.over_limit else "")
    cells = (
        triton.__version__, f"sm_{c.arch}", str(c.dtype).removeprefix("torch."), c.head_dim,
        pass_, c.horizon, c.attention, tile, o["num_warps"], o["num_stages"], r.registers,
        r.spill_bytes, shared, f"{c.shared_limit / 1024:.0f}", loops,
    )  # fmt: skip
    return "| " + " | ".join(str(x) for x in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/span_aot.py",
                                 description=__doc__.splitlines()[0])  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="bf16, head dim 128 only")
    ap.add_argument("--fp32", action="store_true", help="the fp32 (debug) tiles too")
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--pass", dest="passes", nargs="+", default=None,
                    help="only these passes (row, col, lse, waad)")  # fmt: skip
    ap.add_argument("--gqa-pack", action="store_true",
                    help="the row pass's GQA-packing sweep (bf16, d 64/128, group 4)")  # fmt: skip
    ap.add_argument("--fold", action="store_true",
                    help="the row pass with the band's FAI folded in (16-bit)")  # fmt: skip
    args = ap.parse_args(argv)
    import triton

    dtypes = (torch.bfloat16,) if args.quick else DTYPES + ((torch.float32,) if args.fp32 else ())
    dims = (128,) if args.quick else HEAD_DIMS
    kernels = [kn for kn in KERNELS if args.passes is None or kn[0] in args.passes]
    print(f"triton {triton.__version__}, ptxas {tool('ptxas')}\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    bad = 0
    start = time.perf_counter()
    if args.gqa_pack:
        todo = pack_configs(args.arch)
    elif args.fold:
        todo = fold_configs(args.arch, head_dims=dims)
    else:
        todo = configs(args.arch, dtypes, dims, kernels)
    for config in todo:
        r = resources(config)
        print(row(r), flush=True)
        bad += config.sixteen_bit and (r.spill_bytes > 0 or r.over_limit)
    took = time.perf_counter() - start
    print(f"\n{bad} 16-bit configuration(s) spill or exceed shared memory; compiled in "
          f"{took:.0f} s")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

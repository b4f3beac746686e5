"""The span kernels' shared device helpers, and how the kernels are jitted per interpreter mode.

Every pass loads K tiles, multiplies them with a Q tile and soft-caps the scores the same
way; those steps are @triton.jit helpers here, inlined by the compiler (the cubins are the
same as with the code written out in each loop: docs/KERNEL.md's AOT table).

Jitting. TRITON_INTERPRET is read when a function is jitted, and a kernel compiled for the
GPU can only call jitted helpers while an interpreted one can only call interpreted ones.
So nothing is jitted at import: `jit_family` jits the helpers and the kernels for the
current mode, each kernel a copy of its function whose globals name that mode's helpers.
Tests can then switch the interpreter on at any time (tests/engine/span/conftest.py).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

try:  # triton is optional: importing anchorcredit.engine must work without it
    import triton
    import triton.language as tl

    # The combine functions behind tl.sum / tl.max, used through tl.reduce: tl.sum itself is
    # jitted when triton is imported, so it cannot run under an interpreter switched on
    # later, while the interpreter maps these two objects onto numpy reductions.
    SUM = tl.standard._sum_combine
    MAX = tl.standard._elementwise_max
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = SUM = MAX = None


def load_k_tile(k_base, offs_n, offs_d, mask, stride_kn, UPCAST: tl.constexpr):
    """K^T tile [BLOCK_D, BLOCK_N] of key positions offs_n (masked entries read 0)."""
    ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None]
    kt = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is wrong: exact fp32 copies instead
        kt = kt.to(tl.float32)
    return kt


def load_q_tile(q_base, offs_m, offs_d, mask, stride_qn, UPCAST: tl.constexpr):
    """Q tile [BLOCK_M, BLOCK_D] of query positions offs_m (masked entries read 0)."""
    ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
    q = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


def qk_scores(q, kt, cap_in, cap_out, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """q @ kt in fp32; soft-capped (cap * tanh(x * scale / cap), in base 2: the host set
    qk_scale = 1 and cap_out = cap * log2 e) when SOFTCAP."""
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if SOFTCAP:
        y = s * cap_in
        e = tl.exp2(tl.abs(y) * -2.8853900817779268)  # exp(-2|y|) = 2^(-2 log2(e) |y|)
        s = tl.where(y < 0, e - 1.0, 1.0 - e) / (1.0 + e) * cap_out
    return s


HELPERS = (load_k_tile, load_q_tile, qk_scores)


def _with_globals(fn: Callable, namespace: dict[str, Any]) -> Callable:
    """A copy of fn that resolves its global names in `namespace` (same code, same source)."""
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__)
    copy.__kwdefaults__, copy.__annotations__ = fn.__kwdefaults__, fn.__annotations__
    copy.__module__, copy.__qualname__, copy.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    return copy


def jit_family(kernels: dict[str, tuple[Callable, dict[str, Any]]]) -> dict[str, Any]:
    """{name: jitted kernel} for the current interpreter mode: each kernel (its function and
    triton.jit keywords) jitted with this module's helpers jitted for the same mode."""
    helper_scope = dict(globals())
    jitted = {fn.__name__: triton.jit(_with_globals(fn, helper_scope)) for fn in HELPERS}
    helper_scope.update(jitted)  # helpers calling helpers find this mode's copies
    out = {}
    for name, (fn, options) in kernels.items():
        scope = {**fn.__globals__, **jitted}
        out[name] = triton.jit(_with_globals(fn, scope), **options)
    return out


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)

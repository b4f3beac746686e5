"""The span kernel compiled ahead of time as a launch compiles it (no GPU needed).

anchorcredit.engine.span.aot plans the launches with span_stats_packed's own code, binds
them through Triton's JIT binder for sm_80/sm_90 and compiles with Triton's bundled ptxas;
registers and spills come from the cubin (cuobjdump). The specialisation-key tests need no
ptxas: they only run the binder.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from anchorcredit.engine.span import aot, triton_kernel  # noqa: E402


@pytest.fixture(autouse=True)
def real_jit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


needs_ptxas = pytest.mark.skipif(
    not aot.toolchain_present(), reason="triton's bundled ptxas/cuobjdump are not installed"
)

DEFAULT_KERNELS = (("row", "band", "plain"), ("col", "band", "plain"), ("col", "end", "plain"))


@needs_ptxas
@pytest.mark.parametrize("arch", aot.ARCHS)
def test_default_bf16_launch_compiles_without_spills(arch):
    """The configuration the runner launches (bf16, d=128): no spills, and the column pass
    loops hold no cross-warp reduction (no shuffles; the two barriers are the pipeline's)."""
    for config in aot.configs([arch], [torch.bfloat16], [128], DEFAULT_KERNELS):
        r = aot.resources(config)
        assert r.spill_bytes == 0, aot.row(r)
        assert r.registers <= 255 and r.loops, aot.row(r)
        if config.pass_ == "col":
            assert all(loop.shuffles == 0 for loop in r.loops), aot.row(r)
            assert all(loop.barriers <= 2 for loop in r.loops), aot.row(r)


@needs_ptxas
@pytest.mark.slow
def test_every_16bit_configuration_compiles_without_spills():
    """Both 16-bit dtypes, head dims 64/128/256, both passes, both horizon modes, plain and
    model-true attention, sm_80 and sm_90: the table of docs/KERNEL.md, zero spills."""
    spilled = []
    for config in aot.configs(dtypes=(torch.bfloat16, torch.float16)):
        r = aot.resources(config)
        if r.spill_bytes:
            spilled.append(aot.row(r))
    assert not spilled, "\n".join(spilled)


def test_sass_loop_reader():
    sass = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
        /*0110*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0120*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0130*/               @P0 BRA 0x110 ;
        /*0140*/                   EXIT ;
        /*0150*/                   BRA 0x150;
    """
    assert aot.sass_loops(sass) == (aot.Loop(instructions=3, shuffles=1, barriers=1),)


# ---- item: the JIT must not recompile inside the service ----------------------------------


def _keys(launches) -> set[str]:
    return {aot.specialization_key(launch) for launch in launches}


def _plan(n, cu, prompts, hq=4, hkv=2, d=128, **kw):
    q = torch.zeros(hq, n, d, dtype=torch.bfloat16)
    k = torch.zeros(hkv, n, d, dtype=torch.bfloat16)
    return triton_kernel.plan_packed(q, k, cu, prompts, check_finite=False, **kw)


# Batches and horizons a service sees: total_N divisible by 16 or not, tables at any offset,
# horizons equal to 1 or multiples of 16, GQA groups 1/2/4, several sliding windows.
CALLS = [
    dict(n=1000, cu=[0, 600, 1000], prompts=[100, 50]),
    dict(n=1024, cu=[0, 1024], prompts=[1], window=16, h_lo=16, h_hi=32),
    dict(n=777, cu=[0, 300, 777], prompts=[17, 33], window=1, h_lo=1),
    dict(n=4097, cu=[0, 17, 4000, 4097], prompts=[1, 3, 5], hkv=4, h_lo=0, h_hi=1),
    dict(n=512, cu=[0, 512], prompts=[200], hkv=1, window=32, h_lo=48, h_hi=160),
]


@pytest.mark.parametrize("variant", [{}, {"softcap": 30.0, "sliding_window": 16}])
def test_runtime_integers_do_not_change_the_specialisation(variant):
    plans = [_plan(**c, **variant) for c in CALLS]
    if variant:  # different windows, each below the sequence lengths
        plans += [_plan(**CALLS[0], softcap=30.0, sliding_window=w) for w in (1, 17, 64)]
    assert len(_keys(p.row for p in plans)) == 1
    assert len(_keys(p.col for p in plans)) == 1
    ends = [_plan(**{**c, **variant, "h_hi": None}) for c in CALLS]
    assert len(_keys(p.col for p in ends)) == 1


def test_the_key_still_tells_real_kernels_apart():
    """Control: the key does change with what must compile anew (dtype, head dim), and
    with a plainly jitted kernel the horizons would specialise (the bug this guards)."""
    base = _plan(**CALLS[0])
    other_d = _plan(**CALLS[0], d=64)
    assert _keys([base.row, other_d.row]).__len__() == 2
    plain = triton.jit(triton_kernel._col_pass)
    a, b = _plan(**CALLS[0], h_lo=10), _plan(**CALLS[0], h_lo=16)
    relaunch = [triton_kernel.Launch(plain, p.col.grid, p.col.args, p.col.options) for p in (a, b)]
    assert len(_keys(relaunch)) == 2

"""The span kernels compiled ahead of time as a launch compiles them (no GPU needed).

bench/span_aot.py plans the launches with span_stats_packed's own code (the tiles it picks
for each GPU's shared memory), binds them through Triton's JIT binder for sm_80/86/89/90 and
compiles with Triton's bundled ptxas; registers, spills and shared memory come from the
cubin. The specialisation-key tests need no ptxas: they only run the binder. The whole
16-bit matrix (both toolchains: docs/KERNEL.md) runs under -m slow.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from anchorcredit.engine.span import defaults, triton_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("span_aot", ROOT / "bench" / "span_aot.py")
aot = importlib.util.module_from_spec(_spec)
sys.modules["span_aot"] = aot  # its dataclasses look their module up there
_spec.loader.exec_module(aot)


@pytest.fixture(autouse=True)
def real_jit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


needs_ptxas = pytest.mark.skipif(
    not aot.toolchain_present(), reason="triton's bundled ptxas/cuobjdump are not installed"
)

# What the runner launches: the two-pass path (row pass; band and to-the-end column passes)
# and the one-pass path (LSE pass, WAAD band).
DEFAULT_KERNELS = (
    ("row", "band", "plain"), ("col", "band", "plain"), ("col", "end", "plain"),
    ("lse", "end", "plain"), ("waad", "end", "plain"),
)  # fmt: skip


@needs_ptxas
@pytest.mark.parametrize("arch", [80, 90])
def test_default_bf16_launch_compiles_without_spills(arch):
    """The configuration the runner launches (bf16, d=128): no spills, within the GPU's
    shared memory, and the column loops hold no cross-warp reduction (no shuffles; the two
    barriers are the software pipeline's)."""
    for config in aot.configs([arch], [torch.bfloat16], [128], DEFAULT_KERNELS):
        r = aot.resources(config)
        assert r.spill_bytes == 0 and not r.over_limit, aot.row(r)
        assert r.registers <= 255 and r.loops, aot.row(r)
        if config.pass_ in ("col", "lse"):
            assert all(loop.shuffles == 0 for loop in r.loops), aot.row(r)
            assert all(loop.barriers <= 2 for loop in r.loops), aot.row(r)


@needs_ptxas
def test_head_dim_256_fits_the_99_kib_gpus():
    """sm_86/sm_89 (A10G, L4, RTX 30/40) have 99 KiB of shared memory per block: at d=256
    the default tiles there must fit (the 128x64, 3-stage row pass needs 129 KiB)."""
    for kernel in (("row", "band", "plain"), ("col", "end", "plain"), ("lse", "end", "plain")):
        (config,) = aot.configs([89], [torch.bfloat16], [256], [kernel])
        r = aot.resources(config)
        assert not r.over_limit and r.spill_bytes == 0, aot.row(r)
        estimate = defaults.shared_bytes(
            {"col": "col", "row": "row", "lse": "lse"}[kernel[0]],
            defaults.Blocks(r.launch.options["BLOCK_M"], r.launch.options["BLOCK_N"],
                            r.launch.options["num_warps"], r.launch.options["num_stages"]),
            256, 2, defaults.device_for((8, 9)),
        )  # fmt: skip
        assert r.shared_bytes <= estimate <= config.shared_limit, aot.row(r)


@needs_ptxas
@pytest.mark.parametrize("arch", [80, 90])
def test_fold_row_pass_compiles_without_spills(arch):
    config = aot.Config(arch, torch.bfloat16, 128, "row", "band", "plain", band="fold")
    r = aot.resources(config)
    assert r.launch.options["FOLD_BAND"] is True
    assert r.spill_bytes == 0 and len(r.loops) == 3, aot.row(r)  # bulk, diagonal, band


@needs_ptxas
@pytest.mark.parametrize("arch", [80, 90])
def test_packed_bf16_row_pass_compiles_without_spills(arch):
    config = aot.Config(arch, torch.bfloat16, 128, "row", "band", "plain", group=4,
                        gqa_pack=True, tile=aot.PACK_TILES[0])  # fmt: skip
    r = aot.resources(config)
    assert r.launch.options["GQA_PACK"] == 4 and r.launch.grid[1] == 2
    assert r.spill_bytes == 0 and r.loops, aot.row(r)
    assert aot.row(r).split(" | ")[7] == "4x32x64"


@needs_ptxas
@pytest.mark.slow
def test_every_16bit_configuration_compiles_without_spills_within_shared_memory():
    """Head dims 64/128/256, every kernel of both paths, plain and model-true attention, on
    the three shared-memory classes (sm_80 163 KiB, sm_89 99 KiB, sm_90 227 KiB), bf16 (fp16
    compiles to the same resources, and sm_86 as sm_89: the full table of docs/KERNEL.md,
    `python bench/span_aot.py`, under both toolchains)."""
    bad = []
    for config in aot.configs(archs=(80, 89, 90), dtypes=(torch.bfloat16,)):
        r = aot.resources(config)
        if r.spill_bytes or r.over_limit:
            bad.append(aot.row(r))
    assert not bad, "\n".join(bad)


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


def test_main_exits_nonzero_on_a_spill_or_an_over_limit_launch(monkeypatch, capsys):
    def fake(config):
        launch = triton_kernel.Launch(None, (1, 1), (), {
            "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3})  # fmt: skip
        shared = 200 * 1024 if config.arch == 89 else 1024
        return aot.Resources(config, launch, 128, 0, shared, (), "key")

    monkeypatch.setattr(aot, "resources", fake)
    monkeypatch.setattr(aot, "tool", lambda name: name)
    assert aot.main(["--quick", "--arch", "80"]) == 0
    assert aot.main(["--quick", "--arch", "89"]) == 1
    assert "OVER | 99 |" in capsys.readouterr().out


# ---- the JIT must not recompile inside the service ----------------------------------------


def _keys(launches) -> set[str]:
    return {aot.specialization_key(launch) for launch in launches}


def _plan(n, cu, prompts, hq=4, hkv=2, d=128, **kw):
    q = torch.zeros(hq, n, d, dtype=torch.bfloat16)
    k = torch.zeros(hkv, n, d, dtype=torch.bfloat16)
    return triton_kernel.plan_packed(q, k, cu, prompts, check_finite=False, capability=(9, 0),
                                     **kw)  # fmt: skip


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
    # The one-pass path, with the model's LSE: its row stride is total_N, any value.
    lses = [_plan(**{**c, **variant, "h_hi": None}, lse=torch.zeros(4, c["n"])) for c in CALLS]
    assert all(p.one_pass for p in lses)
    assert len(_keys(p.launches[0] for p in lses)) == 1
    assert len(_keys(p.launches[1] for p in lses)) == 1


def test_the_key_still_tells_real_kernels_apart():
    """Control: the key does change with what must compile anew (dtype, head dim), and
    with a plainly jitted kernel the horizons would specialise (the bug this guards)."""
    base = _plan(**CALLS[0])
    other_d = _plan(**CALLS[0], d=64)
    assert _keys([base.row, other_d.row]).__len__() == 2
    plain = triton.jit(triton_kernel.KERNEL_FUNCTIONS["col"])
    a, b = _plan(**CALLS[0], h_lo=10), _plan(**CALLS[0], h_lo=16)
    relaunch = [triton_kernel.Launch(plain, p.col.grid, p.col.args, p.col.options) for p in (a, b)]
    assert len(_keys(relaunch)) == 2

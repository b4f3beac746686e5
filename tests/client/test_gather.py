"""full_state / full_state_items: a trained model's full tensors under the served names.

Tested for real on the CPU: a plain model, tied weights, wrapper prefixes (torch.compile,
a DDP-style `.module`), PEFT LoRA merged, DTensor (1-process gloo mesh, in a subprocess).
FSDP1 and DeepSpeed ZeRO-3 need several processes (and deepspeed) and are not run here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from anchorcredit.client.gather import clean_name, unwrap_model  # noqa: E402
from anchorcredit.client.weights import full_state, full_state_items  # noqa: E402


def _model(**overrides):
    from debug_model import build_debug_model

    return build_debug_model("llama", **overrides)


def _served_names(model):
    """What the server holds: state_dict keys (tied duplicates may be absent)."""
    return set(model.state_dict())


def test_plain_model_references_and_names():
    m = _model()
    items = dict(full_state_items(m))
    assert set(items) == {n for n, _ in m.named_parameters()}  # llama: no persistent buffers
    p = dict(m.named_parameters())
    for name, t in items.items():
        assert t.data_ptr() == p[name].data_ptr() and not t.requires_grad  # no copies


def test_tied_weights_once_and_float_buffers():
    m = _model(tie_word_embeddings=True)
    m.model.register_buffer("scale", torch.ones(3))  # persistent float buffer: sent
    m.model.register_buffer("steps", torch.zeros(2, dtype=torch.long))  # integer: not a weight
    m.model.register_buffer("tmp", torch.ones(2), persistent=False)  # non-persistent: not sent
    names = [n for n, _ in full_state_items(m)]
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1
    assert "model.scale" in names and "model.steps" not in names and "model.tmp" not in names
    assert set(names) <= _served_names(m)
    assert "model.scale" not in [n for n, _ in full_state_items(m, buffers=False)]


def test_wrappers_are_unwrapped():
    m = _model()
    want = [n for n, _ in full_state_items(m)]

    class DistributedDataParallel(torch.nn.Module):  # the shape of DDP: `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    compiled = torch.compile(m)  # OptimizedModule: names start with `_orig_mod.`
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    assert [n for n, _ in full_state_items(compiled)] == want
    assert [n for n, _ in full_state_items(DistributedDataParallel(compiled))] == want
    assert unwrap_model(DistributedDataParallel(m)) is m
    # a compiled submodule, FSDP / checkpoint wrapper parts anywhere in a name
    assert clean_name("model._orig_mod.layers.0._fsdp_wrapped_module.w") == "model.layers.0.w"
    assert clean_name("a._checkpoint_wrapped_module.b") == "a.b"
    assert clean_name("base_model.model.a.q_proj.base_layer.weight", peft=True) == (
        "a.q_proj.weight"
    )


def test_peft_lora_is_merged_named_as_the_base_and_unmerged_after():
    peft = pytest.importorskip("peft")
    base = _model()
    ref = {n: t.clone() for n, t in base.state_dict().items()}
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(base, cfg)
    with full_state(model) as items:
        names = [n for n, _ in items]
        merged = dict(items)
        q = merged["model.layers.0.self_attn.q_proj.weight"].clone()
    assert set(names) == set(ref)  # the served checkpoint's names, nothing else
    assert not any("lora_" in n or "base_layer" in n for n in names)
    # the merged weight is W + scale * B @ A; after the block the base weight is W again
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling[
        "default"
    ]
    torch.testing.assert_close(q, ref["model.layers.0.self_attn.q_proj.weight"] + delta)
    torch.testing.assert_close(
        layer.base_layer.weight, ref["model.layers.0.self_attn.q_proj.weight"]
    )
    # full_state_items copies merged layers, so they stay merged after the generator ends
    kept = dict(full_state_items(model))
    torch.testing.assert_close(kept["model.layers.0.self_attn.q_proj.weight"], q)
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj  # not a LoRA target
    assert kept["model.layers.0.self_attn.k_proj.weight"].data_ptr() == k_proj.weight.data_ptr()
    want = model.merge_and_unload().state_dict()
    for n, t in kept.items():
        torch.testing.assert_close(t, want[n], rtol=0, atol=0)


def test_dtensor_full_tensor_in_a_one_process_gloo_group(tmp_path):
    code = textwrap.dedent(
        """
        import os, torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
        dist.init_process_group("gloo", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        lin = torch.nn.Linear(6, 4)
        want = {n: p.detach().clone() for n, p in lin.named_parameters()}
        for n, p in list(lin.named_parameters()):
            setattr(lin, n, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
        assert type(lin.weight).__name__ == "DTensor"
        from anchorcredit.client.weights import full_state_items
        got = dict(full_state_items(lin))
        assert set(got) == set(want), got.keys()
        for n, t in got.items():
            assert type(t) is torch.Tensor, type(t)
            torch.testing.assert_close(t, want[n], rtol=0, atol=0)
        dist.destroy_process_group()
        print("ok")
        """
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PORT": str(port)},
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

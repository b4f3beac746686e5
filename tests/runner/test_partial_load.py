"""Partial loading (runner/loading.py): a scorer without entropy holds only the decoder layers
up to the last selected one and no LM head. Its scores equal the whole model's, the skipped
checkpoint tensors are never read, the counts reach ModelInfo, weight updates made for the
whole model fill only what is loaded, and entropy is refused with how to enable it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from debug_model import build_debug_model, save_debug_model

from anchorcredit.errors import InputError
from anchorcredit.runner import Scorer
from anchorcredit.runner.loading import load_model
from anchorcredit.weight_wire import WeightUpdateSpec

PAIRS = [([1, 2, 3], list(range(10, 40))), ([7], list(range(50, 75))), ([9] * 12, [4] * 20)]
PARAMS = dict(q=0.4, k=3, h_lo=2, h_hi=12)


def hybrid_config():
    """Gemma 3 shape: full attention at layers 2, 5, 8 of 9; the default layers are [2, 5]."""
    import transformers

    return transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=9,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
        sliding_window_pattern=3, max_position_embeddings=1024, tie_word_embeddings=True,
        query_pre_attn_scalar=16,
    )  # fmt: skip


def save_model(path: Path, arch: str, seed: int = 0) -> Path:
    if arch != "gemma3":
        return save_debug_model(path, arch=arch, seed=seed)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(hybrid_config()).float().save_pretrained(path)
    return path


# arch -> (the default layers, so the layers a partial scorer loads = last + 1)
ARCHS = {"llama": [2, 3, 4], "qwen2": [2, 3, 4], "qwen3": [2, 3, 4], "gemma3": [2, 5]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("partial")
    return {arch: save_model(root / arch, arch) for arch in ARCHS}


class ReadSpy:
    """Records which checkpoint tensors transformers materialises: it reads safetensors
    through lazy slices (`get_slice(k)`) and loads one by indexing it (`slice[...]`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import transformers.modeling_utils as mu

        self.listed: set[str] = set()
        self.read: set[str] = set()
        real = mu.safe_open
        spy = self

        class Slice:
            def __init__(self, key: str, inner: Any) -> None:
                self.key, self.inner = key, inner

            def __getitem__(self, index: Any) -> Any:
                spy.read.add(self.key)
                return self.inner[index]

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

        class Handle:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.inner = real(*args, **kwargs)

            def keys(self) -> list[str]:
                return list(self.inner.keys())

            def get_slice(self, key: str) -> Slice:
                spy.listed.add(key)
                return Slice(key, self.inner.get_slice(key))

            def get_tensor(self, key: str) -> torch.Tensor:
                spy.read.add(key)
                return self.inner.get_tensor(key)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

            def __enter__(self) -> Handle:
                self.inner.__enter__()
                return self

            def __exit__(self, *exc: Any) -> Any:
                return self.inner.__exit__(*exc)

        monkeypatch.setattr(mu, "safe_open", Handle)


def _layer(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _same(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        for name in ("waad", "fai", "gamma"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
        assert x.local_heads == y.local_heads and x.global_heads == y.global_heads


@pytest.mark.parametrize("arch", list(ARCHS))
def test_scores_equal_the_whole_model_and_skipped_weights_are_never_read(
    arch: str, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    path = folders[arch]
    whole = Scorer.from_pretrained(path)
    spy = ReadSpy(monkeypatch)
    part = Scorer.from_pretrained(path, entropy=False)
    assert part.layers == whole.layers == ARCHS[arch]
    keep = max(part.layers) + 1
    assert part.layers_loaded == keep < whole.num_layers == part.num_layers
    for strategy in ("coupled_rhythm", "global_anchor", "uniform"):
        _same(part.score(PAIRS, strategy, **PARAMS), whole.score(PAIRS, strategy, **PARAMS))

    # Never read: the later layers' and the head's tensors were listed, never materialised.
    later = {k for k in spy.listed if (_layer(k) or 0) >= keep}
    assert later and not later & spy.read, sorted(later & spy.read)[:3]
    assert "lm_head.weight" not in spy.read
    assert spy.read == set(spy.listed) - later - {"lm_head.weight"}  # the rest all read
    # Never allocated: the model holds no tensor of them, and exactly the expected count.
    names = dict(part.model.named_parameters())
    assert part.lm_head is None and part.model.get_output_embeddings() is None
    assert not [n for n in names if (_layer(n) or 0) >= keep or n.startswith("lm_head")]
    want = sum(
        p.numel()
        for n, p in whole.model.named_parameters()
        if (_layer(n) or 0) < keep and not n.startswith("lm_head")
    )
    info, full = part.info(), whole.info()
    assert info.loaded_param_count == want == sum(p.numel() for p in names.values())
    assert info.total_param_count == full.total_param_count == full.loaded_param_count
    assert info.loaded_param_count < info.total_param_count
    assert info.num_layers == full.num_layers and info.layers == full.layers


def test_entropy_is_refused_with_how_to_enable_it(folders: dict[str, Path]):
    part = Scorer.from_pretrained(folders["llama"], entropy=False)
    for kwargs in ({"with_entropy": True}, {"strategy": "entropy"}):
        with pytest.raises(InputError, match=r"--entropy.*entropy=True") as err:
            part.score(PAIRS, **kwargs)
        assert err.value.field == "with_entropy"
    whole = Scorer.from_pretrained(folders["llama"])  # the default keeps entropy available
    assert whole.lm_head is not None and whole.score(PAIRS, with_entropy=True)[0].entropy.size


def test_explicit_layers_decide_the_depth(folders: dict[str, Path]):
    part = Scorer.from_pretrained(folders["llama"], layers=[0, 1], entropy=False)
    assert part.layers_loaded == 2
    whole = Scorer.from_pretrained(folders["llama"], layers=[0, 1])
    _same(part.score(PAIRS), whole.score(PAIRS))
    assert part.info().loaded_param_count < 0.5 * part.info().total_param_count


def test_load_model_is_a_plain_function(folders: dict[str, Path]):
    """The loader other modules build on (e.g. sharding): counts and skipped tensor shapes."""
    cpu = torch.device("cpu")
    loaded = load_model(folders["llama"], cpu, torch.float32, layers_needed=2, with_head=False)
    assert loaded.layers_loaded == 2 and loaded.num_layers == 6 and not loaded.has_head
    assert loaded.skipped_tensors["lm_head.weight"] == (256, 64)
    assert "model.layers.5.mlp.up_proj.weight" in loaded.skipped_tensors
    assert not any(k.startswith("model.layers.1.") for k in loaded.skipped_tensors)
    whole = load_model(folders["llama"], cpu, torch.float32)
    assert whole.loaded_param_count == whole.total_param_count == loaded.total_param_count
    assert whole.has_head and not whole.skipped_tensors
    with pytest.raises(ValueError, match="with_head needs all 6 layers"):
        load_model(folders["llama"], cpu, torch.float32, layers_needed=3, with_head=True)
    with pytest.raises(ValueError, match=r"layers_needed must be in \[1, 6\]"):
        load_model(folders["llama"], cpu, torch.float32, layers_needed=7, with_head=False)


def test_a_checkpoint_that_leaves_a_loaded_tensor_unset_is_refused(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    path = save_debug_model(tmp_path / "cut", arch="llama")
    (f,) = path.glob("*.safetensors")
    state = load_file(str(f))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"missing \['(model\.)?layers.1.mlp.up_proj.weight'\]"):
        Scorer.from_pretrained(path, entropy=False)


# ----------------------------------------------------------------- weight updates


def _wire(t: torch.Tensor) -> bytes:
    return t.detach().float().contiguous().view(torch.uint8).numpy().tobytes()


class FakeGroup:
    """Rank 0's broadcasts, replayed from a list (WeightGroup's broadcast/device surface)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.device = torch.device("cpu")
        self._next = iter(tensors)
        self.sent = 0

    def broadcast(self, buf: torch.Tensor) -> torch.Tensor:
        buf.copy_(next(self._next))
        self.sent += 1
        return buf


@pytest.mark.parametrize("how", ["state_dict", "checkpoint", "stream", "broadcast"])
def test_whole_model_updates_fill_only_the_loaded_layers(
    how: str, folders: dict[str, Path], tmp_path: Path
):
    state = build_debug_model("llama", seed=3).state_dict()
    new_dir = save_debug_model(tmp_path / "new", arch="llama", seed=3)
    want = Scorer.from_pretrained(new_dir, entropy=False).score(PAIRS)
    part = Scorer.from_pretrained(folders["llama"], entropy=False)
    skipped = {k for k in state if (_layer(k) or 0) >= part.layers_loaded or k == "lm_head.weight"}
    stage = part.stage_weights(WeightUpdateSpec("v1"))
    if how == "state_dict":
        stage.load(state)
    elif how == "checkpoint":
        stage.load(new_dir)
    elif how == "stream":
        for name, t in state.items():
            stage.begin(name, "float32", tuple(t.shape))
            raw = _wire(t)
            for i in range(0, len(raw), 1000):  # odd chunks: elements split across them
                stage.write(raw[i : i + 1000])
    else:
        headers = [(k, "float32", tuple(t.shape)) for k, t in state.items()]
        group = FakeGroup(list(state.values()))
        stage.receive(group, headers)
        assert group.sent == len(state)  # every broadcast taken part in, dropped ones too
    assert stage.tensors == len(state) and stage.skipped_tensors == len(skipped)
    assert not skipped & set(stage._staged)  # nothing staged for layers not loaded
    part.commit_weights(stage)
    _same(part.score(PAIRS), want)
    assert part.policy_version == "v1"


def test_tensors_of_unloaded_layers_are_still_checked(folders: dict[str, Path]):
    part = Scorer.from_pretrained(folders["llama"], entropy=False)
    stage = part.stage_weights(WeightUpdateSpec("v1", partial=True))
    with pytest.raises(InputError, match=r"model.layers.5.mlp.up_proj.weight.*shape \(3, 3\)"):
        stage.begin("model.layers.5.mlp.up_proj.weight", "float32", (3, 3))
    with pytest.raises(InputError, match="does not have a tensor of that name"):
        stage.begin("model.layers.6.mlp.up_proj.weight", "float32", (128, 64))
    stage.begin("lm_head.weight", "float32", (256, 64))
    with pytest.raises(InputError, match="sent twice"):
        stage.put("lm_head.weight", torch.zeros(256, 64))


# ----------------------------------------------------------------- the server


def test_server_loads_partially_unless_started_with_entropy(
    folders: dict[str, Path], start_server: Any
):
    import grpc

    from anchorcredit.v1 import credit_pb2 as pb

    def ask(srv: Any, entropy: bool) -> Any:
        seqs = [pb.Sequence(prompt_ids=p, response_ids=r) for p, r in PAIRS]
        outputs = pb.Outputs(waad=True, gamma=True, entropy=entropy)
        return srv.stub.Score(pb.ScoreRequest(sequences=seqs, outputs=outputs), timeout=60)

    srv = start_server(folders["llama"])
    info = srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert 0 < info.loaded_param_count < info.total_param_count
    assert len(ask(srv, False).results) == len(PAIRS)
    with pytest.raises(grpc.RpcError) as err:
        ask(srv, True)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--entropy" in err.value.details() and "ANCHORCREDIT_ENTROPY" in err.value.details()
    srv.stop()

    srv = start_server(folders["llama"], entropy=True)
    info = srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.loaded_param_count == info.total_param_count
    assert all(len(r.entropy) == 4 * r.response_len for r in ask(srv, True).results)

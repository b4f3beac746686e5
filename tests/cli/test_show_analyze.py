"""`anchorcredit show` and `anchorcredit analyze` on debug-model output and synthetic records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from anchorcredit.cli import main


@pytest.fixture(scope="module")
def scored(llama_model: Path, tmp_path_factory) -> Path:
    """Debug-model scores (with entropy) of 4 random id sequences."""
    d = tmp_path_factory.mktemp("scored")
    model = llama_model
    rng = random.Random(0)
    rows = [
        {
            "id": f"r/{i}",  # a '/' the output file name must not keep
            "task": "a" if i % 2 else "b",
            "prompt_ids": [rng.randrange(256) for _ in range(5)],
            "response_ids": [rng.randrange(256) for _ in range(25 + i)],
        }
        for i in range(4)
    ]
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = d / "out.jsonl"
    args = ["score", str(d / "in.jsonl"), "--model", str(model), "-o", str(out)]
    assert main([*args, "--entropy", "--quiet"]) == 0
    return out


def test_show_writes_html_with_every_token_and_png(scored, tmp_path, capsys):
    assert main(["show", str(scored), "--index", "2", "-o", str(tmp_path / "v")]) == 0
    printed = capsys.readouterr().out.split()
    html_path, png_path = Path(printed[0]), Path(printed[1])
    assert html_path.name == "r_2.html" and png_path.name == "r_2.png"
    rec = [json.loads(x) for x in scored.read_text().splitlines()][2]
    page = html_path.read_text()
    assert page.count('class="tok') == rec["response_len"]
    for t, tid in enumerate(rec["response_ids"]):  # no tokenizer: tokens shown as #id
        assert f'data-t="{t}"' in page and f">#{tid}</span>" in page
    assert "<script" not in page and "http" not in page  # self-contained
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 5000


def test_show_by_id_and_errors(scored, tmp_path, capsys):
    assert main(["show", str(scored), "--id", "r/1", "-o", str(tmp_path), "--no-png"]) == 0
    assert (tmp_path / "r_1.html").exists() and not (tmp_path / "r_1.png").exists()
    assert main(["show", str(scored), "--index", "9", "-o", str(tmp_path)]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["show", str(scored), "--id", "zz", "-o", str(tmp_path)]) == 2


def test_show_text_tokens_are_escaped(tmp_path):
    rec = {
        "id": "t",
        "tokens": ["<b>", " &", "\n", "\u00e9", "", ' "q"'],
        "waad": [1, 5, 2, 6, 1, 0],
        "fai": [0.1, 0.3, 0.2, 0.5, 0.1, 0.0],
        "gamma": [1, 1.5, 1, 1.5, 1, 1],
    }
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    assert main(["show", str(p), "-o", str(tmp_path), "--no-png"]) == 0
    page = (tmp_path / "t.html").read_text()
    assert "&lt;b&gt;" in page and "<b>" not in page.split("id='tokens'")[1]
    assert " &amp;" in page and "\u21b5" in page and "\u00e9" in page
    # t=3: the top of WAAD and FAI (darkest bin), both peaks, gamma > 1
    assert ' class="tok w9 f9 g9 pre anc amp" data-t="3"' in page


def test_analyze_table_and_json(scored, capsys):
    assert main(["analyze", str(scored), "--by", "task"]) == 0
    out = capsys.readouterr().out
    assert "4 responses" in out and "[task=a]" in out and "[task=b]" in out
    assert "mean entropy at WAAD peaks" in out and "paper" in out
    assert main(["analyze", str(scored), "--json", "--bootstrap", "0"]) == 0
    data = json.loads(capsys.readouterr().out)
    stats = data["groups"]["all"]
    assert set(stats) == {"entropy_at_waad_peaks", "fai_peak_after_waad_peak"}
    assert stats["fai_peak_after_waad_peak"]["n_responses"] == 4
    assert data["paper"]["fai_peak_after_waad_peak"]["observed"] == 0.5253


def test_analyze_hand_values_through_cli(tmp_path, capsys):
    # Same sequence as tests/test_analysis.py: observed 1.0, chance 0.8, lift +25%.
    rec = {
        "id": 1,
        "waad": [0, 3, 1, 5, 5, 2, 4, 0],
        "fai": [0.1, 0.2, 0.5, 0.1, 0.4, 0.3, 0.0, 0.0],
        "gamma": [1] * 8,
    }
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    assert main(["analyze", str(p), "--json", "--bootstrap", "0"]) == 0
    s = json.loads(capsys.readouterr().out)["groups"]["all"]["fai_peak_after_waad_peak"]
    assert s["observed"] == pytest.approx(1.0) and s["random"] == pytest.approx(0.8)
    assert s["lift"] == pytest.approx(0.25)


def test_analyze_bad_file(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": 1, "waad": [1], "fai": [1], "gamma": [1]}\nnope\n')
    assert main(["analyze", str(p)]) == 2
    assert "bad.jsonl:2:" in capsys.readouterr().err

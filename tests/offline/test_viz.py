"""The rhythm HTML in a real headless browser (Chromium), and the PNG plot.

Chromium comes from Debian (`apt-get install -y chromium`). Without it the browser tests
skip on a workstation but FAIL in CI (CI is set), so CI can never silently stop checking.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from anchorcredit.offline import viz

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> str:
    path = find_browser()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed in CI: apt-get install -y chromium")
        pytest.skip("chromium not installed (apt-get install -y chromium); required in CI")
    return path


def chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


def record(n: int = 60, seed: int = 0) -> dict:
    """A synthetic scored response with a visible rhythm and awkward token texts."""
    rng = np.random.default_rng(seed)
    words = ["Let", " us", " add", " 3", " and", " 4", ".", "\n", " <x>", " &", " caf\u00e9"]
    tokens = [words[i % len(words)] for i in range(n)]
    t = np.arange(n)
    waad = 5 + 4 * np.sin(t / 3.0) + rng.random(n)
    fai = np.abs(np.cos(t / 3.0 - 0.5)) / 10 + rng.random(n) / 100
    fai[-10:] = 0.0
    gamma = np.where(fai > np.quantile(fai, 0.6), 1.5, 1.0)
    return {
        "id": "synthetic/0",
        "model": "synthetic",
        "strategy": "global_anchor",
        "prompt": "What is 3 + 4?",
        "prompt_len": 7,
        "tokens": tokens,
        "waad": waad.tolist(),
        "fai": fai.tolist(),
        "gamma": gamma.tolist(),
        "entropy": rng.random(n).tolist(),
    }


def test_dom_has_every_token(browser, tmp_path):
    rec = record()
    html_path, _ = viz.render(rec, tmp_path)
    proc = chromium(browser, "--dump-dom", html_path.resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert dom.count('<span class="tok ') == len(rec["tokens"])
    assert viz.tokens_in_dom(dom, rec["tokens"]) == []
    # every token's tooltip carries its numbers
    assert dom.count("waad=") == len(rec["tokens"]) and "preplan (WAAD peak)" in dom


def test_screenshot_shows_coloured_tokens(browser, tmp_path):
    from PIL import Image

    html_path, _ = viz.render(record(), tmp_path)
    shot = tmp_path / "shot.png"
    proc = chromium(
        browser, f"--screenshot={shot}", "--window-size=1000,700", html_path.resolve().as_uri()
    )
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    non_white = (img < 245).any(axis=2).mean()
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    # A blank or unstyled page is nearly all white with few colours; the token block is not.
    assert non_white > 0.03, non_white
    assert colours > 200, colours
    # The WAAD palette (blues) is the default: the token area holds strongly blue pixels.
    blue = (img[..., 2].astype(int) - img[..., 0].astype(int) > 60).mean()
    assert blue > 0.005, blue


def test_png_plot(tmp_path):
    from PIL import Image

    path = viz.render_png(record(), tmp_path / "plot.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert (img < 245).any(axis=2).mean() > 0.02  # curves and axes drawn


def test_bins_and_labels():
    assert viz.bins(np.array([1.0, 1.0, 1.5]), "gamma").tolist() == [0, 0, 9]
    assert viz.bins(np.array([2.0, 2.0]), "waad").tolist() == [0, 0]  # flat: one colour
    b = viz.bins(np.linspace(0, 1, 101), "fai")
    assert b.min() == 0 and b.max() == 9 and (np.diff(b) >= 0).all()
    assert viz.token_labels({"waad": [1, 2], "response_ids": [7, 8]}) == ["#7", "#8"]
    assert viz.token_labels({"waad": [1, 2]}) == ["#0", "#1"]
    assert viz.safe_name("a/b c") == "a_b_c" and viz.safe_name("..") == "record"


def test_mismatched_lengths_rejected():
    rec = record()
    rec["fai"] = rec["fai"][:-1]
    with pytest.raises(ValueError, match="fai has"):
        viz.render_html(rec)


def test_paths_are_file_uris(tmp_path):
    # The HTML is opened from disk with no server: nothing in it may point elsewhere.
    html_path, png_path = viz.render(record(), tmp_path)
    page = html_path.read_text()
    assert "src=" not in page and "href=" not in page and "<script" not in page
    assert Path(png_path).exists()

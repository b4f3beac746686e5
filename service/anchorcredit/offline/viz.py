"""Render one scored response: a self-contained HTML page and a PNG plot (paper Fig. 2/3).

Input is one line of `anchorcredit score` output (a dict with waad, fai, gamma, optional
entropy, tokens, response_ids, id, ...).

HTML: no scripts, no external files. A CSS-only selector (radio buttons + sibling
selectors) recolours the tokens by WAAD, FAI, gamma or entropy; every token is a <span>
whose title (hover tooltip) holds its position and numbers. Marks:
  preplan = WAAD peak (anchorcredit.offline.analysis.find_peaks)   -> amber bar above the token
  anchor  = FAI peak                                        -> red bar below the token
  gamma > 1 (the token's advantage is amplified)            -> bold
Colours: 10 bins between the response's 2nd and 98th percentile of the metric (gamma: 1 to
its maximum), so one outlier does not wash out the rest.

PNG: WAAD and FAI (and entropy when present) over response position, peaks marked, tokens
with gamma > 1 shaded. Needs matplotlib (Agg backend, no display).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anchorcredit.offline.analysis import find_peaks

N_BINS = 10
# Sequential palettes (light -> dark), one per metric; 10 steps each.
PALETTES = {
    "waad": ("#f7fbff", "#08306b"),  # blues
    "fai": ("#fff5eb", "#7f2704"),  # oranges
    "gamma": ("#fcfbfd", "#3f007d"),  # purples
    "entropy": ("#f7fcf5", "#00441b"),  # greens
}
LABELS = {
    "waad": "WAAD (local look-back, preplan)",
    "fai": "FAI (future influence, anchor)",
    "gamma": "gamma (credit multiplier)",
    "entropy": "entropy (nats)",
}


def _hex(c: str) -> np.ndarray:
    return np.array([int(c[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def _palette(metric: str) -> list[str]:
    lo, hi = (_hex(c) for c in PALETTES[metric])
    steps = [lo + (hi - lo) * i / (N_BINS - 1) for i in range(N_BINS)]
    return ["#" + "".join(f"{int(round(v)):02x}" for v in s) for s in steps]


def bins(x: np.ndarray, metric: str) -> np.ndarray:
    """Colour bin 0..N_BINS-1 of each value (robust percentile range; gamma from 1)."""
    x = np.asarray(x, dtype=np.float64)
    if metric == "gamma":
        lo, hi = 1.0, float(x.max())
    else:
        lo, hi = (float(v) for v in np.percentile(x, [2, 98]))
    if hi <= lo:
        return np.zeros(x.size, dtype=np.int64)
    return np.clip(((x - lo) / (hi - lo) * N_BINS).astype(np.int64), 0, N_BINS - 1)


def token_labels(record: dict) -> list[str]:
    """Display text of each response token: its text, else '#<id>', else '#<position>'."""
    n = len(record["waad"])
    toks = record.get("tokens")
    if toks is not None and len(toks) == n:
        return [str(t) for t in toks]
    ids = record.get("response_ids")
    if ids is not None and len(ids) == n:
        return [f"#{i}" for i in ids]
    return [f"#{t}" for t in range(n)]


def _metrics(record: dict) -> dict[str, np.ndarray]:
    out = {m: np.asarray(record[m], dtype=np.float64) for m in ("waad", "fai", "gamma")}
    if record.get("entropy") is not None:
        out["entropy"] = np.asarray(record["entropy"], dtype=np.float64)
    n = len(out["waad"])
    for m, v in out.items():
        if v.shape != (n,):
            raise ValueError(f"{m} has {v.size} values, waad has {n}")
    return out


def _display(text: str) -> str:
    """Visible form of a token: newline -> '\u21b5' + a real line break, empty -> '\u00b7'."""
    if text == "":
        return "\u00b7"
    return html.escape(text.replace("\n", "\u21b5\n"))


# The page's fixed style; the per-metric colours are added by _css.
BASE_CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;max-width:70em;color:#222}",
    ".tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:15px;"
    "line-height:2.1;white-space:pre-wrap;word-break:break-word;border:1px solid #ddd;"
    "padding:.8em;border-radius:6px}",
    ".tok{padding:2px 0;border-radius:2px}",
    ".tok:hover{outline:2px solid #000}",
    ".ids .tok{margin-right:5px}",  # token ids, not text: keep them apart
    ".pre{box-shadow:inset 0 3px 0 #f0a000}",
    ".anc{box-shadow:inset 0 -3px 0 #d62728}",
    ".pre.anc{box-shadow:inset 0 3px 0 #f0a000,inset 0 -3px 0 #d62728}",
    ".amp{font-weight:bold}",
    "input[name=metric]{margin-left:1em}",
    ".legend span{display:inline-block;width:1.4em;height:1em;vertical-align:middle}",
    ".legend{display:none;margin:.4em 0}",
    "table.meta td{padding:0 1em 0 0}",
    "details{margin:.6em 0}",
)


def _css(names: Sequence[str]) -> str:
    """The style sheet: a checked metric radio colours the tokens by that metric's bins."""
    css = list(BASE_CSS)
    for m in names:
        # Dark bins get light text so tokens stay readable.
        for b, colour in enumerate(_palette(m)):
            fg = "#fff" if b >= 6 else "#111"
            css.append(f"#m-{m}:checked~.tokens .{m[0]}{b}{{background:{colour};color:{fg}}}")
        css.append(f"#m-{m}:checked~.lg-{m}{{display:block}}")
    return "".join(css)


def _token_spans(
    labels: Sequence[str], metrics: dict[str, np.ndarray], pre: set[int], anc: set[int]
) -> str:
    """One span per response token: its bin class per metric, peak marks and a tooltip."""
    names = list(metrics)
    binned = {m: bins(v, m) for m, v in metrics.items()}
    amp = metrics["gamma"] > 1.0
    spans = []
    for t, label in enumerate(labels):
        cls = ["tok"] + [f"{m[0]}{binned[m][t]}" for m in names]
        cls += [c for c, on in (("pre", t in pre), ("anc", t in anc), ("amp", amp[t])) if on]
        tip = f"t={t} {label!r}\n" + "\n".join(f"{m}={metrics[m][t]:.4g}" for m in names)
        if t in pre:
            tip += "\npreplan (WAAD peak)"
        if t in anc:
            tip += "\nanchor (FAI peak)"
        spans.append(
            f'<span class="{" ".join(cls)}" data-t="{t}" title="{html.escape(tip)}">'
            f"{_display(label)}</span>"
        )
    return "".join(spans)


def _controls(names: Sequence[str]) -> str:
    """The metric radios and their colour legends."""
    radios = "".join(
        f'<input type="radio" name="metric" id="m-{m}"{" checked" if i == 0 else ""}>'
        f'<label for="m-{m}">{LABELS[m]}</label>'
        for i, m in enumerate(names)
    )
    legends = "".join(
        f'<div class="legend lg-{m}">low '
        + "".join(f'<span style="background:{c}"></span>' for c in _palette(m))
        + " high</div>"
        for m in names
    )
    return radios + legends


def _header(record: dict, n: int, pre: set[int], anc: set[int], amplified: int) -> str:
    """The record's facts (id, model, strategy, counts) and its prompt, folded."""
    meta_rows = [
        ("id", str(record.get("id", ""))),
        ("model", record.get("model", "")),
        ("strategy", record.get("strategy", "")),
        ("response tokens", str(n)),
        ("preplan (WAAD peaks)", str(len(pre))),
        ("anchors (FAI peaks)", str(len(anc))),
        ("tokens with gamma > 1", str(amplified)),
    ]
    meta = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in meta_rows
        if v
    )
    prompt = record.get("prompt")
    prompt_html = (
        f"<details><summary>prompt ({record.get('prompt_len', '?')} tokens)</summary>"
        f'<pre style="white-space:pre-wrap">{html.escape(str(prompt))}</pre></details>'
        if prompt
        else ""
    )
    return f"<table class='meta'>{meta}</table>{prompt_html}"


def render_html(record: dict, title: str | None = None) -> str:
    """The self-contained HTML page for one scored response."""
    metrics = _metrics(record)
    labels = token_labels(record)
    n = len(labels)
    pre = set(find_peaks(metrics["waad"]).tolist())
    anc = set(find_peaks(metrics["fai"]).tolist())
    names = list(metrics)
    has_text = record.get("tokens") is not None and len(record["tokens"]) == n
    box_cls = "tokens" if has_text else "tokens ids"
    title = title or f"anchorcredit: {record.get('id', '')}"
    amplified = int((metrics["gamma"] > 1.0).sum())
    # The radios, legends and .tokens are siblings (radios first): the CSS `~` selector
    # needs that to recolour without any script.
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_css(names)}</style></head><body>"
        f"<h2>{html.escape(title)}</h2>{_header(record, n, pre, anc, amplified)}"
        f"Colour by:{_controls(names)}"
        "<p style='font-size:13px'>Amber bar above: <b>preplan</b> (WAAD peak). Red bar below: "
        "<b>anchor</b> (FAI peak). Bold: gamma &gt; 1. Hover a token for its numbers.</p>"
        f"<div class='{box_cls}' id='tokens'>{_token_spans(labels, metrics, pre, anc)}</div>"
        "</body></html>\n"
    )


def render_png(record: dict, path: str | Path, dpi: int = 110) -> Path:
    """Plot WAAD / FAI (/ entropy) over response position into `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed
    import matplotlib.pyplot as plt

    metrics = _metrics(record)
    n = len(metrics["waad"])
    x = np.arange(n)
    rows = ["waad", "fai"] + (["entropy"] if "entropy" in metrics else [])
    colours = {"waad": "#1f5fbf", "fai": "#d62728", "entropy": "#2ca02c"}
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(min(4 + n / 25, 16), 1.9 * len(rows) + 0.6), sharex=True
    )
    axes = np.atleast_1d(axes)
    amp = np.flatnonzero(metrics["gamma"] > 1.0)
    for ax, m in zip(axes, rows, strict=True):
        y = metrics[m]
        ax.plot(x, y, color=colours[m], lw=1.1)
        if m in ("waad", "fai"):
            pk = find_peaks(y)
            ax.plot(pk, y[pk], "o", ms=3.5, color=colours[m], label=f"{m.upper()} peaks")
        for t in amp:  # shade the amplified tokens (gamma > 1)
            ax.axvspan(t - 0.5, t + 0.5, color="#9467bd", alpha=0.12, lw=0)
        ax.set_ylabel(m.upper() if m != "entropy" else "entropy")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("response token position")
    axes[0].set_title(
        f"{record.get('id', '')}  ({record.get('model', '')}; shaded: gamma > 1)", fontsize=9
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def safe_name(s: Any) -> str:
    """A filename-safe form of a record id."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s)).strip("._")
    return out[:100] or "record"


def render(record: dict, out_dir: str | Path, stem: str | None = None) -> tuple[Path, Path]:
    """Write <stem>.html and <stem>.png into out_dir; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or safe_name(record.get("id", "record"))
    html_path = out_dir / f"{stem}.html"
    html_path.write_text(render_html(record), encoding="utf-8")
    png_path = render_png(record, out_dir / f"{stem}.png")
    return html_path, png_path


def tokens_in_dom(dom: str, labels: Sequence[str]) -> list[int]:
    """Positions whose token span is missing (or wrong) in a dumped DOM; [] when all present.

    Used by tests with chromium --dump-dom: finds each <span ... data-t="t" ...>text</span>.
    """
    import re

    found = {}
    for m in re.finditer(r'<span class="tok[^"]*" data-t="(\d+)"[^>]*>(.*?)</span>', dom, re.S):
        found[int(m.group(1))] = html.unescape(m.group(2))
    return [t for t, lab in enumerate(labels) if found.get(t) != html.unescape(_display(lab))]

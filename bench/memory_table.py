"""GPU memory per scoring replica from config shapes alone (docs/MEMORY.md's tables).

    python bench/memory_table.py [--batch-tokens 16384] [--gpus 1 2 4 8]

Parameter counts are exact: each model is built on the meta device from its published
shapes (no weights, no download) and its parameters counted by name, so "truncated" is
exactly what `serve` loads without --entropy (layers 0..last default layer, no LM head).
Activation and statistics figures are estimates from the shapes (formulas in MEMORY.md).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

GIB = 1024**3

# Published shapes (config.json of Qwen/Qwen3-8B, Qwen/Qwen3-32B, meta-llama/Llama-3.1-70B).
SHAPES = {
    "Qwen3-8B": dict(
        arch="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    ),
    "Qwen3-32B": dict(
        arch="qwen3", hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    ),
    "Llama-3-70B": dict(
        arch="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=128256,
    ),
}  # fmt: skip


@dataclass
class Memory:
    name: str
    layers: list[int]
    loaded_layers: int
    total_layers: int
    total_params: int
    truncated_params: int
    # Held whole on every rank under tensor parallelism (embedding, norms): full, truncated.
    replicated: tuple[int, int]
    act_bytes_per_token: dict[int, float]  # gpus -> bytes per token in the forward
    stats_bytes_per_token: float  # statistics kept per response token (selected layers)


def measure(name: str, shape: dict, gpus: list[int]) -> Memory:
    import torch
    import transformers

    from anchorcredit.runner.layers import select_layers

    shape = dict(shape)
    cls = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}[shape.pop("arch")]
    cfg = cls(**shape, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    depth = cfg.num_hidden_layers
    layers = select_layers(depth, None, getattr(cfg, "layer_types", None))
    keep = max(layers) + 1
    total = truncated = replicated = 0
    for pname, p in model.named_parameters():
        total += p.numel()
        whole = "embed_tokens" in pname or "norm" in pname
        replicated += p.numel() if whole else 0
        m = re.search(r"\.layers\.(\d+)\.", pname)
        if not pname.startswith("lm_head") and (m is None or int(m.group(1)) < keep):
            truncated += p.numel()
    h, i = cfg.hidden_size, cfg.intermediate_size
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    act = {}
    for g in gpus:
        # bf16 forward, no KV cache: the residual and its normed copy (replicated under
        # tensor parallelism), plus the larger of the attention branch (q, k, v, output) and
        # the MLP peak (act(gate) * up: three [T, I] tensors), both split over g ranks.
        branch = max((2 * hq + 2 * hkv) * d, 3 * i) / g
        act[g] = 2 * (2 * h + branch)
    # Per response token and selected layer: float32 WAAD and FAI of every head, kept
    # until the credit stage (rank 0 holds all heads' under tensor parallelism); plus the
    # span kernel's four fp32 per-position buffers of the layer being read (KERNEL.md).
    stats = 2 * 4 * hq * len(layers) + 4 * 4 * hq
    truncated_replicated = replicated - (depth - keep) * _norm_params(cfg)
    return Memory(
        name, layers, keep, depth, total, truncated, (replicated, truncated_replicated), act, stats
    )


def _norm_params(cfg) -> int:
    """One decoder layer's norm weights (two RMSNorms; Qwen3 adds q/k norms of head_dim)."""
    qk = 2 * cfg.head_dim if cfg.model_type == "qwen3" else 0
    return 2 * cfg.hidden_size + qk


def table(batch_tokens: int, gpus: list[int]) -> str:
    rows = [measure(name, shape, gpus) for name, shape in SHAPES.items()]
    out = [
        "| model | default layers | layers loaded | params total | params truncated | share |",
        "|---|---|---|---|---|---|",
    ]
    for m in rows:
        out.append(
            f"| {m.name} | {', '.join(map(str, m.layers))} | {m.loaded_layers} of "
            f"{m.total_layers} | {m.total_params / 1e9:.2f} B | "
            f"{m.truncated_params / 1e9:.2f} B | {m.truncated_params / m.total_params:.0%} |"
        )
    out += ["", _per_gpu_header(gpus)]
    for m in rows:
        for label, params, whole in (
            ("full (--entropy)", m.total_params, m.replicated[0]),
            ("truncated (default)", m.truncated_params, m.replicated[1]),
        ):
            cells = []
            for g in gpus:
                weights = 2 * (whole + (params - whole) / g)
                work = batch_tokens * (m.act_bytes_per_token[g] + m.stats_bytes_per_token)
                sums = (weights / GIB, work / GIB, (weights + work) / GIB)
                cells.append("{:.1f} + {:.1f} = **{:.1f}**".format(*sums))
            out.append(f"| {m.name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _per_gpu_header(gpus: list[int]) -> str:
    head = "| model | weights | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in gpus)
    return head + " |\n|---|---|" + "---|" * len(gpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-tokens", type=int, default=16384, help="serve's max_batch_tokens")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    print(table(args.batch_tokens, args.gpus))


if __name__ == "__main__":
    main()

"""`anchorcredit experiment countdown`: every arm and seed, then the report.

Layout of the results folder:
    config.json            the plan (a rerun with a different plan is refused; more steps,
                           arms or seeds extend it)
    serve.log              the `anchorcredit serve` subprocess's output
    runs/<arm>-s<seed>/    one run each (run_arm.py): steps.jsonl, eval.jsonl, checkpoint
    report.html, curves.png, summary.json   (report.py)
Runs go arm-major within a seed (seed 0: every arm, then seed 1, ...), so a run cut short
still has every arm on the first seeds. A rerun skips finished runs and resumes the others.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from anchorcredit.experiments.config import ExperimentConfig, load_saved, same_plan
from anchorcredit.experiments.countdown_tasks import make_tasks


def smoke_model(out: Path) -> Path:
    """The smoke preset's model: the tiny debug Llama plus a byte-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = out / "smoke-model"
    if (path / "tokenizer.json").is_file():
        return path
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1} | {c: i + 2 for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    # A tiny random Llama (GQA, RoPE, 6 layers so the middle-third selection is non-trivial).
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=1,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).float().save_pretrained(path)
    fast.save_pretrained(path)
    return path


def resolve_model(cfg: ExperimentConfig, out: Path) -> Path:
    """The policy's starting folder: --model, the smoke model, or the embedded SmolLM2."""
    if cfg.model:
        return Path(cfg.model)
    if cfg.debug_model:
        return smoke_model(out)
    from anchorcredit.models.packaged import embedded_default_path

    return embedded_default_path()


def log(msg: str) -> None:
    print(f"anchorcredit experiment: {msg}", file=sys.stderr, flush=True)


def run_experiment(cfg: ExperimentConfig, out: Path, report_only: bool = False) -> int:
    """Run (or resume) every arm and seed, then write the report; returns the exit code."""
    from anchorcredit.experiments.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    saved = load_saved(out)
    if saved is not None:
        differ = same_plan(saved, cfg)
        if differ:
            log(f"{out} holds a run with other settings ({', '.join(differ)}): use another --out")
            return 2
    (out / "config.json").write_text(cfg.to_json() + "\n")
    if not report_only:
        _run_all(cfg, out)
    write_report(out, cfg)
    log(f"report: {out / 'report.html'}")
    return 0


def _run_all(cfg: ExperimentConfig, out: Path) -> None:
    from anchorcredit.experiments.run_arm import train_one
    from anchorcredit.experiments.serve_process import ServeProcess

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    model_dir = resolve_model(cfg, out)
    train = make_tasks(cfg.n_train, 1000, cfg.n_numbers, cfg.max_value, cfg.max_target)
    test = make_tasks(cfg.n_test, 2000, cfg.n_numbers, cfg.max_value, cfg.max_target)
    server = None
    try:
        for seed in cfg.seeds:
            for arm in cfg.arms:
                run_dir = out / "runs" / f"{arm}-s{seed}"
                done = run_dir / "done.json"
                if done.is_file() and json.loads(done.read_text())["steps"] >= cfg.steps:
                    continue
                if arm != "grpo" and server is None:
                    server = ServeProcess(model_dir, out / "serve.log", threads=cfg.threads)
                    target = server.wait_ready()
                    log(f"anchorcredit serve ready on {target}")
                t0 = time.perf_counter()
                log(f"{arm} seed {seed}: training {cfg.steps} steps")
                train_one(
                    cfg,
                    arm,
                    seed,
                    model_dir,
                    run_dir,
                    train,
                    test,
                    server and f"127.0.0.1:{server.port}",
                    server and server.admin_token,
                )
                log(f"{arm} seed {seed}: done in {time.perf_counter() - t0:.0f} s")
    finally:
        if server is not None:
            server.stop()

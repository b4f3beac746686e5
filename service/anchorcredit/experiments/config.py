"""What one `anchorcredit experiment countdown` run does: presets and the flags over them.

Presets (every field can be overridden by its flag):
    smoke  the tiny random debug Llama with a byte tokenizer: seconds; checks the plumbing
           (a test runs it end to end), says nothing about learning.
    cpu    SmolLM2-135M-Instruct (embedded), 3-number countdown, 2 prompts x 4 completions of
           at most 40 tokens per step, 6 steps, 12 test problems, 2 seeds: about 40 min on
           two free cores (with --threads 1 at load ~8 a 4-step run took 6-15 min, so
           docs/EXPERIMENTS.md ran it with --steps 4);
           the answer tag is prefilled ("<answer>") so that a 135M model gets any reward.
    gpu    as close to the paper's protocol (Qwen3-4B-Base, TinyZero countdown with 4 numbers)
           as a local model allows: pass --model with a Qwen3-4B-Base folder; 8 prompts x 8
           completions of at most 1024 tokens, 200 steps, 3 seeds. Not run here (no GPU).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anchorcredit.contract import STRATEGIES

# The arms: "grpo" is plain TRL GRPO (no service); the rest are anchorcredit strategies
# (anchorcredit.contract.STRATEGIES) with the same TopQ fraction q, so "random" boosts as
# many tokens as "coupled_rhythm" does (the matched control).
ARMS = ("grpo", "random", "entropy", "coupled_rhythm")
# What --arms accepts: plain GRPO and every strategy of the contract but uniform (gamma = 1
# everywhere is plain GRPO with a service round trip), e.g. the paper's local and global.
KNOWN_ARMS = ("grpo", *(s for s in STRATEGIES if s != "uniform"))


@dataclass
class ExperimentConfig:
    """Every knob of the experiment; saved as config.json in the results folder."""

    model: str | None = None  # None: the preset's model (smoke: debug; cpu: embedded SmolLM2)
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 6
    prompts_per_step: int = 2
    generations: int = 4
    max_completion: int = 40
    learning_rate: float = 1e-5
    temperature: float = 1.0
    eval_every: int = 3  # test accuracy every K steps (and at step 0)
    n_train: int = 64
    n_test: int = 12
    n_numbers: int = 3
    max_value: int = 20
    max_target: int = 50
    q: float = 0.4  # TopQ fraction (paper)
    gamma_amp: float = 1.5  # gamma of a boosted token (paper)
    credit_sign: str = "both"
    chat: bool = True  # prompts through the model's chat template
    # The start of the answer, appended to every prompt; the reward scores prefill +
    # completion. "<answer>": a 135M model rarely opens the tag itself, so without it
    # every reward is 0 and GRPO has no signal (measured: 0 of 16 at step 0).
    prefill: str = "<answer>"
    debug_model: bool = False  # the smoke preset's tiny random model
    threads: int | None = None
    preset: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        debug_model=True,
        chat=False,
        seeds=(0,),
        steps=2,
        prompts_per_step=2,
        generations=2,
        max_completion=8,
        eval_every=1,
        n_train=8,
        n_test=2,
        learning_rate=1e-3,
    ),
    "cpu": dict(),
    "gpu": dict(
        seeds=(0, 1, 2),
        steps=200,
        prompts_per_step=8,
        generations=8,
        max_completion=1024,
        eval_every=20,
        n_train=2000,
        n_test=200,
        n_numbers=4,
        max_value=99,
        max_target=999,
        learning_rate=1e-6,
        chat=False,  # a base model: plain prompts, as TinyZero
        prefill="Let me solve this step by step.\n<think>",  # TinyZero's base-model prefill
    ),
}


def build_config(preset: str, overrides: dict[str, Any]) -> ExperimentConfig:
    """The preset's config with the given (non-None) overrides applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = ExperimentConfig(preset=preset, **values)
    bad = [a for a in cfg.arms if a not in KNOWN_ARMS]
    if bad:
        raise ValueError(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(KNOWN_ARMS)}")
    if cfg.steps < 1 or cfg.generations < 2 or cfg.eval_every < 1:
        raise ValueError("steps >= 1, generations >= 2 (GRPO needs a group), eval_every >= 1")
    return cfg


def same_plan(saved: dict[str, Any], cfg: ExperimentConfig) -> list[str]:
    """Fields whose saved value differs from cfg (resuming refuses a different plan; more
    steps, arms or seeds are allowed: they extend it)."""
    now = json.loads(cfg.to_json())
    growable = {"steps", "arms", "seeds", "threads"}
    return sorted(k for k, v in now.items() if k not in growable and saved.get(k) != v)


def load_saved(out: Path) -> dict[str, Any] | None:
    """The config.json of an earlier run in `out`, if any."""
    p = out / "config.json"
    return json.loads(p.read_text()) if p.is_file() else None

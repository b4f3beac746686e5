"""One (arm, seed) of the countdown A/B: TRL GRPO, per-step weight push, resumable.

Files in the run's folder (runs/<arm>-s<seed>/):
    steps.jsonl   one line per optimizer step: reward, reward_std, completion length, the
                  credit summary (gamma mean/min/max/p90, amplified fraction), scoring and
                  push seconds, step seconds
    eval.jsonl    test accuracy (greedy) and mean test reward at step 0 and every K steps
    checkpoint-N/ TRL's checkpoint of the last completed step (model, optimizer, RNG):
                  a killed run resumes from it (lines after N are dropped first)
    done.json     written when the run reached its step count
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from anchorcredit.experiments.config import ExperimentConfig
from anchorcredit.experiments.countdown_tasks import CountdownTask, make_reward, score


def _jsonl_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def truncate_after(path: Path, step: int) -> None:
    """Keep only the lines of `path` with "step" <= step (a resumed run rewrites the rest)."""
    rows = [r for r in _jsonl_lines(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The highest-numbered complete checkpoint-N folder (TRL writes trainer_state.json last)."""
    done = [p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def prompt_texts(tasks: list[CountdownTask], cfg: ExperimentConfig, tokenizer: Any) -> list[str]:
    """Each task's prompt as the model sees it: through the chat template (cfg.chat) or
    plain, then cfg.prefill (the start of the answer, e.g. "<answer>"; the reward scores
    prefill + completion)."""
    if cfg.chat:
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t.prompt()}],
                tokenize=False,
                add_generation_prompt=True,
            )
            + cfg.prefill
            for t in tasks
        ]
    return [f"{t.prompt()}\n{cfg.prefill}" for t in tasks]


def dataset_rows(
    tasks: list[CountdownTask], cfg: ExperimentConfig, tokenizer: Any
) -> dict[str, list[Any]]:
    """TRL dataset columns: prompt (text) and the verifier's fields."""
    return {
        "prompt": prompt_texts(tasks, cfg, tokenizer),
        "numbers": [list(t.numbers) for t in tasks],
        "target": [t.target for t in tasks],
    }


def evaluate(
    model: Any, tokenizer: Any, tasks: list[CountdownTask], cfg: ExperimentConfig
) -> dict[str, Any]:
    """Greedy test accuracy (share scored 1.0), mean reward and each problem's reward,
    batched with left padding."""
    import torch

    texts = prompt_texts(tasks, cfg, tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    rewards: list[float] = []
    try:
        for b in range(0, len(texts), 8):
            enc = tokenizer(
                texts[b : b + 8], return_tensors="pt", padding=True, add_special_tokens=False
            )
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    max_new_tokens=cfg.max_completion,
                    do_sample=False,
                    use_cache=True,  # TRL turns the cache off in the config for training
                    pad_token_id=tokenizer.pad_token_id,
                    top_p=None,
                    top_k=None,
                    temperature=None,
                )
            width = enc["input_ids"].shape[1]
            for i, task in enumerate(tasks[b : b + 8]):
                text = tokenizer.decode(out[i, width:], skip_special_tokens=True)
                rewards.append(score(cfg.prefill + text, task))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return {
        "test_accuracy": sum(r == 1.0 for r in rewards) / len(rewards),
        "test_reward": sum(rewards) / len(rewards),
        "test_rewards": rewards,
    }


def _callbacks(
    run_dir: Path, tokenizer: Any, test: list[CountdownTask], cfg: ExperimentConfig, sync: Any
) -> list[Any]:
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Writes steps.jsonl (from TRL's per-step log) and eval.jsonl (every K steps)."""

        def __init__(self) -> None:
            self.t_step = time.perf_counter()

        def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001
            if state.global_step == 0 and not _jsonl_lines(run_dir / "eval.jsonl"):
                self._eval(0, model)
            self.t_step = time.perf_counter()  # after the eval: step 1 times only itself

        def on_log(self, args, state, control, logs=None, model=None, **kw):  # noqa: ANN001
            if not logs or "reward" not in logs:
                return
            now = time.perf_counter()
            row = {"step": state.global_step, "step_seconds": now - self.t_step}
            row |= {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            if sync is not None and sync.seconds:
                row["push_seconds"] = sync.seconds[-1]
            with (run_dir / "steps.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            self.t_step = now
            if state.global_step % cfg.eval_every == 0 or state.global_step == cfg.steps:
                self._eval(state.global_step, model)
                self.t_step = time.perf_counter()  # the eval is not the next step's time

        def _eval(self, step: int, model: Any) -> None:
            t0 = time.perf_counter()
            res = evaluate(model, tokenizer, test, cfg)
            row = {"step": step, **res, "eval_seconds": time.perf_counter() - t0}
            with (run_dir / "eval.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    return [Recorder()]


def grpo_args(run_dir: Path, cfg: ExperimentConfig, seed: int, use_cpu: bool) -> Any:
    import trl

    return trl.GRPOConfig(
        output_dir=str(run_dir),
        per_device_train_batch_size=cfg.prompts_per_step * cfg.generations,
        num_generations=cfg.generations,
        max_completion_length=cfg.max_completion,
        max_steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        temperature=cfg.temperature,
        logging_steps=1,
        report_to="none",
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        use_cpu=use_cpu,
        bf16=not use_cpu,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # small models: recomputing activations costs time and saves memory nobody needs
        gradient_checkpointing=False,
    )


def train_one(
    cfg: ExperimentConfig,
    arm: str,
    seed: int,
    model_dir: Path,
    run_dir: Path,
    train: list[CountdownTask],
    test: list[CountdownTask],
    target: str | None,
    admin_token: str | None,
) -> None:
    """Train (or resume) one arm and seed to cfg.steps; writes the run folder's files."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from anchorcredit.models.packaged import load_tokenizer

    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "done.json"
    if done.is_file() and json.loads(done.read_text())["steps"] >= cfg.steps:
        return
    ckpt = last_checkpoint(run_dir)
    step0 = int(ckpt.name.split("-")[1]) if ckpt else 0
    for name in ("steps.jsonl", "eval.jsonl"):
        truncate_after(run_dir / name, step0)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    use_cpu = not torch.cuda.is_available()
    args = grpo_args(run_dir, cfg, seed, use_cpu)
    dataset = Dataset.from_dict(dataset_rows(train, cfg, tokenizer))
    common = dict(
        model=model,
        reward_funcs=make_reward(cfg.prefill),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    sync = None
    if arm == "grpo":
        import trl

        trainer = trl.GRPOTrainer(
            **common, callbacks=_callbacks(run_dir, tokenizer, test, cfg, None)
        )
    else:
        from anchorcredit.client import CreditClient
        from anchorcredit.client.adapters.trl import WeightSyncCallback, make_trainer_class

        client = CreditClient([target], cache=False, admin_token=admin_token)
        sync = WeightSyncCallback(client, run_id=f"{arm}-s{seed}")
        trainer = make_trainer_class()(
            **common,
            callbacks=[sync, *_callbacks(run_dir, tokenizer, test, cfg, sync)],
            credit_client=client,
            credit_strategy=arm,
            credit_sign=cfg.credit_sign,
            credit_params={"q": cfg.q, "gamma_amp": cfg.gamma_amp, "seed": seed},
        )
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    done.write_text(json.dumps({"steps": cfg.steps}) + "\n")

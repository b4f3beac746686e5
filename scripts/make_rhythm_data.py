"""Generate (prompt, response) pairs for the rhythm analysis, fully offline.

Problems come from reasoning-gym (GSM8K-style `gsm_symbolic` and `countdown`, seeded);
the responses are the model's own greedy step-by-step solutions (chat template, at most
--max-new-tokens). Each output line holds token ids AND text, so `anchorcredit score`
scores exactly the ids the model produced:

    {"id": "gsm_symbolic-0", "task": "gsm_symbolic", "question": ..., "prompt": <chat text>,
     "response": <text>, "prompt_ids": [...], "response_ids": [...], "answer": ...,
     "extracted": ..., "score": 0.0-1.0}

Usage (see docs/RHYTHM.md):
    pip install reasoning-gym==0.1.25
    nice python scripts/make_rhythm_data.py -o rhythm.jsonl --gsm 35 --countdown 35
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

INSTRUCTION = (
    "Solve the problem step by step. Show your reasoning, then give the final answer "
    "on the last line as 'Answer: <answer>'."
)
# Countdown's own prompt asks for the bare expression; we want the reasoning, so the
# format block is cut and the instruction above is appended instead.
COUNTDOWN_FORMAT = re.compile(r"\n*Final answer format instructions:.*", re.S)


def build_problems(n_gsm: int, n_countdown: int, seed: int) -> list[dict]:
    """The seeded reasoning-gym problems, as dicts with id/task/question/entry."""
    import reasoning_gym

    problems = []
    for name, n in (("gsm_symbolic", n_gsm), ("countdown", n_countdown)):
        if n <= 0:
            continue
        ds = reasoning_gym.create_dataset(name, size=n, seed=seed)
        for i in range(n):
            entry = ds[i]
            question = entry["question"]
            if name == "countdown":
                question = COUNTDOWN_FORMAT.sub("", question).strip()
            problems.append(
                {"id": f"{name}-{i}", "task": name, "question": question, "entry": entry, "ds": ds}
            )
    return problems


def extract_answer(text: str, task: str) -> str:
    """Rough answer extraction: after the last 'Answer:', else the last number / expression."""
    text = text.replace("<|im_end|>", "").strip()
    m = re.findall(r"answer\s*(?:is)?\s*[:=]?\s*(.+)", text, flags=re.I)
    cand = m[-1].strip() if m else (text.splitlines() or [""])[-1]
    if task == "gsm_symbolic":
        nums = re.findall(r"-?\d[\d,]*\.?\d*", cand) or re.findall(r"-?\d[\d,]*\.?\d*", text)
        return nums[-1].replace(",", "").rstrip(".") if nums else ""
    cand = cand.split("=")[0]
    return re.sub(r"[^0-9+\-*/() ]", "", cand).strip()


def main(argv: list[str] | None = None) -> int:
    """Generate the JSONL; returns the process exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2)")
    p.add_argument("--gsm", type=int, default=35, help="number of gsm_symbolic problems")
    p.add_argument("--countdown", type=int, default=35, help="number of countdown problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--plain",
        action="store_true",
        help="plain-text prompts (Question/Solution) for base models without a chat template",
    )
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from anchorcredit.models.packaged import embedded_default_path, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else embedded_default_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32").eval()
    tok = load_tokenizer(path)
    tok.padding_side = "left"  # decoder-only batched generation pads on the left
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    eos_id = tok.eos_token_id

    problems = build_problems(args.gsm, args.countdown, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    t0, n_tok = time.perf_counter(), 0
    with args.output.open("w") as out:
        for b in range(0, len(problems), args.batch_size):
            batch = problems[b : b + args.batch_size]
            prompts = [
                f"Question: {pr['question']}\n\n{INSTRUCTION}\n\nSolution:"
                if args.plain
                else tok.apply_chat_template(
                    [{"role": "user", "content": f"{pr['question']}\n\n{INSTRUCTION}"}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                for pr in batch
            ]
            # The chat text already holds every special token: add none (plain: the BOS).
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=args.plain)
            with torch.inference_mode():
                gen = model.generate(
                    **enc,
                    max_new_tokens=args.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            width = enc["input_ids"].shape[1]
            for i, pr in enumerate(batch):
                prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
                resp = gen[i, width:].tolist()
                if eos_id in resp:  # keep the EOS (a trainer scores it too), drop padding
                    resp = resp[: resp.index(eos_id) + 1]
                text = tok.decode(resp)
                extracted = extract_answer(text, pr["task"])
                score = float(pr["ds"].score_answer(extracted, pr["entry"])) if extracted else 0.0
                n_tok += len(resp)
                row = {
                    "id": pr["id"],
                    "task": pr["task"],
                    "question": pr["question"],
                    "prompt": prompts[i],
                    "response": text,
                    "prompt_ids": prompt_ids,
                    "response_ids": resp,
                    "answer": str(pr["entry"]["answer"]),
                    "extracted": extracted,
                    "score": score,
                }
                out.write(json.dumps(row) + "\n")
            out.flush()
            dt = time.perf_counter() - t0
            print(
                f"{b + len(batch)}/{len(problems)} problems, {n_tok} response tokens, "
                f"{n_tok / dt:.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

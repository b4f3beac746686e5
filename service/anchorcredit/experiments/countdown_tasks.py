"""Countdown tasks for the A/B: problems from reasoning-gym, prompts and the verifier.

Problems: reasoning-gym's `countdown` generator (seeded; train and test from different
seeds), which guarantees a solution that uses every number once with + - * /.
Prompt: TinyZero's countdown prompt, asking for the equation in <answer> </answer> tags.
Reward (TinyZero's `compute_score` rule, written here from its description):
    1.0  the last <answer>...</answer> holds an expression of digits, + - * / ( ) and
         spaces that uses each given number exactly once and evaluates to the target;
    0.1  an <answer> tag is there but the expression is wrong (the format score);
    0.0  no <answer> tag.
Test accuracy is the share of test problems scored 1.0 (greedy decoding).
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from typing import Any

FORMAT_SCORE = 0.1
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
ALLOWED = re.compile(r"^[\d+\-*/().\s]+$")
PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Return the "
    "final equation in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)


@dataclass(frozen=True)
class CountdownTask:
    """One problem: the numbers to use (each exactly once) and the target."""

    numbers: tuple[int, ...]
    target: int

    def prompt(self) -> str:
        return PROMPT.format(numbers=list(self.numbers), target=self.target)


def make_tasks(
    n: int, seed: int, n_numbers: int, max_value: int, max_target: int
) -> list[CountdownTask]:
    """`n` seeded problems from reasoning-gym's countdown generator."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset(
        "countdown",
        size=n,
        seed=seed,
        min_numbers=n_numbers,
        max_numbers=n_numbers,
        min_value=1,
        max_value=max_value,
        min_target=1,
        max_target=max_target,
    )
    return [
        CountdownTask(
            tuple(int(x) for x in ds[i]["metadata"]["numbers"]), int(ds[i]["metadata"]["target"])
        )
        for i in range(n)
    ]


_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _eval(node: ast.AST) -> float:
    """Arithmetic only (+ - * / and unary minus on numbers); anything else raises."""
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand)
    raise ValueError("not an arithmetic expression")


def extract_answer(text: str) -> str | None:
    """The text inside the last <answer></answer>, or None."""
    found = ANSWER.findall(text)
    return found[-1].strip() if found else None


def score(text: str, task: CountdownTask) -> float:
    """The reward of one completion (module docstring)."""
    expr = extract_answer(text)
    if expr is None:
        return 0.0
    if not expr or not ALLOWED.match(expr):
        return FORMAT_SCORE
    used = sorted(int(x) for x in re.findall(r"\d+", expr))
    if used != sorted(task.numbers):
        return FORMAT_SCORE
    try:
        value = _eval(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return FORMAT_SCORE
    return 1.0 if abs(value - task.target) < 1e-5 else FORMAT_SCORE


def completion_text(completion: Any) -> str:
    """TRL hands conversational completions as [{"role", "content"}], plain ones as str."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def make_reward(prefill: str = "") -> Any:
    """A TRL reward function that scores prefill + completion (the prompt ends with the
    prefill, so the model's completion continues it)."""

    def countdown_reward(
        completions: list[Any], numbers: list[list[int]], target: list[int], **_: Any
    ) -> list[float]:
        return reward_fn([prefill + completion_text(c) for c in completions], numbers, target)

    return countdown_reward


def reward_fn(
    completions: list[Any], numbers: list[list[int]], target: list[int], **_: Any
) -> list[float]:
    """TRL reward function: the dataset's `numbers` and `target` columns arrive as kwargs."""
    return [
        score(completion_text(c), CountdownTask(tuple(n), int(t)))
        for c, n, t in zip(completions, numbers, target, strict=True)
    ]

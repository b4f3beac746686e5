"""The countdown verifier (TinyZero's reward rule), the prompt, and the presets."""

from __future__ import annotations

import json

import pytest

from anchorcredit.experiments.config import PRESETS, build_config, same_plan
from anchorcredit.experiments.countdown_tasks import (
    FORMAT_SCORE,
    CountdownTask,
    completion_text,
    extract_answer,
    make_reward,
    reward_fn,
    score,
)

TASK = CountdownTask((3, 5, 7), 22)  # 3 * 5 + 7


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("<answer> 3 * 5 + 7 </answer>", 1.0),
        ("thinking... <answer>(5*3)+7</answer>", 1.0),
        ("<answer>7 + 5 * 3</answer><answer>3+5+7</answer>", FORMAT_SCORE),  # last tag counts
        ("<answer>3 * 5 + 7 + 0</answer>", FORMAT_SCORE),  # an extra number
        ("<answer>3 * 5 + 7 + 7</answer>", FORMAT_SCORE),  # a number used twice
        ("<answer>5 * 3</answer>", FORMAT_SCORE),  # a number missing
        ("<answer>3 * 5 + 7 = 22</answer>", FORMAT_SCORE),  # not an expression
        ("<answer>__import__('os')</answer>", FORMAT_SCORE),  # never evaluated
        ("<answer>7 / (5 - 5) + 3</answer>", FORMAT_SCORE),
        ("<answer></answer>", FORMAT_SCORE),
        ("3 * 5 + 7", 0.0),  # no tag
    ],
)
def test_score_follows_the_tinyzero_rule(text, want):
    assert score(text, TASK) == want


def test_division_is_exact_not_integer():
    assert score("<answer>(7 + 5) / 3</answer>", CountdownTask((3, 5, 7), 4)) == 1.0
    assert score("<answer>7 / 3 + 5</answer>", CountdownTask((3, 5, 7), 7)) == FORMAT_SCORE


def test_reward_fn_reads_trl_columns_and_chat_completions():
    chat = [[{"role": "assistant", "content": "<answer>3*5+7</answer>"}], "<answer>1</answer>"]
    assert completion_text(chat[0]) == "<answer>3*5+7</answer>"
    assert reward_fn(chat, numbers=[[3, 5, 7], [1]], target=[22, 2]) == [1.0, FORMAT_SCORE]
    assert extract_answer("no tags") is None


def test_make_reward_scores_the_prefill_and_the_completion_together():
    fn = make_reward("<answer>")
    assert fn(["3 * 5 + 7</answer>", "3 * 5</answer>", "3 * 5 + 7"], [[3, 5, 7]] * 3, [22] * 3) == [
        1.0,
        FORMAT_SCORE,
        0.0,  # the tag is never closed
    ]


def test_reasoning_gym_tasks_are_seeded_and_solvable_by_their_own_answer():
    pytest.importorskip("reasoning_gym")
    import reasoning_gym

    from anchorcredit.experiments.countdown_tasks import make_tasks

    a = make_tasks(5, 1000, 3, 20, 50)
    assert a == make_tasks(5, 1000, 3, 20, 50)
    assert all(len(t.numbers) == 3 for t in a)
    ds = reasoning_gym.create_dataset(
        "countdown",
        size=5,
        seed=1000,
        min_numbers=3,
        max_numbers=3,
        min_value=1,
        max_value=20,
        min_target=1,
        max_target=50,
    )
    for i, t in enumerate(a):  # the generator's reference solution passes our verifier
        assert score(f"<answer>{ds[i]['answer']}</answer>", t) == 1.0


def test_presets_and_overrides():
    cfg = build_config("cpu", {"steps": 3, "seeds": None})
    assert cfg.steps == 3 and cfg.seeds == (0, 1) and cfg.preset == "cpu"
    assert build_config("gpu", {}).n_numbers == PRESETS["gpu"]["n_numbers"] == 4
    both = build_config("cpu", {"arms": ("grpo", "local_chunk", "global_anchor")})
    assert both.arms == ("grpo", "local_chunk", "global_anchor")  # the paper's local/global
    with pytest.raises(ValueError, match="unknown arm"):
        build_config("cpu", {"arms": ("uniform",)})
    with pytest.raises(ValueError, match="unknown arm"):
        build_config("cpu", {"arms": ("grpo", "bogus")})
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("huge", {})
    saved = json.loads(cfg.to_json())
    assert same_plan(saved, build_config("cpu", {"steps": 10, "seeds": (0, 1, 2)})) == []
    assert same_plan(saved, build_config("cpu", {"steps": 3, "learning_rate": 1.0})) == [
        "learning_rate"
    ]

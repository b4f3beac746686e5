"""Runner input checks (InputError naming field and index), parameters and layer selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from debug_model import build_debug_model

from anchorcredit import Scorer
from anchorcredit.errors import InputError
from anchorcredit.runner import select_layers


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    # max_position_embeddings=64 so that the length limit is cheap to hit
    return Scorer.from_pretrained(build_debug_model("qwen3", seed=0, max_position_embeddings=64))


GOOD = ([1, 2, 3], [4, 5])


@pytest.mark.parametrize(
    ("bad", "field", "match"),
    [
        (([1, 2], [4, 256]), "response_ids", r"token id 256 at position 1 is outside \[0, 256\)"),
        (([-1, 2], [4]), "prompt_ids", "token id -1 at position 0"),
        (([], [4]), "prompt_ids", "at least one token"),
        (([1], []), "response_ids", "at least one token"),
        (([1.5], [4]), "prompt_ids", "integers"),
        (([[1, 2]], [4]), "prompt_ids", "1-D"),
        ((list(range(40)), list(range(25))), "response_ids", "65 tokens, over the model's 64"),
    ],
)
def test_bad_inputs_name_field_and_index(scorer, bad, field, match):
    with pytest.raises(InputError, match=match) as err:
        scorer.validate([GOOD, GOOD, bad])
    assert err.value.index == 2 and err.value.field == f"sequences[2].{field}"
    with pytest.raises(InputError):  # score() validates too, before any compute
        scorer.score([GOOD, bad])


def test_accepted_input_types(scorer):
    pairs = [
        (np.array([1, 2, 3], dtype=np.int32), torch.tensor([4, 5])),
        ((7,), np.array([255], dtype=np.uint16)),
        (list(range(30)), list(range(34))),  # exactly max positions
    ]
    res = scorer.score(pairs)
    assert [len(r.gamma) for r in res] == [2, 1, 34]
    assert scorer.score([]) == []


def test_not_a_pair(scorer):
    with pytest.raises(InputError) as err:
        scorer.validate([GOOD, ([1, 2],)])
    assert err.value.index == 1 and err.value.field == "sequences[1]"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(strategy="nope"),
        dict(q=1.5),
        dict(gamma_amp=0.5),
        dict(k=0),
        dict(window=-1),
        dict(h_lo=5, h_hi=4),
        dict(head_quantile=0.0),
        dict(local_heads=[(2, 0)]),
        dict(local_heads=[(0, 0)], global_heads=[(3, 1)]),  # layer 0 is not captured
        dict(local_heads=[(2, 9)], global_heads=[(3, 1)]),  # head out of range
    ],
)
def test_bad_parameters(scorer, kwargs):
    with pytest.raises(InputError):
        scorer.score([GOOD], **kwargs)


def test_fixed_head_set(scorer):
    [r] = scorer.score(
        [([1, 2, 3], list(range(20)))], local_heads=[(2, 0), (3, 1)], global_heads=[(4, 3)]
    )
    assert r.local_heads == [(2, 0), (3, 1)] and r.global_heads == [(4, 3)]


def test_select_layers():
    assert select_layers(36) == [12, 15, 18, 21, 24]
    assert select_layers(30) == [10, 12, 15, 18, 20]  # 12.5 -> 12, 17.5 -> 18 (half to even)
    assert select_layers(28) == [9, 11, 14, 16, 18]
    assert select_layers(6) == [2, 3, 4]  # duplicates removed
    assert select_layers(1) == [0]
    assert select_layers(8, [5, 1, 5]) == [1, 5]
    for bad in ([], [8], [-1], [1.5]):
        with pytest.raises(ValueError):
            select_layers(8, bad)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Scorer.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="out of range"):
        Scorer.from_pretrained(build_debug_model("llama"), layers=[6])
    with pytest.raises(ValueError, match="dtype"):
        Scorer.from_pretrained(build_debug_model("llama"), dtype="int8")
    with pytest.raises(ValueError, match="backend"):
        Scorer.from_pretrained(build_debug_model("llama"), backend="magic")

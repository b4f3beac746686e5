"""The perturbation test: content-word rule, position picking, bootstrap, and a tiny model run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anchorcredit.offline.perturb import (
    Trial,
    bootstrap_by_group,
    content_words,
    eligible_positions,
    jaccard,
    pick_positions,
    summarize,
)


def test_content_words_drop_stopwords_punctuation_and_case():
    words = content_words("So, the Answer is 42: we add 3 + 39 = 42. Then we're done!")
    assert words == {"answer", "42", "add", "3", "39", "re", "done"}


def test_content_words_split_underscores_and_keep_unicode_letters():
    assert content_words("x_1 Größe") == {"x", "1", "größe"}


def test_jaccard_of_sets_and_of_two_empty_sets():
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 1.0
    assert jaccard({"a"}, set()) == 0.0


def test_eligible_positions_stop_before_the_last_token_and_the_trailing_zero_fai():
    assert eligible_positions([0.5, 0.1, 0.3, 0.0, 0.0]).tolist() == [0, 1, 2]
    assert eligible_positions([0.5, 0.1, 0.3]).tolist() == [0, 1]  # R-2 bounds it
    assert eligible_positions([0.0, 0.0]).tolist() == []


def test_pick_positions_matches_brute_force_on_random_fai():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n_tok = int(rng.integers(1, 30))
        fai = rng.integers(0, 6, n_tok).astype(float)  # many ties
        fai[n_tok - int(rng.integers(0, 4)) :] = 0.0
        n = int(rng.integers(1, 5))
        high, low = pick_positions(fai, n)
        elig = list(eligible_positions(fai))
        m = min(n, len(elig) // 2)
        want_high = sorted(elig, key=lambda t: (-fai[t], t))[:m]
        rest = [t for t in elig if t not in want_high]
        want_low = sorted(rest, key=lambda t: (fai[t], t))[:m]
        assert high == want_high and low == want_low
        assert not set(high) & set(low)


def _trials(pairs):
    return [Trial(f"r{g}", 0, 1, 1.0, 0.0, h, lo) for g, h, lo in pairs]


def test_summary_means_share_and_ties():
    s = summarize(_trials([(0, 0.2, 0.5), (0, 0.5, 0.5), (1, 0.8, 0.4), (2, 0.1, 0.9)]), n_boot=0)
    assert s.n_responses == 3 and s.n_trials == 4
    assert s.jaccard_high == pytest.approx(0.4)
    assert s.jaccard_low == pytest.approx(0.575)
    assert s.share_high_lower == 0.5 and s.share_tied == 0.25
    assert s.diff_low_minus_high == pytest.approx(0.175)


def test_bootstrap_resamples_whole_responses_with_a_seed():
    groups = ["a", "a", "b", "c"]
    jh = np.array([0.0, 0.2, 1.0, 0.5])
    jl = np.array([1.0, 1.0, 0.0, 0.5])
    ci = bootstrap_by_group(groups, jh, jl, n_boot=300, seed=7)
    assert ci == bootstrap_by_group(groups, jh, jl, n_boot=300, seed=7)
    # brute force: draw responses with the same generator, keep each one's trials together
    rng = np.random.default_rng(7)
    members = {"a": [0, 1], "b": [2], "c": [3]}
    keys = list(members)
    means, shares = [], []
    for _ in range(300):
        pick = [i for k in rng.integers(0, 3, 3) for i in members[keys[k]]]
        means.append(jh[pick].mean())
        shares.append((jh[pick] < jl[pick]).mean())
    assert ci["jaccard_high"] == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert ci["share_high_lower"] == pytest.approx(tuple(np.percentile(shares, [2.5, 97.5])))
    # one response: nothing to resample
    assert bootstrap_by_group(["a", "a"], jh[:2], jl[:2], 100, 0)["jaccard_high"] is None


def _word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.mark.slow
def test_perturb_end_to_end_on_the_debug_model(tmp_path, capsys):
    """Scores with the Scorer, then `anchorcredit analyze --perturb`: positions are the
    scorer's FAI extremes, each alternative differs from the original token, and the
    rollout from an unperturbed prefix reproduces the (greedy) original continuation."""
    pytest.importorskip("torch")
    from debug_model import save_debug_model
    from transformers import AutoModelForCausalLM

    from anchorcredit.cli import main
    from anchorcredit.offline.perturb_rollout import greedy_rollouts
    from anchorcredit.runner import Scorer

    model_dir = save_debug_model(tmp_path / "llama", arch="llama")
    _word_tokenizer(256).save_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(3, 256, 6)] for _ in range(3)]
    # the model's own greedy text (so an unperturbed rollout must reproduce it)
    responses = greedy_rollouts(model, prompts, [40, 40, 40], pad_id=0)
    assert responses == [greedy_rollouts(model, [p], [40], 0)[0] for p in prompts]
    scorer = Scorer.from_pretrained(model_dir)
    res = scorer.score(list(zip(prompts, responses, strict=True)))
    scored = tmp_path / "scored.jsonl"
    with scored.open("w") as fh:
        for i, (p, r, s) in enumerate(zip(prompts, responses, res, strict=True)):
            rec = {"id": f"r{i}", "prompt_ids": p, "response_ids": r}
            fh.write(json.dumps(rec | {"waad": s.waad.tolist(), "fai": s.fai.tolist()}) + "\n")
    trials_out = tmp_path / "trials.jsonl"
    argv = ["analyze", str(scored), "--perturb", "--model", str(model_dir), "--positions", "2"]
    argv += [
        "--rollout-tokens",
        "8",
        "--bootstrap",
        "50",
        "--json",
        "--trials-out",
        str(trials_out),
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)["perturbation"]
    assert out["n_responses"] == 3 and out["n_trials"] == 6
    trials = [json.loads(line) for line in trials_out.read_text().splitlines()]
    for t in trials:
        i = int(t["record"][1:])
        high, low = pick_positions(res[i].fai, 2)
        assert t["high_pos"] in high and t["low_pos"] in low
        assert t["high_fai"] == pytest.approx(float(res[i].fai[t["high_pos"]]))
        assert t["high_alt"] != responses[i][t["high_pos"]]
        assert t["low_alt"] != responses[i][t["low_pos"]]
        assert 0.0 <= t["jaccard_high"] <= 1.0 and 0.0 <= t["jaccard_low"] <= 1.0

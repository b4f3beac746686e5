"""End to end with TRL: two GRPO steps of a tiny random model on the CPU, live service.

Asserts that the advantages reaching TRL's loss are exactly A * gamma, with A what TRL
computed and gamma what the service returns for those very (prompt, completion) token ids
(asked again through a separate, uncached client). Also checks the weight-sync callback
(default: push over gRPC after every optimizer step) keeps the service on the trainer's
latest weights: after each step every score comes from the version just pushed, whose
weights equal the trainer's; and that TRL's logged metrics carry the per-step credit summary
recomputed from those gammas (adapters/summary.py), its cache hit ratio 1 on a repeated run.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

trl = pytest.importorskip("trl")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from anchorcredit.client import CreditClient, gamma_matrix  # noqa: E402
from anchorcredit.client.adapters.trl import WeightSyncCallback, make_trainer_class  # noqa: E402

VOCAB = 256


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.mark.slow
def test_trl_grpo_two_steps_advantages_are_a_times_gamma(
    tmp_path, start_server, check_step_summary
):
    from datasets import Dataset
    from debug_model import save_debug_model
    from transformers import AutoModelForCausalLM

    model_dir = save_debug_model(tmp_path / "policy0", arch="llama")
    tokenizer = _tokenizer()
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"w{i}" for i in rng.integers(3, VOCAB, 5)) for _ in range(8)]
    dataset = Dataset.from_dict({"prompt": prompts})

    def reward(completions, **kwargs):  # varied, deterministic rewards -> non-zero advantages
        return [
            float(sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) % 7) for c in completions
        ]

    server = start_server(model_dir)
    try:
        client = CreditClient([server.target], cache=None)
        checker = CreditClient([server.target], cache=False)
        seen: list[dict] = []
        # The background push of step n must run while step n+1's rollouts are generated:
        # the push waits (event-ordered, no timing) until that generation has begun; an
        # in-line push would time out here and fail the run.
        generating = [threading.Event() for _ in range(3)]
        overlapped: list[tuple[str, bool]] = []
        push_now = client.background_pusher._push

        def push_once_generation_begins(weights, version, **kw):
            n = int(version.split("-")[1])
            if n + 1 < len(generating):  # the last push has no next generation
                overlapped.append((version, generating[n + 1].wait(60)))
            return push_now(weights, version, **kw)

        client.background_pusher._push = push_once_generation_begins

        class Recorder(trl.GRPOTrainer):
            """Keeps TRL's own [B] advantages (below the adapter in the MRO)."""

            def _generate_and_score_completions(self, inputs):
                generating[len(seen) + 1].set()  # generation of step len(seen) + 1 begins
                out = super()._generate_and_score_completions(inputs)
                self.raw = {
                    k: out[k].clone()
                    for k in (
                        "advantages",
                        "prompt_ids",
                        "prompt_mask",
                        "completion_ids",
                        "completion_mask",
                    )
                }
                return out

        base = make_trainer_class(Recorder)

        class Probe(base):
            """Checks what reaches the loss."""

            def _compute_loss(self, model, inputs):
                rec = {
                    k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)
                } | {"raw": self.raw}
                # Ask the service now, while it holds the policy this batch was scored with.
                rows = [
                    i
                    for i in range(rec["completion_mask"].shape[0])
                    if rec["completion_mask"][i].any()
                ]
                res = checker.score(
                    [rec["prompt_ids"][i][rec["prompt_mask"][i].bool()].tolist() for i in rows],
                    [
                        rec["completion_ids"][i][rec["completion_mask"][i].bool()].tolist()
                        for i in rows
                    ],
                )
                rec["gamma"] = dict(zip(rows, (r.gamma for r in res), strict=True))
                rec["version"] = res[0].policy_version if res else None
                seen.append(rec)
                return super()._compute_loss(model, inputs)

        args = trl.GRPOConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=8,
            max_steps=2,
            learning_rate=1e-3,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            temperature=1.0,
            seed=0,
            dataloader_num_workers=0,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = 1
        sync = WeightSyncCallback(client, run_id="t1")
        trained_after_step: list[dict] = []

        class AfterSync(transformers.TrainerCallback):
            """Runs after the sync callback: the weights it pushes (in the background)."""

            def on_step_end(self, args, state, control, model=None, **kwargs):
                trained = {n: p.detach().clone() for n, p in model.named_parameters()}
                trained_after_step.append(trained)

        trainer = Probe(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            credit_client=client,
            callbacks=[sync, AfterSync()],
        )
        trainer.train()

        assert len(seen) == 2
        assert overlapped == [("step-0-t1", True), ("step-1-t1", True)]
        for step, rec in enumerate(seen):
            adv = rec["advantages"]
            assert adv.dim() == 2 and adv.shape == rec["completion_ids"].shape
            raw = rec["raw"]
            boosted = 0
            # Rows are shuffled after generation: find each loss row in TRL's raw batch.
            for i in range(adv.shape[0]):
                j = next(
                    j
                    for j in range(raw["completion_ids"].shape[0])
                    if torch.equal(raw["completion_ids"][j], rec["completion_ids"][i])
                    and torch.equal(raw["prompt_ids"][j], rec["prompt_ids"][i])
                )
                cm = rec["completion_mask"][i].bool()
                if not cm.any():
                    continue
                g = torch.from_numpy(gamma_matrix([rec["gamma"][i]], cm[None].numpy())[0])
                want = raw["advantages"][j] * g
                torch.testing.assert_close(adv[i][cm], want[cm], rtol=0, atol=0)
                boosted += int((cm & (g != 1)).sum()) if raw["advantages"][j] != 0 else 0
            assert (adv != 0).any()
            assert boosted > 0  # some advantage was scaled by a gamma != 1
            # pushed at train begin (step 0), then after each step
            assert rec["version"] == f"step-{step}-t1"
        # the per-step credit summary in TRL's logged metrics, one entry per step: gamma
        # statistics over the completion tokens the service scored, the step's version;
        # every step scores new weights, so nothing comes from the client's cache
        logged = [h for h in trainer.state.log_history if "anchorcredit/gamma_mean" in h]
        assert len(logged) == 2
        for step, (h, rec) in enumerate(zip(logged, seen, strict=True)):
            want = check_step_summary(h, rec["gamma"].values(), hit_ratio=0.0, policy_step=step)
            assert want["gamma_mean"] > 1.0  # some tokens are boosted
            # the weight sync's figures: the pinned push's seconds, the trainer's wait
            assert h["anchorcredit/push_seconds"] > 0 and h["anchorcredit/sync_seconds"] >= 0
            if step:  # a share of the step between two scorings
                assert 0 <= h["anchorcredit/sync_share"] < 1
            else:
                assert "anchorcredit/sync_share" not in h
        assert len(trained_after_step) == 2  # on_train_end waited for the last push:
        assert client.model_info(refresh=True).policy_version == "step-2-t1"
        assert sync.version == "step-2-t1" and len(sync.seconds) == 3
        # the service now scores exactly as a Scorer loaded with the trainer's final weights
        final = trained_after_step[-1]
        tuned = tmp_path / "final"
        model.save_pretrained(tuned)
        for n, p in AutoModelForCausalLM.from_pretrained(tuned).named_parameters():
            torch.testing.assert_close(p, final[n], rtol=0, atol=0)
        from anchorcredit.runner import Scorer

        ids_p, ids_r = [[3, 4, 5, 6]], [[7, 8, 9, 10, 11, 12]]
        ref = Scorer.from_pretrained(tuned).score(list(zip(ids_p, ids_r, strict=True)))
        got = checker.score(ids_p, ids_r, policy_version="step-2-t1")
        np.testing.assert_array_equal(got[0].waad, ref[0].waad)
        np.testing.assert_array_equal(got[0].gamma, ref[0].gamma)
        client.close()
        checker.close()
    finally:
        server.stop()


def _one_step_trainer(tmp_path, model_dir, client, **credit):
    """A real TRL GRPO trainer on the tiny model, one optimizer step, no weight sync."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(1)
    prompts = [" ".join(f"w{i}" for i in rng.integers(3, VOCAB, 5)) for _ in range(4)]
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    seen = []

    class Probe(make_trainer_class()):
        def _compute_loss(self, model, inputs):
            seen.append(inputs["advantages"].detach().clone())
            return super()._compute_loss(model, inputs)

    trainer = Probe(
        model=model,
        reward_funcs=lambda completions, **kw: [float(len(c) % 3) for c in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=_tokenizer(),
        credit_client=client,
        **credit,
    )
    return trainer, seen


@pytest.mark.slow
def test_a_run_without_weight_sync_is_told_it_scores_another_runs_weights(
    tmp_path, start_server, monkeypatch, caplog
):
    """A second run against the same service, without WeightSyncCallback, scored
    with the first run's final weights (`step-3-<first run>`) and said nothing."""
    from debug_model import save_debug_model
    from safetensors.torch import load_file

    from anchorcredit.client.adapters.policy_check import StalePolicyError, StalePolicyWarning

    monkeypatch.delenv("ANCHORCREDIT_STALE_POLICY", raising=False)
    monkeypatch.delenv("ANCHORCREDIT_RUN_ID", raising=False)
    model_dir = save_debug_model(tmp_path / "policy0", arch="llama")
    server = start_server(model_dir)
    try:
        with CreditClient([server.target], cache=False) as first_run:
            # what the first run's WeightSyncCallback left on the service
            weights = load_file(model_dir / "model.safetensors")
            first_run.push_weights({k: v * 1.01 for k, v in weights.items()}, "step-3-run1")

        client = CreditClient([server.target], cache=None)
        trainer, seen = _one_step_trainer(tmp_path, model_dir, client)
        with pytest.warns(StalePolicyWarning, match=r"'step-3-run1' \(pushed by run 'run1'"):
            trainer.train()
        assert any("step-3-run1" in r.getMessage() for r in caplog.records)
        assert len(seen) == 1 and seen[0].dim() == 2  # it still trained, with gamma

        strict, _ = _one_step_trainer(
            tmp_path, model_dir, CreditClient([server.target]), credit_stale_policy="error"
        )
        with pytest.raises(StalePolicyError, match="step-3-run1"):
            strict.train()

        monkeypatch.setenv("ANCHORCREDIT_STALE_POLICY", "frozen")  # a fixed policy, on purpose
        frozen_client = CreditClient([server.target])
        summaries, batches = [], []
        for _ in range(2):  # the same run twice: the second scores only from the cache
            frozen, seen = _one_step_trainer(tmp_path, model_dir, frozen_client)
            with warnings.catch_warnings():
                warnings.simplefilter("error", StalePolicyWarning)
                frozen.train()
            assert len(seen) == 1
            batches.append(seen[0])
            [logged] = [h for h in frozen.state.log_history if "anchorcredit/gamma_mean" in h]
            summaries.append({k: v for k, v in logged.items() if k.startswith("anchorcredit/")})
        torch.testing.assert_close(batches[0], batches[1], rtol=0, atol=0)  # the same batch
        assert [s.pop("anchorcredit/cache_hit_ratio") for s in summaries] == [0.0, 1.0]
        assert [s.pop("anchorcredit/score_seconds") > 0 for s in summaries] == [True, True]
        assert summaries[0] == summaries[1]  # the same gammas, from the cache
        assert summaries[0]["anchorcredit/policy_step"] == 3  # the served step-3-run1
        frozen_client.close()
        with pytest.raises(ValueError, match="credit_stale_policy|stale_policy"):
            _one_step_trainer(tmp_path, model_dir, client, credit_stale_policy="sometimes")
        client.close()
    finally:
        server.stop()

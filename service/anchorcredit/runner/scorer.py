"""Scorer: (prompt, response) token IDs -> per-token WAAD, FAI, gamma (and entropy).

The runner's side of the server seam (anchorcredit.backend: ScoringBackend and
WeightLifecycle, together ServingBackend): `validate`
checks ids once, `score_batch` runs ONE packed forward (forward.py: attention capture,
statistics, early exit) and the credit stage for the batch (credit_stage.py), returning the
results with per-stage seconds. How much goes into one forward is the caller's choice: the
server's batcher owns the token budget and the one out-of-memory split
(anchorcredit.budget). `score` is the convenience for Python callers. See docs/RUNNER.md.

Early exit: the attention function raises StopForward right after capturing the last
selected layer's q/k. Compared with truncating the layer list this mutates nothing in the
model (no ModuleList surgery that a concurrent weight reload or a later full forward could
trip over), needs no per-architecture knowledge, and stops even earlier: the last selected
layer's own attention output and MLP are skipped too. The LM head never runs (we call the
decoder, not the CausalLM wrapper) unless entropy is asked for.

Partial loading: layers after the last selected one, and the LM head, would never run, so
from_pretrained(entropy=False) does not load them at all (loading.py; docs/MEMORY.md). The
layer choice is fixed when the scorer is built, so what to load is known then; entropy, a
per-request output, needs every layer and the head, and is refused (InputError) by a scorer
loaded without them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from anchorcredit import contract
from anchorcredit.backend import BatchScores, Head, ModelInfo, ScoreResult, TokenPair
from anchorcredit.contract import CreditParams
from anchorcredit.engine import PackedStats, resolve_backend
from anchorcredit.errors import InputError, WeightVersionConflict, clip
from anchorcredit.runner import fingerprint
from anchorcredit.runner.capture import ATTN_IMPLEMENTATION
from anchorcredit.runner.credit_stage import credit_results
from anchorcredit.runner.forward import Horizon, packed_forward
from anchorcredit.runner.inputs import validate_pairs
from anchorcredit.runner.layers import LayerChoiceError, select_layers
from anchorcredit.runner.loading import (
    LoadedModel,
    load_model,
    model_config,
    param_count,
    parse_dtype,
    resolve_source,
)
from anchorcredit.runner.timing import StageTimer
from anchorcredit.runner.weights import PartialWeightsError, WeightStaging, owned_tensors
from anchorcredit.weight_wire import WeightUpdateSpec

__all__ = ["Scorer", "ScoreResult", "parse_dtype"]


class Scorer:
    """A policy model that scores (prompt_ids, response_ids) pairs. See from_pretrained()."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        layers: Sequence[int] | None = None,
        policy_version: str = "0",
        backend: str = "auto",
        model_id: str | None = None,
        revision: str | None = None,
        loaded: LoadedModel | None = None,
    ):
        """`loaded`: what loading.load_model returned when `model` (its .model) may hold only
        the first layers of the checkpoint's model: the whole model's config, parameter
        count and the tensors not loaded. Without it `model` is the whole model."""
        model.eval().requires_grad_(False)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        cfg = (loaded.config if loaded else model.config).get_text_config()
        self._cfg = cfg
        self.num_layers = int(cfg.num_hidden_layers)  # the whole model's depth
        self.layers = select_layers(self.num_layers, layers, getattr(cfg, "layer_types", None))
        self.layers_loaded = int(model.config.get_text_config().num_hidden_layers)
        if max(self.layers) >= self.layers_loaded:
            raise LayerChoiceError(
                f"layer {max(self.layers)} is beyond the {self.layers_loaded} layers loaded; "
                "load the model with more layers (Scorer.from_pretrained loads what `layers` "
                "needs)",
                list(range(self.layers_loaded)),
            )
        self.policy_version = str(policy_version)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_heads = int(cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads)
        self.backend = resolve_backend(backend, self.device, self.head_dim)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        mp = getattr(cfg, "max_position_embeddings", None)
        self.max_positions = int(mp) if mp else None
        self.model_id = model_id or str(getattr(model.config, "_name_or_path", "") or "")
        self.revision = revision or str(getattr(model.config, "_commit_hash", "") or "")
        # Parameters (tied ones once): what is held, and the whole model's.
        self.loaded_param_count = param_count(model)
        self.total_param_count = loaded.total_param_count if loaded else self.loaded_param_count
        self._skipped_tensors = dict(loaded.skipped_tensors) if loaded else {}
        self._lock = threading.Lock()  # scoring and a weight commit never interleave
        self._weights_broken: str | None = None  # set by a reload that failed half way
        # The weights digest (runner/fingerprint.py): one record per live tensor, and the
        # digest each version label named (a label never names other weights).
        self._records = self._initial_records()
        self.weights_digest = fingerprint.combine(self._records)
        self._label_digests = {self.policy_version: self.weights_digest}

    @classmethod
    def from_pretrained(
        cls,
        path_or_model: str | Path | torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        layers: Sequence[int] | None = None,
        *,
        policy_version: str = "0",
        backend: str = "auto",
        model_id: str | None = None,
        revision: str | None = None,
        entropy: bool = True,
    ) -> Scorer:
        """Load a decoder-only causal LM (local safetensors folder, offline) or wrap a model.

        path_or_model: a directory, an already built transformers model (the Scorer takes it
        over: eval mode, our attention implementation, moved to device/dtype), or None for the
        embedded default model (anchorcredit.models.packaged).

        entropy: keep entropy available (every layer and the LM head are loaded). False loads
        from a folder only the layers up to the last selected one and no LM head (about 2/3
        of the weights with the default layers; docs/MEMORY.md); entropy is then refused.
        A model object is used as it is.
        """
        source, default_id = resolve_source(path_or_model)
        full = model_config(source)
        text = full.get_text_config()
        chosen = select_layers(
            int(text.num_hidden_layers), layers, getattr(text, "layer_types", None)
        )
        loaded = load_model(
            source,
            torch.device(device),
            parse_dtype(dtype),
            layers_needed=None if entropy else max(chosen) + 1,
            with_head=entropy,
        )
        return cls(
            loaded.model,
            layers=chosen,
            policy_version=policy_version,
            backend=backend,
            model_id=model_id or default_id,
            revision=revision,
            loaded=loaded,
        )

    def _initial_records(self) -> dict[str, bytes]:
        """Fingerprint records of the weights loaded (anchorcredit.runner.fingerprint)."""
        return fingerprint.records(owned_tensors(self.model))

    def _digest_after(self, stage: WeightStaging) -> tuple[dict[str, bytes], str]:
        """(records, digest) once `stage` is committed; WeightVersionConflict when its label
        named other weights on this scorer before. Off the device thread's lock."""
        records = {**self._records, **stage.records()}
        after = fingerprint.combine(records)
        version = stage.update.version
        before = self._label_digests.get(version, after)
        if before != after:
            raise WeightVersionConflict(
                f"version {clip(version)} named other weights on this server before (digest "
                f"{before[:12]}, these are {after[:12]}); a label names one set of weights "
                "for good: name new weights with a new version"
            )
        return records, after

    def _now_serving(self, version: str, records: dict[str, bytes], after: str) -> None:
        self.policy_version = version
        self._records, self.weights_digest = records, after
        self._label_digests[version] = after

    # ------------------------------------------------------------------ metadata
    def info(self) -> ModelInfo:
        """Model id, revision, shapes, layers and the statistics version (GetModelInfo)."""
        cfg = self._cfg
        archs = getattr(self.model.config, "architectures", None) or [type(self.model).__name__]
        return ModelInfo(
            model_id=self.model_id,
            revision=self.revision,
            architecture=str(archs[0]),
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            num_layers=self.num_layers,
            layers=tuple(self.layers),
            num_heads=self.num_heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or self.num_heads),
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            max_positions=self.max_positions,
            policy_version=self.policy_version,
            kernel_backend=self.backend,
            stat_version=contract.STAT_VERSION,  # read now: the contract is the one source
            loaded_param_count=self.loaded_param_count,
            total_param_count=self.total_param_count,
            weights_digest=self.weights_digest,
        )

    # ------------------------------------------------------------------ weights
    def load_weights(
        self,
        source: str | Path | Mapping[str, torch.Tensor],
        version: str,
        *,
        replaces: str = "",
    ) -> None:
        """Swap in new policy weights (a checkpoint directory, a .safetensors file or a
        state dict): staged beside the model and checked, then committed at once; later
        results carry `version`. Version rules as WeightUpdateSpec.check (a new, non-empty
        label; `replaces`, if given, must be served). Any failure changes nothing."""
        stage = self.stage_weights(WeightUpdateSpec(str(version), replaces))
        try:
            stage.load(source)
            self.commit_weights(stage)
        finally:
            stage.discard()

    def stage_weights(self, update: WeightUpdateSpec) -> WeightStaging:
        """An empty staging buffer for `update` (the version rules are checked now and again
        at commit). Fill it with begin/write, put/load or receive; then commit_weights()."""
        update.check(self.policy_version)
        return WeightStaging(self.model, update, skipped=self._skipped_tensors)

    def commit_weights(self, stage: WeightStaging) -> None:
        """Copy the staged tensors into the model and serve the new version, under the
        scoring lock (the server calls this on its device thread, between batches)."""
        stage.finish()
        records, after = self._digest_after(stage)  # before the lock: scoring goes on
        with self._lock:
            stage.update.check(self.policy_version)
            try:
                stage.commit_into()
            except PartialWeightsError as err:
                # Mixed old/new weights carry no honest version: refuse to score until a
                # reload succeeds, rather than answer under either label.
                self._weights_broken = str(err)
                raise
            self._weights_broken = None
            self._now_serving(stage.update.version, records, after)

    def join_weight_group(
        self,
        address: str,
        port: int,
        world_size: int,
        rank: int,
        backend: str = "",
        timeout_s: float = 0,
    ) -> Any:
        """Join the trainer's private broadcast group (anchorcredit.weight_group) as `rank`;
        blocks until every rank has joined. gloo groups receive on the CPU, nccl groups on
        this scorer's device."""
        from anchorcredit import weight_group

        name = weight_group.resolve_backend(backend, self.device)
        device = self.device if name == "nccl" else torch.device("cpu")
        store = weight_group.connect_store(address, port, world_size, timeout_s)
        return weight_group.open_group(store, rank, world_size, name, device, timeout_s)

    # ------------------------------------------------------------------ inputs
    def validate(self, pairs: Sequence[Any]) -> list[TokenPair]:
        """Check every (prompt_ids, response_ids) pair against the vocabulary and positions;
        InputError names the field and sequence index."""
        return validate_pairs(pairs, self.vocab_size, self.max_positions)

    def _check_validated(self, pairs: Sequence[Any]) -> None:
        """The seam's promise, not a second validation: what reaches the forward went
        through validate() (a TokenPair of this vocabulary) at the caller's edge."""
        for i, pair in enumerate(pairs):
            if not isinstance(pair, TokenPair) or pair.vocab_size != self.vocab_size:
                raise TypeError(
                    f"score_batch takes the TokenPairs that validate() returns "
                    f"(sequences[{i}] is {type(pair).__name__}); use score() for raw ids"
                )

    def check_heads(
        self, local_heads: Sequence[Head] | None, global_heads: Sequence[Head] | None
    ) -> None:
        """A fixed head set must name heads of the selected layers (both sets or neither)."""
        if (local_heads is None) != (global_heads is None):
            raise InputError("give both local_heads and global_heads, or neither", "heads")
        for name, heads in (("local_heads", local_heads), ("global_heads", global_heads)):
            if heads is None:
                continue
            if len(heads) == 0:
                raise InputError("a fixed head set needs at least one head", name)
            for layer, h in heads:
                if layer not in self.layers or not 0 <= h < self.num_heads:
                    raise InputError(
                        f"head {(layer, h)} is not among layers {self.layers} x "
                        f"{self.num_heads} heads",
                        name,
                    )

    # ------------------------------------------------------------------ scoring
    def score_batch(
        self,
        pairs: Sequence[TokenPair],
        params: CreditParams,
        *,
        with_entropy: bool = False,
        local_heads: Sequence[Head] | None = None,
        global_heads: Sequence[Head] | None = None,
    ) -> BatchScores:
        """ONE packed forward over `pairs` (TokenPairs from `validate`, which checked the
        ids once at the caller's edge) and the credit of each; no budget, no OOM split
        (a torch.OutOfMemoryError propagates to the caller, who splits)."""
        self._check_validated(pairs)
        self.check_heads(local_heads, global_heads)
        with_entropy = bool(with_entropy) or params.needs_entropy
        if with_entropy and self.lm_head is None:
            raise InputError(
                f"entropy needs the LM head and all {self.num_layers} layers, which were not "
                f"loaded (only layers 0-{self.layers_loaded - 1}); start the server with "
                "--entropy (ANCHORCREDIT_ENTROPY=1) or load with Scorer.from_pretrained(..., "
                "entropy=True)",
                "with_entropy",
            )
        if not pairs:
            return BatchScores([], {})
        with self._lock, torch.inference_mode():
            if self._weights_broken is not None:
                raise PartialWeightsError(
                    f"the last weight reload failed half way ({self._weights_broken}); "
                    "call load_weights again before scoring"
                )
            version = self.policy_version
            t0 = time.perf_counter()
            timer = StageTimer(self.device)
            horizon = Horizon(params.window, params.h_lo, params.h_hi)
            stats, entropy = self._forward_stats(pairs, horizon, timer, with_entropy)
            # Head classes, aggregation and gamma for the whole batch: one device-to-host
            # copy; timed on the host (it ends waiting for the device, and the stages'
            # device times are then read without a device-wide sync).
            with timer.stage("credit", host=True):
                results = credit_results(
                    pairs, stats, entropy, params, self.layers, version, local_heads, global_heads
                )
            seconds = {**timer.seconds(), "runner": time.perf_counter() - t0}
        return BatchScores(results, seconds)

    def _forward_stats(
        self,
        pairs: Sequence[TokenPair],
        horizon: Horizon,
        timer: StageTimer,
        with_entropy: bool,
    ) -> tuple[list[PackedStats], torch.Tensor | None]:
        """Per-layer statistics of the batch (all heads; PackedStats in `layers` order) and
        the entropies [n_resp]: the one packed forward (tensor_parallel.py overrides it to
        shard the forward and gather the heads)."""
        return packed_forward(
            self.decoder,
            self.lm_head,
            pairs,
            self.layers,
            horizon,
            self.backend,
            timer,
            with_entropy=with_entropy,
            final_logit_softcap=getattr(self._cfg, "final_logit_softcapping", None),
        )

    def score(
        self,
        pairs: Sequence[Any],
        strategy: str | None = None,
        *,
        with_entropy: bool = False,
        local_heads: Sequence[Head] | None = None,
        global_heads: Sequence[Head] | None = None,
        **params: Any,
    ) -> list[ScoreResult]:
        """WAAD, FAI, gamma (and entropy) per response token, one ScoreResult per pair, from
        one packed forward (pass budget-sized lists: anchorcredit.budget.greedy_chunks).

        params: SPEC.md's (anchorcredit.contract.CreditParams: q, gamma_amp, alpha, k,
        tau_waad, tau_delta, seed, window, h_lo, h_hi (None or "end": to the end of the
        response), head_quantile). local_heads/global_heads fix a calibrated head set instead
        of the per-sequence classes. strategy="entropy" implies with_entropy.
        """
        credit_params = CreditParams.build(strategy, **params)
        return self.score_batch(
            self.validate(pairs),  # the Python caller's edge: ids checked here, once
            credit_params,
            with_entropy=with_entropy,
            local_heads=local_heads,
            global_heads=global_heads,
        ).results

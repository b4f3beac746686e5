"""Scorer: (prompt, response) token IDs -> per-token WAAD, FAI, gamma (and entropy).

One forward per packed batch of the policy's decoder (capture.py runs attention and hands the
post-RoPE q/k of the selected layers to the span statistics), then per sequence
aggregate() (head classes) and credit() (gamma). See docs/RUNNER.md.

Early exit: the attention function raises StopForward right after capturing the last
selected layer's q/k. Compared with truncating the layer list this mutates nothing in the
model (no ModuleList surgery that a concurrent weight reload or a later full forward could
trip over), needs no per-architecture knowledge, and stops even earlier: the last selected
layer's own attention output and MLP are skipped too. The LM head never runs (we call the
decoder, not the CausalLM wrapper) unless entropy is asked for.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anchorcredit.engine import STRATEGIES, aggregate, credit, resolve_backend, span_stats_packed
from anchorcredit.engine.span.checks import check_horizon
from anchorcredit.engine.types import SpanStats
from anchorcredit.errors import InputError
from anchorcredit.runner.capture import (
    ATTN_IMPLEMENTATION,
    CaptureState,
    StopForward,
    capturing,
)
from anchorcredit.runner.entropy import response_entropy
from anchorcredit.runner.layers import select_layers
from anchorcredit.runner.packing import PackedBatch, pack_inputs, plan_batches
from anchorcredit.runner.timing import StageTimer
from anchorcredit.runner.weights import PartialWeightsError, load_weights_into

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

Pair = tuple[Any, Any]


@dataclass
class ScoreResult:
    """Per-token outputs for one (prompt, response); arrays have len(response_ids)."""

    waad: np.ndarray
    fai: np.ndarray
    gamma: np.ndarray
    entropy: np.ndarray | None
    local_heads: list[tuple[int, int]]
    global_heads: list[tuple[int, int]]
    policy_version: str


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' / 'bfloat16' / 'float16' (or short aliases, or a torch.dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16") from None


def _as_ids(x: Any, field: str, index: int, vocab: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise InputError(f"must be a 1-D list of token ids, got shape {arr.shape}", field, index)
    if arr.size == 0:
        raise InputError("must hold at least one token id", field, index)
    if arr.dtype.kind not in "iu":
        raise InputError(f"token ids must be integers, got dtype {arr.dtype}", field, index)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab))
    if bad.size:
        j = int(bad[0])
        raise InputError(
            f"token id {int(arr[j])} at position {j} is outside [0, {vocab})", field, index
        )
    return arr.astype(np.int64, copy=False)


class Scorer:
    """A policy model that scores (prompt_ids, response_ids) pairs. See from_pretrained()."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        layers: Sequence[int] | None = None,
        max_batch_tokens: int = 16384,
        policy_version: str = "0",
        backend: str = "auto",
        model_id: str | None = None,
        revision: str | None = None,
    ):
        if int(max_batch_tokens) != max_batch_tokens or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be a positive int, got {max_batch_tokens}")
        model.eval().requires_grad_(False)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        cfg = model.config.get_text_config()
        self._cfg = cfg
        self.num_layers = int(cfg.num_hidden_layers)
        self.layers = select_layers(self.num_layers, layers)
        self.max_batch_tokens = int(max_batch_tokens)
        self.policy_version = str(policy_version)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.backend = resolve_backend(backend, self.device, head_dim)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        mp = getattr(cfg, "max_position_embeddings", None)
        self.max_positions = int(mp) if mp else None
        self.model_id = model_id or str(getattr(model.config, "_name_or_path", "") or "")
        self.revision = revision or str(getattr(model.config, "_commit_hash", "") or "")
        self._lock = threading.Lock()  # score() and load_weights() never interleave
        # The last score() call: sequences, tokens, splits, seconds (wall) and per-stage
        # <stage>_seconds: forward (the decoder, statistics included), statistics (the span
        # kernel / chunked path), entropy (LM head, when asked) and credit (aggregate + gamma).
        self.last_run: dict[str, float] = {}
        self._weights_broken: str | None = None  # set by a reload that failed half way

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path_or_model: str | Path | torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        layers: Sequence[int] | None = None,
        max_batch_tokens: int = 16384,
        *,
        policy_version: str = "0",
        backend: str = "auto",
        model_id: str | None = None,
        revision: str | None = None,
    ) -> Scorer:
        """Load a decoder-only causal LM (local safetensors folder, offline) or wrap a model.

        path_or_model: a directory, an already built transformers model (the Scorer takes it
        over: eval mode, our attention implementation, moved to device/dtype), or None for the
        embedded default model (anchorcredit.offline.models).
        """
        torch_dtype = parse_dtype(dtype)
        device = torch.device(device)
        if path_or_model is None:
            try:
                from anchorcredit.offline.models import embedded_default_path
            except ImportError as e:
                raise RuntimeError(
                    "no model given and the embedded default model (anchorcredit.offline.models) "
                    "is not available; pass a model directory"
                ) from e
            path_or_model = embedded_default_path()
            model_id = model_id or _embedded_model_id()
        if isinstance(path_or_model, torch.nn.Module):
            model = path_or_model.to(device=device, dtype=torch_dtype)
        else:
            from transformers import AutoModelForCausalLM

            path = Path(path_or_model)
            if not path.is_dir():
                raise FileNotFoundError(f"model directory not found: {path}")
            model = AutoModelForCausalLM.from_pretrained(
                str(path),
                dtype=torch_dtype,
                attn_implementation=ATTN_IMPLEMENTATION,
                local_files_only=True,
            ).to(device)
            model_id = model_id or str(path_or_model)
        return cls(
            model,
            layers=layers,
            max_batch_tokens=max_batch_tokens,
            policy_version=policy_version,
            backend=backend,
            model_id=model_id,
            revision=revision,
        )

    # ------------------------------------------------------------------ metadata
    def info(self) -> dict[str, Any]:
        """Model id, revision, shapes, layers and limits (what the Info RPC echoes)."""
        cfg = self._cfg
        num_heads = int(cfg.num_attention_heads)
        kv = getattr(cfg, "num_key_value_heads", None) or num_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        archs = getattr(self.model.config, "architectures", None) or [type(self.model).__name__]
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "architecture": str(archs[0]),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "num_layers": self.num_layers,
            "layers": list(self.layers),
            "num_heads": num_heads,
            "num_kv_heads": int(kv),
            "head_dim": int(head_dim),
            "vocab_size": self.vocab_size,
            "max_positions": self.max_positions,
            "max_batch_tokens": self.max_batch_tokens,
            "policy_version": self.policy_version,
            "kernel_backend": self.backend,
        }

    # ------------------------------------------------------------------ weights
    def load_weights(
        self, path_or_state_dict: str | Path | dict[str, torch.Tensor], version: str
    ) -> None:
        """Swap in new policy weights (checked before any copy); later results carry `version`."""
        with self._lock:
            try:
                load_weights_into(self.model, path_or_state_dict)
            except PartialWeightsError as err:
                # Mixed old/new weights carry no honest version: refuse to score until a
                # reload succeeds, rather than answer under either label.
                self._weights_broken = str(err)
                raise
            self._weights_broken = None
            self.policy_version = str(version)

    # ------------------------------------------------------------------ inputs
    def validate(self, pairs: Sequence[Pair]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Check every pair; raise InputError naming the field and sequence index.

        Returns the pairs as int64 numpy arrays (score() reuses them).
        """
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise InputError("expected a list of (prompt_ids, response_ids) pairs", "sequences")
        out = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InputError("expected a (prompt_ids, response_ids) pair", f"sequences[{i}]", i)
            p = _as_ids(pair[0], f"sequences[{i}].prompt_ids", i, self.vocab_size)
            r = _as_ids(pair[1], f"sequences[{i}].response_ids", i, self.vocab_size)
            if self.max_positions is not None and len(p) + len(r) > self.max_positions:
                raise InputError(
                    f"prompt + response is {len(p) + len(r)} tokens, over the model's "
                    f"{self.max_positions} positions",
                    f"sequences[{i}].response_ids",
                    i,
                )
            out.append((p, r))
        return out

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        pairs: Sequence[Pair],
        strategy: str = "coupled_rhythm",
        *,
        q: float = 0.4,
        gamma_amp: float = 1.5,
        alpha: float = 0.5,
        k: int = 3,
        tau_waad: float | None = None,
        tau_delta: float | None = None,
        seed: int = 0,
        window: int = 10,
        h_lo: int = 10,
        h_hi: int | None = 100,
        head_quantile: float = 0.3,
        with_entropy: bool = False,
        local_heads: Sequence[tuple[int, int]] | None = None,
        global_heads: Sequence[tuple[int, int]] | None = None,
    ) -> list[ScoreResult]:
        """WAAD, FAI, gamma (and entropy) per response token, one ScoreResult per pair.

        Parameters are SPEC.md's (same names as engine.credit); h_hi=None runs FAI to the end
        of the response. local_heads/global_heads fix a calibrated head set instead of the
        per-sequence classes. strategy="entropy" implies with_entropy.
        """
        credit_params = dict(
            q=q,
            gamma_amp=gamma_amp,
            alpha=alpha,
            k=k,
            tau_waad=tau_waad,
            tau_delta=tau_delta,
            seed=seed,
        )
        self._check_params(
            strategy, credit_params, window, h_lo, h_hi, head_quantile, local_heads, global_heads
        )
        with_entropy = bool(with_entropy) or strategy == "entropy"
        if with_entropy and self.lm_head is None:
            raise InputError("this model has no LM head: entropy is unavailable", "with_entropy")
        arrays = self.validate(pairs)
        horizon = dict(window=int(window), h_lo=int(h_lo), h_hi=None if h_hi is None else int(h_hi))

        with self._lock, torch.inference_mode():
            if self._weights_broken is not None:
                raise PartialWeightsError(
                    f"the last weight reload failed half way ({self._weights_broken}); "
                    "call load_weights again before scoring"
                )
            version = self.policy_version
            t0 = time.perf_counter()
            timer = StageTimer(self.device)
            stats: list[list[SpanStats]] = [[] for _ in arrays]
            entropies: list[torch.Tensor | None] = [None] * len(arrays)
            todo = plan_batches(arrays, self.max_batch_tokens)
            splits = 0
            while todo:
                batch = todo.pop(0)
                try:
                    got = self._run_batch(arrays, batch, horizon, with_entropy, timer)
                except torch.OutOfMemoryError:
                    if len(batch.indices) == 1:
                        raise
                    got = None
                if got is None:  # retry outside the except block so its frames are freed
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    todo[:0] = batch.split()
                    splits += 1
                    continue
                for i, (s, e) in zip(batch.indices, got, strict=True):
                    stats[i], entropies[i] = s, e

            results = []
            with timer.stage("credit"):  # head classes, aggregation and gamma
                for i, (_, _r) in enumerate(arrays):
                    agg = aggregate(
                        stats[i],
                        head_quantile,
                        layer_ids=self.layers,
                        local_heads=local_heads,
                        global_heads=global_heads,
                    )
                    waad = agg.waad.float().cpu().numpy()
                    fai = agg.fai.float().cpu().numpy()
                    ent = None if entropies[i] is None else entropies[i].float().cpu().numpy()
                    seed = sequence_seed(credit_params["seed"], *arrays[i])
                    gamma = credit(
                        strategy, waad=waad, fai=fai, entropy=ent, **{**credit_params, "seed": seed}
                    )
                    results.append(
                        ScoreResult(
                            waad=waad,
                            fai=fai,
                            gamma=np.asarray(gamma, dtype=np.float32),
                            entropy=ent,
                            local_heads=[tuple(h) for h in agg.local_heads],
                            global_heads=[tuple(h) for h in agg.global_heads],
                            policy_version=version,
                        )
                    )
            self.last_run = {
                "sequences": len(arrays),
                "tokens": sum(len(p) + len(r) for p, r in arrays),
                "splits": splits,
                "seconds": time.perf_counter() - t0,
                **{f"{stage}_seconds": sec for stage, sec in timer.seconds().items()},
            }
        return results

    def _check_params(
        self,
        strategy: str,
        credit_params: dict[str, Any],
        window: int,
        h_lo: int,
        h_hi: int | None,
        head_quantile: float,
        local_heads: Sequence[tuple[int, int]] | None,
        global_heads: Sequence[tuple[int, int]] | None,
    ) -> None:
        """Bad request parameters fail before any compute, as InputError."""
        if strategy not in STRATEGIES:
            raise InputError(
                f"unknown strategy {strategy!r}; choose one of {STRATEGIES}", "strategy"
            )
        try:
            check_horizon(window, h_lo, h_hi)
        except ValueError as e:
            raise InputError(str(e), "params") from None
        if not 0.0 < head_quantile <= 1.0:
            raise InputError(
                f"head_quantile must be in (0, 1], got {head_quantile}", "head_quantile"
            )
        try:  # credit's own checks, on a dummy response
            dummy = np.array([0.0, 1.0])
            credit(strategy, waad=dummy, fai=dummy, entropy=dummy, **credit_params)
        except ValueError as e:
            raise InputError(str(e), "params") from None
        if (local_heads is None) != (global_heads is None):
            raise InputError("give both local_heads and global_heads, or neither", "heads")
        num_heads = int(self._cfg.num_attention_heads)
        for name, heads in (("local_heads", local_heads), ("global_heads", global_heads)):
            if heads is None:
                continue
            if len(heads) == 0:
                raise InputError("a fixed head set needs at least one head", name)
            for layer, h in heads:
                if layer not in self.layers or not 0 <= h < num_heads:
                    raise InputError(
                        f"head {(layer, h)} is not among layers {self.layers} x {num_heads} heads",
                        name,
                    )

    def _run_batch(
        self,
        arrays: list[tuple[np.ndarray, np.ndarray]],
        batch: PackedBatch,
        horizon: dict[str, Any],
        with_entropy: bool,
        timer: StageTimer,
    ) -> list[tuple[list[SpanStats], torch.Tensor | None]]:
        """One packed forward: span stats of every selected layer (and entropy) per sequence."""
        ids, pos = pack_inputs(arrays, batch, self.device)
        cu = batch.cu_seqlens
        win, h_lo, h_hi = horizon["window"], horizon["h_lo"], horizon["h_hi"]
        slot = {layer: j for j, layer in enumerate(self.layers)}
        per_seq: list[list[SpanStats | None]] = [[None] * len(self.layers) for _ in batch.indices]

        def sink(layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
            with timer.stage("statistics"):
                statistics(layer, q, k, scale)

        def statistics(layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
            got = span_stats_packed(
                q, k, cu, batch.prompt_lens, win, h_lo, h_hi, scale, self.backend
            )
            for i, s in enumerate(got):
                per_seq[i][slot[layer]] = s

        state = CaptureState(
            cu_seqlens=cu,
            layers=frozenset(self.layers),
            sink=sink,
            stop_after=None if with_entropy else self.layers[-1],
        )
        hidden = None
        with capturing(state), timer.stage("forward"):
            try:
                out = self.decoder(input_ids=ids, position_ids=pos, use_cache=False)
                hidden = out.last_hidden_state[0]
            except StopForward:
                pass
        missing = set(self.layers) - state.captured
        if missing:
            raise RuntimeError(
                f"layers {sorted(missing)} never called the attention interface: this model "
                "does not route attention through transformers' AttentionInterface"
            )
        ents: list[torch.Tensor | None] = [None] * len(batch.indices)
        if with_entropy:
            assert hidden is not None
            softcap = getattr(self._cfg, "final_logit_softcapping", None)
            with timer.stage("entropy"):
                ents = list(response_entropy(hidden, self.lm_head, cu, batch.prompt_lens, softcap))
        return [(list(s), e) for s, e in zip(per_seq, ents, strict=True)]  # type: ignore[arg-type]


def sequence_seed(seed: int, prompt: np.ndarray, response: np.ndarray) -> list[int]:
    """The random baseline's seed for one sequence: the request's seed and the sequence's ids.

    One shared seed would boost the same positions in every response of a batch; the batch
    index would make a cached result depend on its batch. The ids' crc32 does neither.
    """
    return [int(seed), zlib.crc32(np.asarray(prompt, "<u4").tobytes()),
            zlib.crc32(np.asarray(response, "<u4").tobytes())]  # fmt: skip


def _embedded_model_id() -> str | None:
    try:
        from anchorcredit.offline.models import EMBEDDED_MODEL_ID
    except ImportError:
        return None
    return str(EMBEDDED_MODEL_ID)

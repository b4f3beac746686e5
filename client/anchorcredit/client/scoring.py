"""The scoring part of CreditClient: cache read, the misses on the service, cache write.

Flow of one `score` call: validated parameters (anchorcredit.contract) and ids -> model info
-> one cache key per sequence -> batched cache read -> the misses only, split to the
server's limits (anchorcredit.budget) and spread round-robin over the targets (in parallel
when there are several chunks), every piece pinned to one policy version (a piece that
reaches a replica on other weights is re-sent to the replicas serving it: replicas.py) ->
cache write of what came back -> results in the caller's order.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np

from anchorcredit.budget import greedy_chunks
from anchorcredit.client import codec
from anchorcredit.client.cache import CreditCache
from anchorcredit.client.config import ClientConfig
from anchorcredit.client.counters import ClientCounters, cache_layer
from anchorcredit.client.errors import (
    CreditServiceError,
    StalePolicyVersionError,
    caller_index_error,
)
from anchorcredit.client.keys import KeyBuilder, ModelKey
from anchorcredit.client.replicas import ReplicaSet
from anchorcredit.client.results import (
    CreditResult,
    arrays_wanted,
    from_arrays,
    from_cache,
    wire_arrays,
)
from anchorcredit.client.retry_policy import RetryClock
from anchorcredit.client.transport import Transport
from anchorcredit.contract import DEFAULT_STRATEGY, UINT32_END, CreditParams
from anchorcredit.v1 import credit_pb2 as pb

log = logging.getLogger("anchorcredit.client")

Pairs = list[tuple[np.ndarray, np.ndarray]]
Done = list[tuple[list[int], pb.ScoreResponse]]


def token_ids(x: Any, what: str, i: int) -> np.ndarray:
    """The client's edge: a non-empty 1-D list of integer ids in uint32 range, as uint32."""
    a = np.asarray(x)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{what}[{i}] must be a non-empty 1-D list of token ids")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what}[{i}] must hold integer token ids, got dtype {a.dtype}")
    if a.min() < 0 or a.max() >= UINT32_END:
        raise ValueError(f"{what}[{i}] has ids outside [0, 2**32)")
    return a.astype(np.uint32, copy=False)


class ModelInfoCache:
    """The served model's info (GetModelInfo), kept until refreshed or invalidated; shared
    by the scoring and the weights parts (a weight change invalidates it)."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self._info: pb.ModelInfo | None = None
        self._lock = threading.Lock()

    def get(self, refresh: bool = False) -> pb.ModelInfo:
        with self._lock:
            if self._info is None or refresh:
                self._info = self.transport.call("GetModelInfo", pb.GetModelInfoRequest())
            return self._info

    def invalidate(self) -> None:
        with self._lock:
            self._info = None


class Scoring:
    """Cached, version-pinned scoring over a Transport (CreditClient.score's work)."""

    def __init__(
        self,
        config: ClientConfig,
        transport: Transport,
        replica_set: ReplicaSet,
        cache: CreditCache | None,
        model: ModelInfoCache,
        counters: ClientCounters,
    ):
        self.config = config
        self.transport = transport
        self.replica_set = replica_set
        self.cache = cache
        self.cache_layer = cache_layer(cache)
        self.model = model
        self.counters = counters
        self.last_stats: dict[str, float] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def score(
        self,
        prompts: Sequence[Any],
        responses: Sequence[Any],
        strategy: str = DEFAULT_STRATEGY,
        policy_version: str | None = None,
        *,
        with_entropy: bool = False,
        **credit_params: Any,
    ) -> list[CreditResult]:
        """CreditClient.score (its docstring says what each argument means)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        params = CreditParams.build(strategy, **credit_params)
        pairs = [
            (token_ids(p, "prompts", i), token_ids(r, "responses", i))
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]
        if not pairs:
            return []
        started = time.perf_counter()
        try:
            return self._score_pinned(pairs, params, policy_version, with_entropy)
        finally:
            self.counters.scored(time.perf_counter() - started)

    def _score_pinned(
        self,
        pairs: Pairs,
        params: CreditParams,
        policy_version: str | None,
        with_entropy: bool,
    ) -> list[CreditResult]:
        clock = RetryClock(self.transport.retry_budget_s)
        for attempt in itertools.count():
            # policy_version=None: re-read the served version on every call, so cache keys
            # never name a version the server has since replaced (another process may have
            # called UpdateWeights). One small GetModelInfo per score() call.
            info = self.model.get(refresh=policy_version is None)
            version = info.policy_version if policy_version is None else policy_version
            try:
                return self._score(
                    pairs, params, version, info, with_entropy, policy_version is not None
                )
            except StalePolicyVersionError:
                # Weights changed under us: what we know of the server is stale.
                self.model.invalidate()
                if policy_version is not None:
                    raise
                # While a weight change rolls out, targets serve two versions for a
                # moment: ask again (at once twice, then with the retry policy's backoff
                # within retry_budget_s).
                if attempt >= 2 and clock.left <= 0:
                    raise
                log.info("server policy version moved on from %r; asking again", version)
                if attempt >= 2:
                    clock.sleep(self.transport.policy.wait(attempt - 2))
        raise AssertionError("unreachable")

    def _score(
        self,
        pairs: Pairs,
        params: CreditParams,
        version: str,
        info: pb.ModelInfo,
        with_entropy: bool,
        pinned: bool,
    ) -> list[CreditResult]:
        """Cache read -> compute the misses -> cache write. pinned: the caller chose
        `version`."""
        results: list[CreditResult | None] = [None] * len(pairs)
        keys: list[str] = []
        if self.cache is not None:
            keys = self._keys(pairs, params, version, info, with_entropy)
            try:
                values = self.cache.get_many(keys)
            except Exception as exc:  # a custom cache failing is a miss, not a failed call
                log.warning("cache read failed (%s); computing everything", exc)
                values = [None] * len(keys)
            need = arrays_wanted(with_entropy)
            for i, v in enumerate(values):
                results[i] = from_cache(v, len(pairs[i][1]), need, self.config.cache_dtype, version)
        misses = [i for i, r in enumerate(results) if r is None]
        if self.cache is not None:
            self.counters.cache(self.cache_layer, len(pairs) - len(misses), len(misses))
        self.last_stats = {"hits": len(pairs) - len(misses), "misses": len(misses)}
        if misses:
            writes = self._compute(
                pairs, misses, results, params, version, info, with_entropy, pinned
            )
            if writes and self.cache is not None:
                try:
                    self.cache.set_many([(keys[i], value) for i, value in writes])
                except Exception as exc:
                    log.warning("cache write failed (%s); results are fine", exc)
        return results  # type: ignore[return-value]

    def _keys(
        self,
        pairs: Pairs,
        params: CreditParams,
        version: str,
        info: pb.ModelInfo,
        with_entropy: bool,
    ) -> list[str]:
        model = ModelKey(
            info.model_id,
            info.revision,
            info.dtype,
            tuple(info.layers),
            info.stat_version,
            info.weights_digest,
        )
        kb = KeyBuilder(
            model,
            version,
            params,
            ("entropy",) if with_entropy else (),
            self.config.namespace,
            value_dtype=self.config.cache_dtype,
        )
        return [kb.key(p, r) for p, r in pairs]

    def _chunks(self, pairs: Pairs, misses: list[int], info: pb.ModelInfo) -> list[list[int]]:
        """The misses cut into requests: within the server's request limit (it answers
        INVALID_ARGUMENT beyond it) and batch budget (it would score larger ones in pieces
        anyway), and at least one piece per target when there are several."""
        lengths = [len(pairs[i][0]) + len(pairs[i][1]) for i in misses]
        limits = [int(x) for x in (info.max_batch_tokens, info.max_request_tokens) if x > 0]
        max_tokens = min(limits) if limits else 0
        if len(self.transport.targets) > 1:
            share = -(-sum(lengths) // len(self.transport.targets))
            max_tokens = min(max_tokens, share) if max_tokens else share
        groups = greedy_chunks(lengths, max_tokens, int(info.max_request_sequences))
        return [[misses[j] for j in group] for group in groups]

    def _send(self, req: pb.ScoreRequest, chunk: list[int], version: str, wait_s: float) -> Any:
        """One request, answered from `version`'s weights: a replica on other weights (it
        refuses, or ignores the pin) sends the request on to the replicas serving it."""
        try:
            try:
                resp = self.transport.call("Score", req)
                if resp.policy_version in ("", version):
                    return resp
                # a server that ignored the pin: its numbers are never used
            except StalePolicyVersionError:
                self.counters.stale_refusal()  # a replica on other weights
            resp = self.replica_set.call_on_version("Score", req, version, wait_s)
            if resp.policy_version not in ("", version):
                raise StalePolicyVersionError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"asked for policy version {version!r}, got {resp.policy_version!r}",
                )
            return resp
        except StalePolicyVersionError:
            raise
        except CreditServiceError as err:
            raise caller_index_error(err, chunk) from None

    def _compute(
        self,
        pairs: Pairs,
        misses: list[int],
        results: list[CreditResult | None],
        params: CreditParams,
        version: str,
        info: pb.ModelInfo,
        with_entropy: bool,
        pinned: bool,
    ) -> list[tuple[int, bytes]]:
        """Score the misses on the service, filling `results`; returns the cache values to
        write, as (caller index, value)."""
        cparams = pb.CreditParams(**params.proto_fields())
        outputs = pb.Outputs(waad=True, fai=True, gamma=True, entropy=with_entropy)
        # pinned by the caller: wait for a lagging replica set to catch up; pinned by us
        # (policy_version=None): score() re-reads the version instead of waiting
        wait_s = self.config.replica_wait_s if pinned else 0.0

        def run(chunk: list[int]) -> tuple[list[int], pb.ScoreResponse]:
            req = pb.ScoreRequest(
                sequences=[
                    pb.Sequence(prompt_ids=pairs[i][0].tolist(), response_ids=pairs[i][1].tolist())
                    for i in chunk
                ],
                strategy=params.strategy,
                params=cparams,
                outputs=outputs,
                expected_policy_version=version,
                request_id=uuid.uuid4().hex,
            )
            return chunk, self._send(req, chunk, version, wait_s)

        chunks = self._chunks(pairs, misses, info)
        done = [run(chunks[0])] if len(chunks) == 1 else list(self._executor().map(run, chunks))
        return self._collect(done, pairs, results, version, info, with_entropy)

    def _collect(
        self,
        done: Done,
        pairs: Pairs,
        results: list[CreditResult | None],
        version: str,
        info: pb.ModelInfo,
        with_entropy: bool,
    ) -> list[tuple[int, bytes]]:
        """Fill `results` from the answers; the cache values to write, as (index, value)."""
        names = arrays_wanted(with_entropy)
        writes: list[tuple[int, bytes]] = []
        for chunk, resp in done:
            if len(resp.results) != len(chunk):
                raise CreditServiceError(
                    grpc.StatusCode.INTERNAL,
                    f"{len(resp.results)} results for {len(chunk)} sequences",
                )
            # Only cache what provably matches the key: same model, statistic definition,
            # version and weights (a replica given other weights under this label differs).
            cacheable = self.cache is not None and (
                resp.model_id in ("", info.model_id)
                and resp.stat_version in ("", info.stat_version)
                and resp.policy_version in ("", version)
                and resp.weights_digest == info.weights_digest
            )
            if not cacheable and self.cache is not None:
                self.model.invalidate()
            for i, r in zip(chunk, resp.results, strict=True):
                n = len(pairs[i][1])
                arrays = wire_arrays(r, n, names, i)
                results[i] = from_arrays(arrays, resp.policy_version or version)
                if cacheable:
                    writes.append((i, codec.encode(arrays, n, self.config.cache_dtype)))
        return writes

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=2 * len(self.transport.targets), thread_name_prefix="anchorcredit"
                )
            return self._pool

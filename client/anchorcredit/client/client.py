"""CreditClient: cached, load-spread, retrying access to one or more CreditService servers.

    from anchorcredit.client import CreditClient
    client = CreditClient(["127.0.0.1:50051"], cache="redis://127.0.0.1:6379/0")
    res = client.score(prompts, responses, strategy="coupled_rhythm")   # token-id lists
    res[0].gamma                                                          # float32 [len(r0)]

Flow of one `score` call: model info (cached per client) -> one cache key per sequence ->
batched cache read -> the misses only, split to the server's limits and spread round-robin
over the targets (in parallel when there are several chunks) -> cache write of what came back
-> results in the caller's order. Torch-free: numpy, grpcio, protobuf, redis, cachetools.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from anchorcredit.client import codec
from anchorcredit.client.cache import DEFAULT_TTL_S, CreditCache, make_cache
from anchorcredit.client.keys import DEFAULT_NAMESPACE, KeyBuilder, ModelKey, canonical_params
from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.v1 import credit_pb2_grpc as pb_grpc

log = logging.getLogger("anchorcredit.client")

STRATEGIES = ("uniform", "local_chunk", "global_anchor", "coupled_rhythm", "random", "entropy")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_MAX_ID = 2**32 - 1
_LE_F32 = np.dtype("<f4")
# Retry hints servers may send: trailing metadata, or "retry after ~N ms" in the details.
_HINT_KEYS = {"grpc-retry-pushback-ms": 1e-3, "retry-after-ms": 1e-3, "retry-after": 1.0}
_HINT_TEXT = re.compile(r"retry after ~?\s*([0-9.]+)\s*(ms|s)\b", re.IGNORECASE)
# Where the server's INVALID_ARGUMENT names a sequence: "sequences[3].response_ids / ...".
_SEQ_INDEX = re.compile(r"sequences\[(\d+)\]")


class CreditServiceError(RuntimeError):
    """A call the client could not complete; `code` is the gRPC status code.

    `index`: the caller's index of the sequence at fault (bad input), None when unknown.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        target: str | None = None,
        index: int | None = None,
    ):
        where = f" from {target}" if target else ""
        super().__init__(f"{code.name}{where}: {details}")
        self.code = code
        self.details = details
        self.target = target
        self.index = index


class StalePolicyVersionError(CreditServiceError):
    """FAILED_PRECONDITION: the server holds another policy version than the one asked for."""


@dataclass
class CreditResult:
    """Per-token credit of one (prompt, response): float32 arrays of len(response).

    Arrays are read-only views of the wire/cache bytes (zero-copy); `np.array(x)` for a copy.
    """

    waad: np.ndarray
    fai: np.ndarray
    gamma: np.ndarray
    policy_version: str
    entropy: np.ndarray | None = None
    cached: bool = False


_metrics: tuple[Any, Any] | None | bool = None


def _cache_counters() -> tuple[Any, Any] | None:
    """Prometheus counters if prometheus_client is importable (optional), created once."""
    global _metrics
    if _metrics is None:
        try:
            from prometheus_client import Counter

            _metrics = (
                Counter("anchorcredit_cache_hits_total", "Credit results served from the cache"),
                Counter("anchorcredit_cache_misses_total", "Credit results not in the cache"),
            )
        except Exception:  # not installed, or already registered by another import path
            _metrics = False
    return _metrics or None


def _ids(x: Any, what: str, i: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{what}[{i}] must be a non-empty 1-D list of token ids")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what}[{i}] must hold integer token ids, got dtype {a.dtype}")
    if a.min() < 0 or a.max() > _MAX_ID:
        raise ValueError(f"{what}[{i}] has ids outside [0, 2**32)")
    return a.astype(np.uint32, copy=False)


def _retry_hint(err: grpc.RpcError) -> float | None:
    """Seconds the server asked us to wait, if it said."""
    try:
        for key, value in err.trailing_metadata() or ():
            if key in _HINT_KEYS:
                return max(0.0, float(value) * _HINT_KEYS[key])
        m = _HINT_TEXT.search(err.details() or "")
    except Exception:  # a malformed hint is no hint
        return None
    if m:
        return float(m.group(1)) * (1e-3 if m.group(2).lower() == "ms" else 1.0)
    return None


def _chunks(idx: list[int], lengths: list[int], max_seqs: int, max_tokens: int) -> list[list[int]]:
    """Greedy in-order split; a single sequence over max_tokens travels alone."""
    out: list[list[int]] = []
    cur: list[int] = []
    tok = 0
    for i in idx:
        n = lengths[i]
        if cur and ((max_seqs and len(cur) >= max_seqs) or (max_tokens and tok + n > max_tokens)):
            out.append(cur)
            cur, tok = [], 0
        cur.append(i)
        tok += n
    if cur:
        out.append(cur)
    return out


def _caller_index_error(err: CreditServiceError, chunk: list[int]) -> CreditServiceError:
    """The server names the index within the request it got (cache hits removed, batches
    split); re-raise naming the caller's index instead, as `.index` and in the message."""
    m = _SEQ_INDEX.search(err.details) if err.code == grpc.StatusCode.INVALID_ARGUMENT else None
    if m is None or int(m.group(1)) >= len(chunk):
        return err
    sent = int(m.group(1))
    caller = chunk[sent]
    return CreditServiceError(
        err.code, f"sequence {caller} (sent as {sent}): {err.details}", err.target, caller
    )


class CreditClient:
    """Client of one or more CreditService targets ("host:port", "dns:///name:port").

    cache: None -> in-process LRU bounded in bytes; "redis://..." -> Redis; False -> none;
    or any object with get_many/set_many. timeout_s is each RPC's deadline; retries is how
    many more attempts UNAVAILABLE / RESOURCE_EXHAUSTED get (exponential backoff with full
    jitter, or the server's hint), each on the next target.
    """

    def __init__(
        self,
        targets: Sequence[str] | str,
        cache: Any = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        *,
        cache_ttl_s: int = DEFAULT_TTL_S,
        cache_dtype: str = "float32",
        namespace: str = DEFAULT_NAMESPACE,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 5.0,
        token: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ):
        if isinstance(targets, str):
            targets = [targets]
        if not targets:
            raise ValueError("give at least one target")
        if cache_dtype not in codec.DTYPES:
            raise ValueError(f"cache_dtype must be one of {tuple(codec.DTYPES)}")
        self.targets = list(targets)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.cache: CreditCache | None = make_cache(cache, ttl_s=cache_ttl_s)
        self.cache_dtype = cache_dtype
        self.namespace = namespace
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 0),
            # dns:/// targets with several addresses: spread over all of them
            ("grpc.lb_policy_name", "round_robin"),
            *channel_options,
        ]
        self._channels = [grpc.insecure_channel(t, options=options) for t in self.targets]
        self._stubs = [pb_grpc.CreditServiceStub(c) for c in self._channels]
        self._rr = itertools.count()
        self._down_until = [0.0] * len(self.targets)
        self._info: pb.ModelInfo | None = None
        self._info_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.last_stats: dict[str, float] = {}

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Close channels, the worker pool and the cache connection."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for c in self._channels:
            c.close()
        close = getattr(self.cache, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> CreditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- RPC plumbing ------------------------------------------------------------------
    def _pick(self, start: int, attempt: int) -> int:
        n = len(self.targets)
        now = time.monotonic()
        for j in range(n):  # the next target not recently found down, else the plain next
            ti = (start + attempt + j) % n
            if self._down_until[ti] <= now:
                return ti
        return (start + attempt) % n

    def _call(self, method: str, request: Any, start: int | None = None) -> Any:
        """Unary call with failover, retries and backoff; non-retryable codes raise at once."""
        if start is None:
            start = next(self._rr)
        tried: set[int] = set()
        last: grpc.RpcError | None = None
        last_target = ""
        for attempt in range(self.retries + 1):
            ti = self._pick(start, attempt)
            tried.add(ti)
            try:
                fn: Callable[..., Any] = getattr(self._stubs[ti], method)
                return fn(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as err:
                code = err.code()
                last, last_target = err, self.targets[ti]
                if code not in RETRYABLE:
                    cls = (
                        StalePolicyVersionError
                        if code == grpc.StatusCode.FAILED_PRECONDITION
                        else CreditServiceError
                    )
                    raise cls(code, err.details() or "", self.targets[ti]) from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._down_until[ti] = time.monotonic() + 1.0
                if attempt == self.retries:
                    break
                hint = _retry_hint(err)
                next_ti = self._pick(start, attempt + 1)
                if hint is not None:
                    delay = hint * (1.0 + 0.1 * random.random())  # jitter: no thundering herd
                elif code == grpc.StatusCode.UNAVAILABLE and next_ti not in tried:
                    delay = 0.0  # fail over to a target not tried yet right away
                else:
                    cap = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
                    delay = random.uniform(0.0, cap)  # full jitter
                log.info(
                    "%s on %s: %s; retry %d in %.3f s",
                    method,
                    self.targets[ti],
                    code.name,
                    attempt + 1,
                    delay,
                )
                time.sleep(delay)
        assert last is not None
        raise CreditServiceError(
            last.code(),
            f"{last.details()} (gave up after {self.retries + 1} attempts)",
            last_target,
        )

    # -- model info ----------------------------------------------------------------------
    def model_info(self, refresh: bool = False) -> pb.ModelInfo:
        """The served model's info (GetModelInfo), cached until refresh or a stale version."""
        with self._info_lock:
            if self._info is None or refresh:
                self._info = self._call("GetModelInfo", pb.GetModelInfoRequest())
            return self._info

    def invalidate_model_info(self) -> None:
        """Forget the cached model info (next call asks the server again)."""
        with self._info_lock:
            self._info = None

    def update_weights(self, path: str, version: str) -> list[pb.UpdateWeightsResponse]:
        """Load new policy weights on every target (each server holds its own copy).

        Each target is called exactly once, in order, with no failover to another target (a
        load on the wrong server would leave the dead one on old weights). Every target is
        tried; if any failed, one CreditServiceError names all failed targets (`.failed`:
        {target: error}) after the others have loaded.
        """
        req = pb.UpdateWeightsRequest(path=path, version=version)
        out: list[pb.UpdateWeightsResponse] = []
        failed: dict[str, CreditServiceError] = {}
        try:
            for ti, target in enumerate(self.targets):
                try:
                    out.append(self._call_one(ti, "UpdateWeights", req))
                except CreditServiceError as err:
                    failed[target] = err
        finally:
            self.invalidate_model_info()
        if failed:
            first = next(iter(failed.values()))
            detail = "; ".join(str(e) for e in failed.values())
            err = CreditServiceError(
                first.code,
                f"UpdateWeights failed on {len(failed)} of {len(self.targets)} targets "
                f"({', '.join(failed)}): {detail}",
            )
            err.failed = failed  # type: ignore[attr-defined]
            raise err
        return out

    def _call_one(self, ti: int, method: str, request: Any) -> Any:
        """One call on target ti only: no failover, no retries."""
        try:
            fn: Callable[..., Any] = getattr(self._stubs[ti], method)
            return fn(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                self._down_until[ti] = time.monotonic() + 1.0
            cls = (
                StalePolicyVersionError
                if code == grpc.StatusCode.FAILED_PRECONDITION
                else CreditServiceError
            )
            raise cls(code, err.details() or "", self.targets[ti]) from None

    # -- scoring -------------------------------------------------------------------------
    def score(
        self,
        prompts: Sequence[Any],
        responses: Sequence[Any],
        strategy: str = "coupled_rhythm",
        policy_version: str | None = None,
        *,
        with_entropy: bool = False,
        **credit_params: Any,
    ) -> list[CreditResult]:
        """Credit for each (prompt, response) pair, in order.

        prompts/responses: token-id sequences (lists, numpy or CPU tensors), no padding.
        policy_version: the version the results must come from; None = whatever the server
        holds (asked via GetModelInfo, so cached results are keyed on the version served).
        credit_params: SPEC.md parameters (q, gamma_amp, alpha, k, tau_waad, tau_delta, seed,
        window, h_lo, h_hi (int or "end"), head_quantile).
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        strategy = strategy or "coupled_rhythm"
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        params = canonical_params(credit_params)
        pairs = [
            (_ids(p, "prompts", i), _ids(r, "responses", i))
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]
        if not pairs:
            return []
        for attempt in range(3):
            # policy_version=None: re-read the served version on every call, so cache keys
            # never name a version the server has since replaced (another process may have
            # called UpdateWeights). One small GetModelInfo per score() call.
            info = self.model_info(refresh=policy_version is None)
            version = info.policy_version if policy_version is None else policy_version
            try:
                return self._score(pairs, strategy, params, version, info, with_entropy)
            except StalePolicyVersionError:
                # Weights changed under us: what we know of the server is stale.
                self.invalidate_model_info()
                if policy_version is not None or attempt == 2:
                    raise
                log.info("server policy version moved on from %r; asking again", version)
        raise AssertionError("unreachable")

    def _score(
        self,
        pairs: list[tuple[np.ndarray, np.ndarray]],
        strategy: str,
        params: dict[str, Any],
        version: str,
        info: pb.ModelInfo,
        with_entropy: bool,
    ) -> list[CreditResult]:
        need = ("waad", "fai", "gamma", "entropy") if with_entropy else ("waad", "fai", "gamma")
        results: list[CreditResult | None] = [None] * len(pairs)
        keys: list[str] = []
        if self.cache is not None:
            model = ModelKey(
                info.model_id, info.revision, info.dtype, tuple(info.layers), info.stat_version
            )
            kb = KeyBuilder(
                model,
                version,
                strategy,
                params,
                ("entropy",) if with_entropy else (),
                self.namespace,
                value_dtype=self.cache_dtype,
            )
            keys = [kb.key(p, r) for p, r in pairs]
            try:
                values = self.cache.get_many(keys)
            except Exception as exc:  # a custom cache failing is a miss, not a failed call
                log.warning("cache read failed (%s); computing everything", exc)
                values = [None] * len(keys)
            for i, v in enumerate(values):
                arrays = codec.decode(v, len(pairs[i][1]), need, self.cache_dtype)
                if arrays is not None:
                    results[i] = CreditResult(
                        arrays["waad"],
                        arrays["fai"],
                        arrays["gamma"],
                        version,
                        arrays.get("entropy"),
                        cached=True,
                    )
        misses = [i for i, r in enumerate(results) if r is None]
        counters = _cache_counters()
        if counters is not None and self.cache is not None:
            counters[0].inc(len(pairs) - len(misses))
            counters[1].inc(len(misses))
        self.last_stats = {"hits": len(pairs) - len(misses), "misses": len(misses)}
        if misses:
            self._compute(
                pairs, misses, results, strategy, params, version, info, with_entropy, keys
            )
        return results  # type: ignore[return-value]

    def _compute(
        self,
        pairs: list[tuple[np.ndarray, np.ndarray]],
        misses: list[int],
        results: list[CreditResult | None],
        strategy: str,
        params: dict[str, Any],
        version: str,
        info: pb.ModelInfo,
        with_entropy: bool,
        keys: list[str],
    ) -> None:
        lengths = [len(p) + len(r) for p, r in pairs]
        max_tokens = int(info.max_batch_tokens)
        if len(self.targets) > 1:
            # Several targets: cut the work into at least one piece per target.
            total = sum(lengths[i] for i in misses)
            share = -(-total // len(self.targets))
            max_tokens = min(max_tokens, share) if max_tokens else share
        chunks = _chunks(misses, lengths, int(info.max_request_sequences), max_tokens)
        cparams = pb.CreditParams(**params)
        outputs = pb.Outputs(waad=True, fai=True, gamma=True, entropy=with_entropy)

        def run(chunk: list[int]) -> tuple[list[int], pb.ScoreResponse]:
            req = pb.ScoreRequest(
                sequences=[
                    pb.Sequence(prompt_ids=pairs[i][0].tolist(), response_ids=pairs[i][1].tolist())
                    for i in chunk
                ],
                strategy=strategy,
                params=cparams,
                outputs=outputs,
                expected_policy_version=version,
                request_id=uuid.uuid4().hex,
            )
            try:
                return chunk, self._call("Score", req)
            except StalePolicyVersionError:
                raise
            except CreditServiceError as err:
                raise _caller_index_error(err, chunk) from None

        if len(chunks) == 1:
            done = [run(chunks[0])]
        else:
            done = list(self._executor().map(run, chunks))

        writes: list[tuple[str, bytes]] = []
        for chunk, resp in done:
            if len(resp.results) != len(chunk):
                raise CreditServiceError(
                    grpc.StatusCode.INTERNAL,
                    f"{len(resp.results)} results for {len(chunk)} sequences",
                )
            # Only cache what provably matches the key: same model and statistic definition.
            cacheable = self.cache is not None and (
                resp.model_id in ("", info.model_id)
                and resp.stat_version in ("", info.stat_version)
                and resp.policy_version in ("", version)
            )
            if not cacheable and self.cache is not None:
                self.invalidate_model_info()
            for i, r in zip(chunk, resp.results, strict=True):
                n = len(pairs[i][1])
                arrays = {}
                for name in ("waad", "fai", "gamma") + (("entropy",) if with_entropy else ()):
                    raw = getattr(r, name)
                    if len(raw) != 4 * n or r.response_len != n:
                        raise CreditServiceError(
                            grpc.StatusCode.INTERNAL,
                            f"sequence {i}: {name} has {len(raw)} bytes for {n} tokens",
                        )
                    arrays[name] = np.frombuffer(raw, dtype=_LE_F32)
                results[i] = CreditResult(
                    arrays["waad"],
                    arrays["fai"],
                    arrays["gamma"],
                    resp.policy_version or version,
                    arrays.get("entropy"),
                )
                if cacheable:
                    writes.append((keys[i], codec.encode(arrays, n, self.cache_dtype)))
        if writes:
            try:
                self.cache.set_many(writes)  # type: ignore[union-attr]
            except Exception as exc:
                log.warning("cache write failed (%s); results are fine", exc)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=2 * len(self.targets), thread_name_prefix="anchorcredit"
                )
            return self._pool

"""CreditClient: cached, load-spread, retrying access to one or more CreditService servers.

    from anchorcredit.client import CreditClient
    client = CreditClient(["127.0.0.1:50051"], cache="redis://127.0.0.1:6379/0")
    res = client.score(prompts, responses, strategy="coupled_rhythm")   # token-id lists
    res[0].gamma                                                          # float32 [len(r0)]

Flow of one `score` call: validated parameters (anchorcredit.contract) and ids -> model info
-> one cache key per sequence -> batched cache read -> the misses only, split to the
server's limits (anchorcredit.budget) and spread round-robin over the targets (in parallel
when there are several chunks), every piece pinned to one policy version (a piece that
reaches a replica on other weights is re-sent to the replicas serving it: replicas.py) ->
cache write of what came back -> results in the caller's order. The calls themselves are
transport.py's; errors errors.py's. Torch-free: numpy, grpcio, protobuf, redis, cachetools.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np

from anchorcredit.budget import greedy_chunks
from anchorcredit.client import codec, push
from anchorcredit.client.background_push import BackgroundPusher, PushRecord
from anchorcredit.client.cache import DEFAULT_TTL_S, CreditCache, make_cache
from anchorcredit.client.counters import count_cache
from anchorcredit.client.errors import (
    CreditServiceError,
    StalePolicyVersionError,
    caller_index_error,
)
from anchorcredit.client.keys import DEFAULT_NAMESPACE, KeyBuilder, ModelKey
from anchorcredit.client.replicas import Replica, ReplicaSet, disagreement
from anchorcredit.client.results import (
    CreditResult,
    arrays_wanted,
    from_arrays,
    from_cache,
    wire_arrays,
)
from anchorcredit.client.retry_policy import RetryClock
from anchorcredit.client.transport import Transport
from anchorcredit.client.weights import CHUNK_BYTES, WIRE_DTYPES, auto_wire_dtypes, prepare_weights
from anchorcredit.contract import DEFAULT_STRATEGY, UINT32_END, CreditParams
from anchorcredit.v1 import credit_pb2 as pb

log = logging.getLogger("anchorcredit.client")

Pairs = list[tuple[np.ndarray, np.ndarray]]
TRANSPORTS = ("grpc", "collective")


def _check_version(version: Any, replaces: Any) -> None:
    if not isinstance(version, str) or not version:
        raise ValueError(f"version must be a non-empty string, got {version!r}")
    if not isinstance(replaces, str):
        raise ValueError(f"replaces must be a string, got {replaces!r}")
    if replaces == version:
        raise ValueError(f"version {version!r} cannot replace itself")


def _ids(x: Any, what: str, i: int) -> np.ndarray:
    """The client's edge: a non-empty 1-D list of integer ids in uint32 range, as uint32."""
    a = np.asarray(x)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{what}[{i}] must be a non-empty 1-D list of token ids")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what}[{i}] must hold integer token ids, got dtype {a.dtype}")
    if a.min() < 0 or a.max() >= UINT32_END:
        raise ValueError(f"{what}[{i}] has ids outside [0, 2**32)")
    return a.astype(np.uint32, copy=False)


class CreditClient:
    """Client of one or more CreditService targets ("host:port", "dns:///name:port").

    cache: None -> in-process LRU bounded in bytes; "redis://..." -> Redis; False -> none;
    or any object with get_many/set_many. timeout_s is each RPC's deadline. Retries follow
    the one retry policy (retry_policy.py) on what the status table calls retryable: a busy
    server (RESOURCE_EXHAUSTED) until retry_budget_s has passed since the call began; no
    target answering (UNAVAILABLE: a restart, a rollout) until reconnect_budget_s has passed
    since none answered, each attempt on the next target; retries caps those attempts when
    set (0: no retries at all). Waits: the server's hint (its queue's drain time) plus
    exponential backoff with full jitter (backoff_base_s doubling up to backoff_max_s).

    Replicas: a score call is pinned to one policy version (policy_version, else the one
    GetModelInfo reports when the call starts); a piece that reaches a replica on other
    weights is re-sent to the addresses serving that version, waiting up to
    replica_wait_s for one when none does (then StalePolicyVersionError naming each
    address's version). `replicas()` reports every address and its version.

    Security: token is the scoring token (every call); admin_token goes only on the
    weight-changing calls (update_weights, push_weights, the weight group). tls=True uses
    TLS, trusting root_certificates (PEM bytes/text or a file; None: the system roots);
    certificate_chain + private_key add a client certificate (mutual TLS). A token sent in
    cleartext to a target off this machine logs a warning.
    """

    def __init__(
        self,
        targets: Sequence[str] | str,
        cache: Any = None,
        timeout_s: float = 60.0,
        retries: int | None = None,
        *,
        cache_ttl_s: int = DEFAULT_TTL_S,
        cache_dtype: str = "float32",
        namespace: str = DEFAULT_NAMESPACE,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 5.0,
        retry_budget_s: float = 120.0,
        reconnect_budget_s: float = 60.0,
        token: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        admin_token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | None = None,
        certificate_chain: bytes | str | None = None,
        private_key: bytes | str | None = None,
        replica_wait_s: float = 10.0,
    ):
        if isinstance(targets, str):
            targets = [targets]
        if cache_dtype not in codec.DTYPES:
            raise ValueError(f"cache_dtype must be one of {tuple(codec.DTYPES)}")
        self.transport = Transport(
            targets,
            timeout_s,
            retries,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            retry_budget_s=retry_budget_s,
            reconnect_budget_s=reconnect_budget_s,
            token=token,
            channel_options=channel_options,
            admin_token=admin_token,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
        )
        self.targets = self.transport.targets
        self.replica_set = ReplicaSet(self.transport)
        self.replica_wait_s = float(replica_wait_s)
        self.cache: CreditCache | None = make_cache(cache, ttl_s=cache_ttl_s)
        self.cache_dtype = cache_dtype
        self.namespace = namespace
        self._info: pb.ModelInfo | None = None
        self._info_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._weight_group: push.WeightGroupHandle | None = None
        self._group_lock = threading.RLock()
        self.last_stats: dict[str, float] = {}
        # pushes in a background thread (background_push.py); score() waits for them
        self.background_pusher = BackgroundPusher(self.push_weights)

    @property
    def timeout_s(self) -> float:
        """Each RPC's deadline in seconds."""
        return self.transport.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self.transport.timeout_s = float(value)

    @property
    def retries(self) -> int | None:
        """At most this many retries while no target answers (None: reconnect_budget_s
        alone bounds them; 0: no retries at all)."""
        return self.transport.retries

    @retries.setter
    def retries(self, value: int | None) -> None:
        self.transport.retries = None if value is None else int(value)

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Leave the weight group (if open); close channels, the worker pool and the cache
        connection."""
        self.background_pusher.close()
        with self._group_lock:
            try:
                self._close_group()
            except Exception as exc:  # closing must not fail
                log.warning("leaving the weight group: %s", exc)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.transport.close()
        close = getattr(self.cache, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> CreditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- model info and weights ----------------------------------------------------------
    def model_info(self, refresh: bool = False) -> pb.ModelInfo:
        """The served model's info (GetModelInfo), cached until refresh or a stale version.

        It comes from whichever replica answered: its policy_version is that replica's.
        `served_version()` checks that every replica agrees; `replicas()` lists them."""
        with self._info_lock:
            if self._info is None or refresh:
                self._info = self.transport.call("GetModelInfo", pb.GetModelInfoRequest())
            return self._info

    def replicas(self) -> list[Replica]:
        """Every concrete address behind every target (resolved now: a dns name's records,
        an `ipv4:a:p1,b:p2` list) with the policy version it serves (GetModelInfo on each,
        in parallel): [Replica(address, target, policy_version, error)]; a replica that did
        not answer, or a target that did not resolve, has policy_version None and `error`."""
        return self.replica_set.survey()

    def served_version(self) -> str:
        """The policy version every replica serves; a StalePolicyVersionError
        (FAILED_PRECONDITION) naming each address and its version (or its error) when they
        disagree or one does not answer."""
        replicas = self.replicas()
        differ = disagreement(replicas)
        if differ:
            err = StalePolicyVersionError(
                grpc.StatusCode.FAILED_PRECONDITION, f"replicas out of step: {differ}"
            )
            err.versions = {r.address: r.policy_version for r in replicas}  # type: ignore[attr-defined]
            raise err
        return str(replicas[0].policy_version)

    def invalidate_model_info(self) -> None:
        """Forget the cached model info (next call asks the server again)."""
        with self._info_lock:
            self._info = None

    def update_weights(
        self, path: str, version: str, *, replaces: str = ""
    ) -> dict[str, pb.UpdateWeightsResponse]:
        """Load the checkpoint at `path` (readable by every server) on every address behind
        every target, as policy `version`; {address: response}.

        Each address is called exactly once, in parallel, over its own channel, with no
        failover (a load on the wrong replica would leave the dead one on old weights).
        replaces: empty, or the version every server must serve now (else it refuses).
        If any address failed, one CreditServiceError names all of them (`.failed`:
        {address: error}) after the others have loaded; then every address must report the
        new version (GetModelInfo).
        """
        _check_version(version, replaces)
        try:
            return push.update_from_path(self.transport, path, version, replaces)
        finally:
            self.invalidate_model_info()

    def push_weights(
        self,
        weights: Mapping[str, Any] | Iterable[tuple[str, Any]],
        version: str,
        *,
        partial: bool = False,
        transport: str = "grpc",
        replaces: str = "",
        dtype: str | None = "auto",
        chunk_bytes: int = CHUNK_BYTES,
        timeout_s: float | None = None,
    ) -> dict[str, pb.UpdateWeightsResponse]:
        """Send new policy weights to every address behind every target, without a disk.

        weights: Mapping[str, tensor] or (name, tensor) pairs (torch tensors on any device,
        or numpy arrays), named as the served checkpoint's state_dict keys
        (`anchorcredit.client.weights.full_state_items(model)` gives them for a trained,
        possibly sharded or PEFT model). A one-shot iterable is read once.
        version: the new policy version (non-empty, not the one served); replaces: empty or
        the version that must be served now; partial: True leaves tensors not sent as they
        are. dtype: "auto" (default) sends what the server serves (its ModelInfo dtype, asked
        once per client): a bfloat16/float16 server gets its own dtype (half the bytes of
        float32, rounded as the server would round them), a float32 server gets float32,
        or a tensor's own 16-bit dtype (widened exactly on the server); None sends each
        tensor as it is; "float32" / "bfloat16" / "float16" casts every tensor.
        chunk_bytes: data per stream message (at most CHUNK_BYTES, the servers' limit).
        transport: "grpc" streams PushWeights to each address (tensors go through the
        CPU); "collective" broadcasts over the private group (`open_weight_group`, opened
        with its defaults on first use): gloo from the CPU, NCCL from this CUDA device.
        timeout_s: each address's deadline (default: the client's timeout_s).

        Bad input raises ValueError/TypeError before any RPC. Returns {address: response}
        once every address serves `version`; else one CreditServiceError names every
        address that failed (`.failed`), after the others finished.
        """
        _check_version(version, replaces)
        self.background_pusher.wait()  # one push at a time; an unreported failure first
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if not isinstance(chunk_bytes, int) or not 0 < chunk_bytes <= CHUNK_BYTES:
            # servers accept messages of CHUNK_BYTES of data (plus framing), no more
            raise ValueError(f"chunk_bytes must be in [1, {CHUNK_BYTES}], got {chunk_bytes!r}")
        if dtype is not None and dtype != "auto" and dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype must be None, 'auto' or one of {WIRE_DTYPES}, got {dtype!r}")
        # "auto": checked as floating point here, each wire dtype chosen below
        items = prepare_weights(weights, "float32" if dtype == "auto" else dtype)
        if dtype == "auto":
            items = auto_wire_dtypes(items, push.served_dtype(self.transport))
        update = pb.WeightUpdate(version=version, replaces=replaces, partial=partial)
        try:
            if transport == "grpc":
                timeout = self.timeout_s if timeout_s is None else float(timeout_s)
                return push.push_stream(self.transport, items, update, chunk_bytes, timeout)
            with self._group_lock:
                group = self._group_for_push()
                try:
                    return group.push(items, update)
                finally:
                    if group.closed:  # aborted: the next push opens a fresh group
                        self._weight_group = None
        finally:
            self.invalidate_model_info()

    def push_weights_background(
        self, weights: Any, version: str, *, step: int | None = None, **kwargs: Any
    ) -> PushRecord:
        """push_weights(weights, version, **kwargs) in a background thread; returns at once
        (after the previous background push ended). The next score() waits for it and
        raises BackgroundPushError naming `step` if it failed. `weights` must not change
        until it ends: `background_pusher.fence()` waits for that (background_push.py)."""
        return self.background_pusher.submit(weights, version, step=step, **kwargs)

    def open_weight_group(
        self,
        address: str = "127.0.0.1",
        port: int = 0,
        backend: str = "",
        timeout_s: float = 600.0,
    ) -> push.WeightGroupHandle:
        """Open the private broadcast group for `push_weights(transport="collective")`
        (needs torch): host its store on address:port (an address every server can reach;
        port 0 picks a free one), join as rank 0 while every address behind every target
        joins as rank 1..N (JoinWeightGroup, concurrently). backend "" = nccl when every
        server and this process have CUDA, else gloo. Replaces an open group; `close()`
        leaves it."""
        with self._group_lock:
            self._close_group()
            addresses = push.all_addresses(self.transport, "JoinWeightGroup")
            self._weight_group = push.WeightGroupHandle(
                self.transport, addresses, address, port, backend, timeout_s
            )
            return self._weight_group

    def _group_for_push(self) -> push.WeightGroupHandle:
        group = self._weight_group
        if group is not None and not group.closed:
            addresses, failed = self.transport.addresses()
            if not failed and addresses == group.addresses:
                return group
            log.info("the address set changed (%s); opening a new weight group", addresses)
            self._close_group()
            kw = group.open_args
        else:
            kw = {}
        addresses = push.all_addresses(self.transport, "JoinWeightGroup")
        self._weight_group = push.WeightGroupHandle(self.transport, addresses, **kw)
        return self._weight_group

    def _close_group(self) -> None:
        if self._weight_group is not None:
            group, self._weight_group = self._weight_group, None
            group.close()

    # -- scoring -------------------------------------------------------------------------
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
        """Credit for each (prompt, response) pair, in order.

        prompts/responses: token-id sequences (lists, numpy or CPU tensors), no padding.
        strategy: one of anchorcredit.contract.STRATEGIES.
        policy_version: the version the results must come from; None = the version the
        replica answering GetModelInfo serves now (so cached results are keyed on it). Every
        result of one call comes from that one version (`.policy_version`): a piece sent to a
        replica on other weights is re-sent to replicas that serve it; with a pinned version
        and none serving it, the call waits up to replica_wait_s, then raises
        StalePolicyVersionError naming every address and its version.
        credit_params: SPEC.md parameters (q, gamma_amp, alpha, k, tau_waad, tau_delta, seed,
        window, h_lo, h_hi (int, or None / "end" = to the end), head_quantile); None = the
        default. Validated by CreditParams.build (a ValueError naming the parameter, before
        any RPC); every effective value is sent and keyed.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        self.background_pusher.wait()  # never score from weights a push is replacing
        params = CreditParams.build(strategy, **credit_params)
        pairs = [
            (_ids(p, "prompts", i), _ids(r, "responses", i))
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]
        if not pairs:
            return []
        clock = RetryClock(self.transport.retry_budget_s)
        for attempt in itertools.count():
            # policy_version=None: re-read the served version on every call, so cache keys
            # never name a version the server has since replaced (another process may have
            # called UpdateWeights). One small GetModelInfo per score() call.
            info = self.model_info(refresh=policy_version is None)
            version = info.policy_version if policy_version is None else policy_version
            try:
                return self._score(
                    pairs, params, version, info, with_entropy, policy_version is not None
                )
            except StalePolicyVersionError:
                # Weights changed under us: what we know of the server is stale.
                self.invalidate_model_info()
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
                results[i] = from_cache(v, len(pairs[i][1]), need, self.cache_dtype, version)
        misses = [i for i, r in enumerate(results) if r is None]
        if self.cache is not None:
            count_cache(len(pairs) - len(misses), len(misses))
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
            self.namespace,
            value_dtype=self.cache_dtype,
        )
        return [kb.key(p, r) for p, r in pairs]

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
        lengths = [len(pairs[i][0]) + len(pairs[i][1]) for i in misses]
        # A request never exceeds the server's request limit (it answers INVALID_ARGUMENT
        # beyond it) nor its batch budget (the server scores larger ones in pieces anyway).
        limits = [int(x) for x in (info.max_batch_tokens, info.max_request_tokens) if x > 0]
        max_tokens = min(limits) if limits else 0
        if len(self.targets) > 1:
            # Several targets: cut the work into at least one piece per target.
            share = -(-sum(lengths) // len(self.targets))
            max_tokens = min(max_tokens, share) if max_tokens else share
        chunks = [
            [misses[j] for j in group]
            for group in greedy_chunks(lengths, max_tokens, int(info.max_request_sequences))
        ]
        cparams = pb.CreditParams(**params.proto_fields())
        outputs = pb.Outputs(waad=True, fai=True, gamma=True, entropy=with_entropy)
        # pinned by the caller: wait for a lagging replica set to catch up; pinned by us
        # (policy_version=None): score() re-reads the version instead of waiting
        wait_s = self.replica_wait_s if pinned else 0.0

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
            try:
                try:
                    resp = self.transport.call("Score", req)
                    if resp.policy_version in ("", version):
                        return chunk, resp
                    # a server that ignored the pin: its numbers are never used
                except StalePolicyVersionError:
                    pass  # a replica on other weights: send it where `version` is served
                resp = self.replica_set.call_on_version("Score", req, version, wait_s)
                if resp.policy_version not in ("", version):
                    raise StalePolicyVersionError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"asked for policy version {version!r}, got {resp.policy_version!r}",
                    )
                return chunk, resp
            except StalePolicyVersionError:
                raise
            except CreditServiceError as err:
                raise caller_index_error(err, chunk) from None

        if len(chunks) == 1:
            done = [run(chunks[0])]
        else:
            done = list(self._executor().map(run, chunks))

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
                self.invalidate_model_info()
            for i, r in zip(chunk, resp.results, strict=True):
                n = len(pairs[i][1])
                arrays = wire_arrays(r, n, names, i)
                results[i] = from_arrays(arrays, resp.policy_version or version)
                if cacheable:
                    writes.append((i, codec.encode(arrays, n, self.cache_dtype)))
        return writes

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=2 * len(self.targets), thread_name_prefix="anchorcredit"
                )
            return self._pool

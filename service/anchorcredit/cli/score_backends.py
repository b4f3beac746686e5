"""Where `anchorcredit score` computes: in-process (runner.Scorer) or on a server (client).

Both take one flush group of Items at a time (the CLI cuts them with budget.greedy_chunks)
and describe the model they score with (`settings()`: what every output record carries).
"""

from __future__ import annotations

from typing import Any

from anchorcredit.cli.score_input import Item
from anchorcredit.contract import STAT_VERSION, CreditParams


class RemoteInputError(ValueError):
    """The server refused a sequence (INVALID_ARGUMENT); `index` is its place in the group."""

    def __init__(self, message: str, index: int | None):
        super().__init__(message)
        self.index = index


class RemoteServiceError(RuntimeError):
    """The server could not be used (unavailable, deadline, ...): not the input's fault."""


def _model_settings(
    layers: Any, model: str, revision: str | None, policy_version: str, stat_version: str
) -> dict[str, Any]:
    return {
        "layers": [int(x) for x in layers],
        "model": model,
        "revision": revision or None,
        "policy_version": str(policy_version),
        "stat_version": str(stat_version),
    }


class LocalBackend:
    """Scores in-process with anchorcredit.runner.Scorer (one packed forward per group)."""

    def __init__(
        self,
        model: str | None,
        device: str,
        dtype: str,
        layers: list[int] | None,
        entropy: bool = True,
    ) -> None:
        import transformers

        from anchorcredit.runner import Scorer

        # transformers' "Loading weights" bar on every command is noise; our own tqdm stays.
        transformers.utils.logging.disable_progress_bar()
        # Without --entropy only the layers up to the last scored one are loaded, no LM head.
        self.scorer = Scorer.from_pretrained(
            model, device=device, dtype=dtype, layers=layers, entropy=entropy
        )

    def settings(self) -> dict[str, Any]:
        s = self.scorer
        return _model_settings(s.layers, s.model_id, s.revision, s.policy_version, STAT_VERSION)

    def score(self, items: list[Item], params: CreditParams, with_entropy: bool) -> list[Any]:
        pairs = [(it.prompt_ids, it.response_ids) for it in items]
        kw = params.credit_kwargs() | {n: getattr(params, n) for n in _STAT_FIELDS}
        return self.scorer.score(pairs, params.strategy, with_entropy=with_entropy, **kw)


_STAT_FIELDS = ("window", "h_lo", "h_hi", "head_quantile")


class RemoteBackend:
    """Scores on a running server through anchorcredit.client.CreditClient.

    Construction asks the server's GetModelInfo (RemoteServiceError when it cannot)."""

    def __init__(self, target: str) -> None:
        try:
            from anchorcredit.client import CreditClient
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError(f"--target needs the client package: {e}") from e
        self.client = CreditClient([target], cache=False)
        try:
            self.info = self.client.model_info(refresh=True)
        except Exception as e:  # CreditServiceError: unreachable, unauthenticated, ...
            raise RemoteServiceError(str(e)) from None

    @property
    def model_id(self) -> str:
        return str(self.info.model_id)

    def settings(self) -> dict[str, Any]:
        i = self.info
        return _model_settings(
            i.layers, i.model_id, i.revision, i.policy_version, i.stat_version or STAT_VERSION
        )

    def score(self, items: list[Item], params: CreditParams, with_entropy: bool) -> list[Any]:
        import grpc

        from anchorcredit.client import CreditServiceError

        kw = params.record()
        strategy = kw.pop("strategy")
        kw = {k: v for k, v in kw.items() if v is not None}
        try:
            return self.client.score(
                [it.prompt_ids for it in items],
                [it.response_ids for it in items],
                strategy=strategy,
                with_entropy=with_entropy,
                **kw,
            )
        except CreditServiceError as e:
            if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                # e.index is the index in `items` (the client maps the server's back)
                raise RemoteInputError(e.details, e.index) from None
            raise RemoteServiceError(str(e)) from None

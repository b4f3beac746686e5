"""The statistics version in every cache key comes from the contract, end to end:
contract.STAT_VERSION -> the runner's ModelInfo -> GetModelInfo -> the client's keys."""

from __future__ import annotations

from anchorcredit import contract
from anchorcredit.client import CreditClient


class KeyLog:
    """A cache (the client's get_many/set_many protocol) that records the keys it sees."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def get_many(self, keys):
        self.keys += keys
        return [None] * len(keys)

    def set_many(self, items):
        pass


def _keys_and_version(target: str) -> tuple[list[str], str]:
    log = KeyLog()
    with CreditClient([target], cache=log) as client:
        client.score([[1, 2, 3]], [[4, 5, 6, 7]])
        return log.keys, client.model_info().stat_version


def test_changing_the_contracts_stat_version_changes_every_key(
    llama_model, tmp_path, start_server, monkeypatch
):
    model = llama_model
    first = start_server(model)
    keys, served = _keys_and_version(first.target)
    assert served == contract.STAT_VERSION and len(keys) == 1
    first.stop()

    monkeypatch.setattr(contract, "STAT_VERSION", contract.STAT_VERSION + "-changed")
    second = start_server(model)  # same model and weights, another statistics definition
    new_keys, new_served = _keys_and_version(second.target)
    assert new_served == contract.STAT_VERSION
    assert new_keys[0] != keys[0]

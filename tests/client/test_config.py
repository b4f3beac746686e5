"""ClientConfig: one declaration of the client's settings, read by the transport, the client
and the adapters, from code or from ANCHORCREDIT_* variables."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from anchorcredit.client import CreditClient
from anchorcredit.client.config import ClientConfig
from anchorcredit.client.transport import Transport

DOCS = Path(__file__).parents[2] / "docs" / "CLIENT.md"


def test_every_setting_reads_its_variable_and_parses_it():
    env = {
        "ANCHORCREDIT_TARGETS": "a:1, b:2",
        "ANCHORCREDIT_CACHE": "redis://r:6379/0",
        "ANCHORCREDIT_TIMEOUT_S": "7.5",
        "ANCHORCREDIT_RETRIES": "3",
        "ANCHORCREDIT_CACHE_TTL_S": "600",
        "ANCHORCREDIT_CACHE_DTYPE": "float16",
        "ANCHORCREDIT_NAMESPACE": "ns",
        "ANCHORCREDIT_BACKOFF_BASE_S": "0.2",
        "ANCHORCREDIT_BACKOFF_MAX_S": "2",
        "ANCHORCREDIT_RETRY_BUDGET_S": "30",
        "ANCHORCREDIT_RECONNECT_BUDGET_S": "9",
        "ANCHORCREDIT_REPLICA_WAIT_S": "4",
        "ANCHORCREDIT_TOKEN": "t",
        "ANCHORCREDIT_ADMIN_TOKEN": "at",
        "ANCHORCREDIT_TLS": "1",
        "ANCHORCREDIT_ROOT_CERTIFICATES": "/ca.pem",
        "ANCHORCREDIT_CERTIFICATE_CHAIN": "/c.pem",
        "ANCHORCREDIT_PRIVATE_KEY": "/k.pem",
    }
    assert set(env) == set(ClientConfig.env_names().values())  # every variable is read
    cfg = ClientConfig.from_env(env)
    assert cfg.targets == ("a:1", "b:2") and cfg.cache == "redis://r:6379/0"
    assert (cfg.timeout_s, cfg.retries, cfg.cache_ttl_s) == (7.5, 3, 600)
    assert (cfg.cache_dtype, cfg.namespace) == ("float16", "ns")
    assert (cfg.backoff_base_s, cfg.backoff_max_s, cfg.retry_budget_s) == (0.2, 2.0, 30.0)
    assert (cfg.reconnect_budget_s, cfg.replica_wait_s) == (9.0, 4.0)
    assert (cfg.token, cfg.admin_token, cfg.tls) == ("t", "at", True)
    assert (cfg.root_certificates, cfg.certificate_chain, cfg.private_key) == (
        "/ca.pem",
        "/c.pem",
        "/k.pem",
    )


def test_unset_or_empty_variables_give_the_defaults_and_overrides_win():
    cfg = ClientConfig.from_env({"ANCHORCREDIT_TARGETS": "a:1", "ANCHORCREDIT_TOKEN": ""})
    assert cfg == ClientConfig("a:1")
    assert cfg.timeout_s == 60.0 and cfg.token is None and cfg.cache is None
    cfg = ClientConfig.from_env(
        {"ANCHORCREDIT_TARGETS": "a:1", "ANCHORCREDIT_TIMEOUT_S": "5"}, timeout_s=9
    )
    assert cfg.timeout_s == 9
    assert ClientConfig.from_env({}, targets=["x:1"]).targets == ("x:1",)


@pytest.mark.parametrize(
    ("text", "cache"),
    [("memory", None), ("off", False), ("none", False), ("redis://h/0", "redis://h/0")],
)
def test_cache_variable_names_the_layer(text, cache):
    cfg = ClientConfig.from_env({"ANCHORCREDIT_TARGETS": "a:1", "ANCHORCREDIT_CACHE": text})
    assert cfg.cache == cache


def test_bad_values_name_their_variable():
    with pytest.raises(ValueError, match="ANCHORCREDIT_TIMEOUT_S='soon'"):
        ClientConfig.from_env({"ANCHORCREDIT_TARGETS": "a:1", "ANCHORCREDIT_TIMEOUT_S": "soon"})
    with pytest.raises(ValueError, match="ANCHORCREDIT_TARGETS"):
        ClientConfig.from_env({})
    with pytest.raises(ValueError, match="cache_dtype"):
        ClientConfig("a:1", cache_dtype="int8")
    with pytest.raises(ValueError, match="timeout_s must be >= 0"):
        ClientConfig("a:1", timeout_s=-1)


def test_client_keywords_and_config_build_the_same_settings():
    by_keywords = CreditClient("127.0.0.1:1", False, 5.0, 2, token="t", replica_wait_s=3)
    by_config = CreditClient(
        config=ClientConfig(
            ["127.0.0.1:1"], cache=False, timeout_s=5.0, retries=2, token="t", replica_wait_s=3
        )
    )
    overridden = CreditClient(config=by_config.config, timeout_s=8.0)
    try:
        assert by_keywords.config == by_config.config
        assert by_keywords.transport.config is by_keywords.config  # one object, not a copy
        assert by_keywords.cache is None and by_keywords.timeout_s == 5.0
        assert by_keywords.transport.metadata == (("authorization", "Bearer t"),)
        assert overridden.timeout_s == 8.0 and overridden.config.token == "t"
        with pytest.raises(TypeError, match="unexpected keyword argument 'timeout'"):
            CreditClient("127.0.0.1:1", timeout=5)
        with pytest.raises(TypeError, match="not both"):
            CreditClient("127.0.0.1:1", config=by_config.config)
    finally:
        for c in (by_keywords, by_config, overridden):
            c.close()


def test_no_keyword_list_is_restated_outside_the_config():
    """The transport and the client take a ClientConfig (or its fields as **settings); none
    of them declares the settings again."""
    fields = {f.name for f in dataclasses.fields(ClientConfig)} - {"targets"}
    for fn in (CreditClient.__init__, Transport.__init__):
        declared = set(inspect.signature(fn).parameters) & fields
        assert not declared, f"{fn.__qualname__} restates {declared}"


def test_the_client_docs_list_every_variable():
    text = DOCS.read_text()
    for name in ClientConfig.env_names().values():
        assert f"`{name}`" in text, f"docs/CLIENT.md does not list {name}"

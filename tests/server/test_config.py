"""The serve configuration (server/config.py): every field is a flag and an env var, flags
beat env vars beat defaults, and a bad value names its flag or variable."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from anchorcredit.server import config as cfgmod


def test_flags_env_defaults_precedence():
    parser = argparse.ArgumentParser()
    cfgmod.add_arguments(parser)
    env = {
        "ANCHORCREDIT_PORT": "6000",
        "ANCHORCREDIT_MAX_WAIT_MS": "2.5",
        "ANCHORCREDIT_AUTH_TOKEN": "s3cret",
        "ANCHORCREDIT_MAX_BATCH_TOKENS": "4096",
    }
    args = parser.parse_args(["--port", "7000", "--model", "/m"])
    cfg = cfgmod.from_args(args, env)
    assert cfg.port == 7000  # flag beats env
    assert cfg.max_wait_ms == 2.5 and cfg.auth_token == "s3cret"  # env beats default
    assert cfg.metrics_port == 9400 and cfg.model == "/m"
    assert cfg.max_request_tokens == 8 * 4096  # derived from the budget
    assert cfg.max_receive_bytes > 5 * cfg.max_request_tokens


def test_every_field_has_flag_and_env_in_help():
    parser = argparse.ArgumentParser()
    cfgmod.add_arguments(parser)
    text = parser.format_help()
    for flag, env, _ in cfgmod.env_table():
        assert flag in text and env in text.replace("\n", " ").replace("  ", "")
    assert "s3cret" not in text


def test_bad_env_value_is_named():
    with pytest.raises(ValueError, match="ANCHORCREDIT_PORT"):
        cfgmod.ServeConfig.from_env({"ANCHORCREDIT_PORT": "x"})
    with pytest.raises(ValueError, match="tls"):
        cfgmod.ServeConfig(tls_cert="a.pem")


def test_a_bad_layers_setting_names_the_flag_and_the_scorable_layers(llama_model, tmp_path):
    from anchorcredit.runner.layers import LayerChoiceError
    from anchorcredit.server.app import CreditServer

    model = llama_model  # 6 layers
    cfg = cfgmod.ServeConfig(
        model=str(model), layers="99", host="127.0.0.1", port=0, metrics_port=-1,
        device="cpu", dtype="float32",
    )  # fmt: skip
    server = CreditServer(cfg)

    async def go():
        await server.start()
        try:
            await server.load()
        finally:
            await server.stop(0)

    with pytest.raises(LayerChoiceError, match=r"--layers / ANCHORCREDIT_LAYERS: layer 99 .*0-5"):
        asyncio.run(go())

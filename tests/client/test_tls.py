"""TLS: the client once could not talk to a TLS server (insecure channels only), so
the bearer token travelled in cleartext. Now CreditClient(tls=True, root_certificates=...)
and mutual TLS (certificate_chain + private_key) against a server with --tls-client-ca;
a token about to go in cleartext to a target off this machine logs a warning."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from anchorcredit.client import CreditClient, CreditServiceError
from anchorcredit.client.transport import channel_credentials, is_loopback_target

TOKEN, ADMIN = "score-t0ken", "admin-t0ken"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, make_pki: Any) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all CA-signed."""
    signed = {
        "server": "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "client": "extendedKeyUsage=clientAuth",
    }
    d = make_pki(tmp_path_factory.mktemp("pki"), signed, other_cas=["other"])
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


@pytest.fixture(scope="module")
def model_dir(llama_model: Path) -> Path:
    return llama_model


PROMPTS, RESPONSES = [[1, 2, 3]], [[4, 5, 6, 7]]


def test_tls_client_scores_and_pushes(start_server: Any, model_dir: Path, pki: dict, caplog: Any):
    s = start_server(
        model_dir,
        tls_cert=str(pki["server_pem"]),
        tls_key=str(pki["server_key"]),
        auth_token=TOKEN,
        admin_token=ADMIN,
        weights_dir=str(model_dir.parent),
    )
    try:
        with caplog.at_level(logging.WARNING, logger="anchorcredit.client"):
            client = CreditClient(
                s.target,
                cache=False,
                token=TOKEN,
                admin_token=ADMIN,
                tls=True,
                root_certificates=pki["ca_pem"].read_bytes(),
            )
        assert not [r for r in caplog.records if "cleartext" in r.getMessage()]
        with client:
            assert len(client.score(PROMPTS, RESPONSES)[0].waad) == 4
            out = client.update_weights(model_dir.name, "v1")  # per-address channels: TLS too
            assert {r.policy_version for r in out.values()} == {"v1"}
        # Plaintext cannot reach the TLS port; nor can a client trusting another CA.
        with CreditClient(s.target, cache=False, token=TOKEN, retries=0, timeout_s=5) as c:
            with pytest.raises(CreditServiceError):
                c.score(PROMPTS, RESPONSES)
        wrong_ca = str(pki["other_pem"])  # a path works too; this CA signed nothing here
        with CreditClient(
            s.target, cache=False, token=TOKEN, retries=0, timeout_s=5, tls=True,
            root_certificates=wrong_ca,
        ) as c:  # fmt: skip
            with pytest.raises(CreditServiceError):
                c.score(PROMPTS, RESPONSES)
    finally:
        s.stop()


def test_mutual_tls_requires_a_client_certificate(start_server: Any, model_dir: Path, pki: dict):
    s = start_server(
        model_dir,
        tls_cert=str(pki["server_pem"]),
        tls_key=str(pki["server_key"]),
        tls_client_ca=str(pki["ca_pem"]),
    )
    try:
        with CreditClient(
            s.target,
            cache=False,
            tls=True,
            root_certificates=str(pki["ca_pem"]),
            certificate_chain=str(pki["client_pem"]),
            private_key=str(pki["client_key"]),
        ) as c:
            assert len(c.score(PROMPTS, RESPONSES)[0].waad) == 4
        with CreditClient(
            s.target,
            cache=False,
            retries=0,
            timeout_s=5,
            tls=True,
            root_certificates=pki["ca_pem"].read_bytes(),
        ) as c:  # TLS without a client certificate: refused in the handshake
            with pytest.raises(CreditServiceError) as info:
                c.score(PROMPTS, RESPONSES)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


def test_cleartext_token_warning(caplog: Any):
    with caplog.at_level(logging.WARNING, logger="anchorcredit.client"):
        CreditClient("10.255.0.1:50051", cache=False, token="t").close()
    assert any("cleartext" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anchorcredit.client"):
        CreditClient("127.0.0.1:50051", cache=False, token="t").close()
        CreditClient("10.255.0.1:50051", cache=False).close()  # no token, nothing to leak
        CreditClient("10.255.0.1:50051", cache=False, token="t", tls=True).close()
    assert not any("cleartext" in r.getMessage() for r in caplog.records)
    assert is_loopback_target("localhost:1") and is_loopback_target("[::1]:1")
    assert not is_loopback_target("dns:///anchorcredit.ns.svc:50051")
    with pytest.raises(ValueError, match="tls=True"):
        channel_credentials(False, root_certificates=b"x")
    with pytest.raises(ValueError, match="go together"):
        channel_credentials(True, certificate_chain=b"x")

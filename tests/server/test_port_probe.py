"""The port check before gRPC binds: a port whose last server just stopped (its closed
connections in TIME_WAIT) is free for a restart; a live listener is reported."""

from __future__ import annotations

import socket

from anchorcredit.server.app import port_in_use


def test_a_port_left_in_time_wait_by_a_stopped_server_is_free():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's listener
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: TIME_WAIT on 127.0.0.1:port
        client.recv(1)
        client.close()
    assert port_in_use("127.0.0.1", port) is None


def test_a_live_listener_is_reported():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert isinstance(port_in_use("127.0.0.1", listener.getsockname()[1]), OSError)

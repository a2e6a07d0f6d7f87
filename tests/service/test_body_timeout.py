"""A client that stalls mid-body is answered 408 and dropped after BNN_BODY_TIMEOUT_S, against a
real uvicorn server over raw sockets (issue 10 §6)."""

import socket
from pathlib import Path

import httpx
import pytest

from tests.service.live import ServiceProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp: Path = tmp_path_factory.mktemp("body-timeout")
    (tmp / "repo").mkdir()
    service = ServiceProcess(
        tmp / "repo", tmp / "server.log", body_timeout_s=0.5, poll_interval_s=0, warmup="false"
    )
    try:
        service.wait_live()
        yield service
    finally:
        service.stop()


def stalled_request(server: ServiceProcess, path: str, declared: int, sent: bytes) -> socket.socket:
    """A connection whose request declares ``declared`` body bytes and sends only ``sent``."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket timeout: 30 s)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


@pytest.mark.parametrize(
    "path", ["/v2/models/anything/infer", "/v1/models/anything:predict", "/v2/repository/index"]
)
def test_a_stalled_body_is_answered_408_and_the_connection_closed(server, path):
    sock = stalled_request(server, path, declared=1000, sent=b'{"inputs": [')
    reply = read_until_closed(sock)  # returns only because the server closed the connection
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b"BNN_BODY_TIMEOUT_S" in reply


def test_many_stalled_connections_are_all_dropped_and_the_server_keeps_serving(server):
    socks = [stalled_request(server, "/v2/models/m/infer", 10_000, b"{") for _ in range(200)]
    replies = [read_until_closed(sock) for sock in socks]
    assert all(reply.startswith(b"HTTP/1.1 408 ") for reply in replies)
    assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'route="/v2/models/{name}/infer",status="408"' in metrics


def test_a_complete_body_is_not_timed(server):
    sock = stalled_request(server, "/v2/repository/index", declared=2, sent=b"{}")
    sock.settimeout(30)
    reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    sock.close()

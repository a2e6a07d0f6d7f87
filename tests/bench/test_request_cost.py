"""The per-request CPU driver: it counts only answered requests, and runs end to end."""

from __future__ import annotations

import asyncio

import pytest

from bench import request_cost


async def _answer(status: int, scope, receive, send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_a_request_not_answered_200_fails_the_measurement():
    async def failing(scope, receive, send):
        await _answer(500, scope, receive, send)

    with pytest.raises(RuntimeError, match="3 of 3 requests failed"):
        asyncio.run(request_cost.cpu_us_per_request(failing, b"{}", 3))


def test_cpu_per_request_of_an_app_that_answers():
    async def answering(scope, receive, send):
        assert scope["method"] == "POST" and scope["path"] == request_cost.PATH
        await _answer(200, scope, receive, send)

    assert asyncio.run(request_cost.cpu_us_per_request(answering, b"{}", 50)) >= 0


@pytest.mark.slow  # trains nothing, but exports the digits mlp with torch and compiles it
def test_measures_bnnserve_and_bare_end_to_end(capsys):
    pytest.importorskip("torch")
    assert request_cost.main(["--requests", "20", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("working tree: bnnserve ") and "bare/bnnserve" in out

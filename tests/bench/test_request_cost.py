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


@pytest.mark.slow  # two child processes, each compiling the digits mlp
def test_compare_interleaves_child_processes_one_round_at_a_time(tmp_path, capsys):
    pytest.importorskip("torch")
    repo = tmp_path / "repo"
    request_cost.build_repo(repo)
    trees = {"one": request_cost.ROOT, "two": request_cost.ROOT}
    request_cost.compare(trees, repo, requests=20, rounds=3)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["one", "two"]
    for line in lines:  # three rounds each, every one measured
        rounds = line.split("(rounds ")[1].split(")")[0].split(", ")
        assert len(rounds) == 3 and all(float(x) > 0 for x in rounds)


def test_a_child_that_dies_is_a_named_failure(tmp_path):
    with pytest.raises(RuntimeError, match="failed"):  # no model repository: it cannot start
        request_cost.Child(request_cost.ROOT, tmp_path / "missing", requests=5)

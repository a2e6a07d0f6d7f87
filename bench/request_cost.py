"""CPU time per request of the served digits mlp, without HTTP or a load generator.

The service benchmark's digits rows (``python -m bench service --sections digits``) are bound
by the server's one event-loop thread, so their ratio to the bare FastAPI endpoint follows the
CPU each spends per request; but their throughput swings by tens of percent on a shared machine.
This driver measures that CPU directly and steadily: it builds the app
(:func:`service.app.create_app`, the digits mlp of the service benchmark, CPU engine) and the
bare endpoint (:func:`bench.service.bare_app`), and calls each ASGI app in process, one V2 JSON
request after another, inside its lifespan. Per request it reports

    CPU µs = process CPU time (user + system) over ``--requests`` requests ÷ ``--requests``

for each of ``--rounds`` rounds, alternating bnnserve and bare, and the median. Everything the
server does per request is counted except uvicorn's HTTP parsing and writing (the same for
both), so ``bare ÷ bnnserve`` here bounds the benchmark's ratio from below.

``--compare REV`` (repeatable) measures the code of those git revisions too (``git archive``
into a temporary directory, this file copied in; nothing in the repository changes). Each code
state is one child process that keeps its app and answers one round at a time; the rounds are
interleaved (each state's bnnserve, then its bare, then the next state's), so that this VM's
drifts of tens of percent over minutes fall on every state alike. Each state reports the median
of its rounds and the median of its per-round ``bare ÷ bnnserve`` (the two measured back to
back, in one process):

    python -m bench request-cost [--requests 3000] [--rounds 5] [--compare 19e7fe6]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "digits-mlp"
PATH = f"/v2/models/{MODEL}/infer"
LOAD_TIMEOUT_S = 600.0  # compiling the engine can take minutes on a busy shared machine


def build_repo(repo: Path) -> None:
    """The service benchmark's digits mlp (default architecture, random weights), published."""
    import torch

    from model.artifact import encode_artifact
    from model.repository import publish
    from model.spec import InputSpec
    from training.architectures import build_model, default_config
    from training.export import to_artifact_parts

    torch.manual_seed(0)
    model = build_model(default_config("mlp", "digits"), (1, 8, 8), 10).eval()
    input_spec = InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0), integer_valued=True)
    labels = [str(i) for i in range(10)]
    spec, tensors = to_artifact_parts(model, name=MODEL, input_spec=input_spec, labels=labels)
    publish(repo, MODEL, {"model.safetensors": encode_artifact(spec, tensors)})


def request_scope(path: str, body: bytes) -> dict[str, Any]:
    """An ASGI HTTP scope of a keep-alive POST of a JSON ``body``, as uvicorn builds it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def cpu_us_per_request(app: Callable, body: bytes, requests: int) -> float:
    """Process CPU µs per request of ``requests`` sequential calls of ``app``; each must be
    answered 200."""
    template = request_scope(PATH, body)
    statuses: list[int] = []
    request_message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict[str, Any]:
        return request_message

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    started = time.process_time()
    for _ in range(requests):
        await app(dict(template), receive, send)
    elapsed = time.process_time() - started
    failed = [s for s in statuses if s != 200]
    if failed or len(statuses) != requests:
        raise RuntimeError(f"{len(failed)} of {requests} requests failed (statuses {failed[:3]})")
    return elapsed / requests * 1e6


@contextlib.asynccontextmanager
async def contenders(repo: Path, requests: int) -> AsyncIterator[dict[str, Callable]]:
    """The two contenders, "bnnserve" and "bare", served and warmed up: each a function of no
    arguments that measures one round of ``requests`` (:func:`cpu_us_per_request`)."""
    from bench.service import bare_app, infer_body
    from service.app import create_app
    from service.settings import Settings

    body = infer_body((64,), 16)
    settings = Settings(
        _env_file=None,
        model_repo=repo,
        grpc_port=0,
        device="cpu",
        poll_interval_s=0,
        load_timeout_s=LOAD_TIMEOUT_S,
    )
    app, bare = create_app(settings), bare_app()
    async with app.router.lifespan_context(app):
        await wait_until_ready(app.state.dataplane)
        for contender in (app, bare):  # warm-up: caches, the engine's first calls, the stacks
            await cpu_us_per_request(contender, body, min(requests, 500))
        yield {
            "bnnserve": lambda: cpu_us_per_request(app, body, requests),
            "bare": lambda: cpu_us_per_request(bare, body, requests),
        }


async def measure(repo: Path, requests: int, rounds: int) -> dict[str, list[float]]:
    """CPU µs per request, ``rounds`` alternating rounds each of bnnserve and bare."""
    results: dict[str, list[float]] = {"bnnserve": [], "bare": []}
    async with contenders(repo, requests) as rounds_of:
        for _ in range(rounds):
            for name, one_round in rounds_of.items():
                results[name].append(await one_round())
    return results


async def serve_rounds(repo: Path, requests: int) -> None:
    """Child mode: print "ready", then for each line read ("bnnserve" or "bare") measure one
    round of that contender and print its µs per request, until stdin closes."""
    async with contenders(repo, requests) as rounds_of:
        print("ready", flush=True)
        for line in sys.stdin:  # blocking the loop is fine: nothing else runs meanwhile
            print(json.dumps(await rounds_of[line.strip()]()), flush=True)


async def wait_until_ready(dataplane: Any) -> None:
    """Until the model serves; RuntimeError when it was refused (a load that timed out on a
    busy machine, say) or is still not ready after :data:`LOAD_TIMEOUT_S`."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while not dataplane.is_ready():
        if dataplane.registry.startup_complete or time.monotonic() > deadline:
            raise RuntimeError(f"{MODEL} did not load: {dataplane.repository_index()}")
        await asyncio.sleep(0.05)


def snapshot(revision: str, into: Path) -> Path:
    """The tree of ``revision`` under ``into`` (git archive), with this driver copied in."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    shutil.copy(Path(__file__), into / "bench" / "request_cost.py")
    return into


class Child:
    """A :func:`serve_rounds` process on the code under ``tree``."""

    def __init__(self, tree: Path, repo: Path, requests: int) -> None:
        command = [sys.executable, "-m", "bench.request_cost", "--repo", str(repo), "--child",
                   "--requests", str(requests)]  # fmt: skip
        self.tree = tree
        self.process = subprocess.Popen(
            command, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._expect("ready")

    def round(self, contender: str) -> float:
        """One round of ``contender``: CPU µs per request."""
        assert self.process.stdin is not None
        self.process.stdin.write(contender + "\n")
        self.process.stdin.flush()
        return float(self._expect(None))

    def _expect(self, line: str | None) -> str:
        assert self.process.stdout is not None
        got = self.process.stdout.readline().strip()
        if not got or (line is not None and got != line):
            self.process.kill()
            raise RuntimeError(f"measuring {self.tree} failed (exit {self.process.wait()})")
        return got

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def compare(trees: dict[str, Path], repo: Path, requests: int, rounds: int) -> None:
    """Interleaved rounds of every code state in ``trees`` (name → tree), then a line each."""
    children = {name: Child(tree, repo, requests) for name, tree in trees.items()}
    collected = {name: {"bnnserve": [], "bare": []} for name in trees}
    try:
        for _ in range(rounds):
            for name, child in children.items():
                for contender, values in collected[name].items():
                    values.append(child.round(contender))
    finally:
        for child in children.values():
            child.close()
    for name, results in collected.items():
        print(report(name, results))


def report(name: str, results: dict[str, list[float]]) -> str:
    ours, bare = statistics.median(results["bnnserve"]), statistics.median(results["bare"])
    rounds = ", ".join(f"{x:.0f}" for x in results["bnnserve"])
    pairs = zip(results["bare"], results["bnnserve"], strict=True)
    paired = statistics.median([bare_us / ours_us for bare_us, ours_us in pairs])
    return (
        f"{name}: bnnserve {ours:.0f} µs/request (rounds {rounds}), bare {bare:.0f} µs; "
        f"bare/bnnserve {paired:.0%} (median of the rounds' ratios)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench request-cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--requests", type=int, default=3000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per contender")
    parser.add_argument(
        "--compare", action="append", default=[], metavar="REV", help="a git revision to measure"
    )
    parser.add_argument("--repo", type=Path, help="(internal) an existing model repository")
    parser.add_argument("--child", action="store_true", help="(internal) measure on request")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.repo
        if repo is None:
            repo = Path(tmp) / "repo"
            build_repo(repo)
        if args.child:
            asyncio.run(serve_rounds(repo, args.requests))
        elif not args.compare:
            print(report("working tree", asyncio.run(measure(repo, args.requests, args.rounds))))
        else:
            trees = {"working tree": ROOT}
            for revision in args.compare:
                trees[revision] = snapshot(revision, Path(tmp) / "trees" / revision)
            compare(trees, repo, args.requests, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

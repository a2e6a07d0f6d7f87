"""Flood benchmark: does one client's large body starve the event loop?

``/v2/health/live`` is probed every 10 ms (one keep-alive connection, in this process) while
three flood clients (another process, one thread and connection each) loop 16 MB bodies at the
digits mlp's ``infer``:

* **binary**: 4,000,000 empty BYTES elements (a 4-byte zero length each) in the binary tensor
  extension; every model refuses BYTES, with 400.
* **json**: an FP32 tensor of 8 million zeros as JSON ``data``, shape ``[8000000]``; refused
  with 400 (wrong shape).

and, for reference, with no flood. Reported per server: probe latency p50 / p99 / max and the
flood requests answered. With ``--baseline PATH`` the same runs go against the code checked out
at PATH (e.g. a ``git worktree`` of the commit before the change) in the same session, servers
one after the other. The goal of issue 10 §6: every probe under 100 ms.

    python -m bench flood [--duration 8] [--baseline ../h10c-base] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.service import Server, machine

ROOT = Path(__file__).resolve().parents[1]
MODEL = "digits-mlp"
PATH = f"/v2/models/{MODEL}/infer"
BYTES_ELEMENTS = 4_000_000
JSON_ELEMENTS = 8_000_000
CLIENTS = 3


# --- bodies ----------------------------------------------------------------------------------------
def binary_bytes_body() -> tuple[bytes, dict[str, str]]:
    blob = bytes(4 * BYTES_ELEMENTS)  # 4M zero lengths: 4M empty BYTES elements
    tensor = {"name": "input", "shape": [BYTES_ELEMENTS], "datatype": "BYTES"}
    tensor["parameters"] = {"binary_data_size": len(blob)}
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


def json_body() -> tuple[bytes, dict[str, str]]:
    head = f'{{"inputs":[{{"name":"input","shape":[{JSON_ELEMENTS}],"datatype":"FP32","data":['
    return head.encode() + b",".join([b"0"] * JSON_ELEMENTS) + b"]}]}", {}


BODIES = {"binary": binary_bytes_body, "json": json_body}


# --- raw HTTP/1.1 over one keep-alive socket -------------------------------------------------------
class Connection:
    def __init__(self, port: int) -> None:
        self.port = port
        self._open()

    def _open(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=120)
        self.reader = self.sock.makefile("rb")

    def request(self, head: bytes, body: bytes = b"") -> int:
        """Send one request, read the whole response; its status."""
        self.sock.sendall(head)
        if body:
            self.sock.sendall(body)
        status = int(self.reader.readline().split()[1])
        length, close = 0, False
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and "close" in value.lower():
                close = True
        self.reader.read(length)
        if close:
            self.close()
            self._open()
        return status

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def request_head(method: str, path: str, length: int, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bench", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- the flood (its own process) -------------------------------------------------------------------
def flood_main(args: argparse.Namespace) -> None:
    body, headers = BODIES[args.kind]()
    head = request_head("POST", PATH, len(body), headers)
    stop_at = time.monotonic() + args.duration
    statuses: list[int] = []

    def client() -> None:
        connection = Connection(args.port)
        while time.monotonic() < stop_at:
            statuses.append(connection.request(head, body))
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}}))


def probe(port: int, duration_s: float, interval_s: float = 0.01) -> list[float]:
    """Latencies (ms) of ``GET /v2/health/live`` every ``interval_s`` for ``duration_s``."""
    connection = Connection(port)
    head = request_head("GET", "/v2/health/live", 0, {})
    latencies, stop_at = [], time.monotonic() + duration_s
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        assert connection.request(head) == 200
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(interval_s)
    connection.close()
    return latencies


def run_scenario(server: Server, kind: str | None, duration_s: float) -> dict[str, Any]:
    flood = None
    if kind is not None:
        flood = subprocess.Popen(
            [sys.executable, "-m", "bench.flood", "flood", "--port", str(server.port),
             "--kind", kind, "--clients", str(CLIENTS), "--duration", str(duration_s + 1)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)  # let the flood build its bodies and get going
    latencies = np.array(probe(server.port, duration_s))
    result: dict[str, Any] = {
        "probes": len(latencies),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "max_ms": float(latencies.max()),
    }
    if flood is not None:
        out, _ = flood.communicate(timeout=600)
        result["flood_statuses"] = json.loads(out.strip().splitlines()[-1])["statuses"]
    return result


# --- servers ---------------------------------------------------------------------------------------
def publish_digits_mlp(repo: Path) -> None:
    """The default digits mlp with random weights, published (training's export path)."""
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


def server_at(checkout: Path, repo: Path) -> Server:
    """``python -m service`` importing the packages of ``checkout`` first."""
    code = (
        f"import sys; sys.path.insert(0, {str(checkout)!r}); "
        "from service.__main__ import main; sys.exit(main([]))"
    )
    env = {"BNN_MODEL_REPO": str(repo), "BNN_POLL_INTERVAL_S": "0"}
    server = Server([sys.executable, "-c", code], env, "/v2/health/live")
    try:
        server._wait(f"/v2/models/{MODEL}/ready", timeout_s=600)  # compiled and warmed
    except BaseException:
        server.__exit__()
        raise
    return server


def run_benchmark(duration_s: float, checkouts: dict[str, Path]) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "duration_s": duration_s, "servers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        publish_digits_mlp(repo)
        for label, checkout in checkouts.items():
            print(f"-- {label}: {checkout}", flush=True)
            with server_at(checkout, repo) as server:
                scenarios = {}
                for kind in (None, "binary", "json"):
                    scenarios[kind or "idle"] = run_scenario(server, kind, duration_s)
                    print(f"   {kind or 'idle'}: {scenarios[kind or 'idle']}", flush=True)
            results["servers"][label] = scenarios
    results["load_average_at_end"] = machine()["load_average_at_start"]
    return results


def render_markdown(results: dict[str, Any]) -> str:
    rows = [
        "| server | flood | probes | p50 ms | p99 ms | max ms | flood answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, scenarios in results["servers"].items():
        for kind, r in scenarios.items():
            answers = ", ".join(f"{n}× {s}" for s, n in r.get("flood_statuses", {}).items())
            rows.append(
                f"| {label} | {kind} | {r['probes']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                f"{r['max_ms']:.1f} | {answers or '—'} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench flood", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command")
    flood = sub.add_parser("flood", help="(internal) the flood clients")
    flood.add_argument("--port", type=int, required=True)
    flood.add_argument("--kind", choices=sorted(BODIES), required=True)
    flood.add_argument("--clients", type=int, default=CLIENTS)
    flood.add_argument("--duration", type=float, required=True)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per scenario")
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.command == "flood":
        flood_main(args)
        return 0
    checkouts = {"this": ROOT}
    if args.baseline is not None:
        checkouts = {"baseline": args.baseline.resolve(), **checkouts}
    results = run_benchmark(args.duration, checkouts)
    print(render_markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

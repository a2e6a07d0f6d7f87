"""``python -m bench [engine|service|onnx|gpu|graph|flood|request-cost|contention|...] [options]``: run one benchmark, or every available one.

Each subcommand is a module of this package with a ``main(argv) -> int``; with no subcommand
all of them run in turn with their default options.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

BENCHMARKS = {
    "engine": "bench.engine",  # packed inference engine vs eager torch
    "cpu_builds": "bench.cpu_builds",  # the engine compiled for haswell / generic vs the host
    "service": "bench.service",  # HTTP serving
    "onnx": "bench.onnx_runtime",  # ONNX Runtime on the exported float graph vs the engine
    "gpu": "bench.gpu",  # the torch backend on a GPU: correctness and speed (a lent GPU's check)
    "graph": "bench.graph",  # v2 layer graphs: a Bi-Real-Net-18 at 224² vs eager, tie rates
    "flood": "bench.flood",  # health probes while clients flood the server with 16 MB bodies
    "request-cost": "bench.request_cost",  # CPU µs per served request, in process (steady)
    "training": "bench.training",  # training steps per second on CPU, per architecture and option
    "contention": "bench.contention",  # large calls under a busy neighbour: OpenMP/serial/measured
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    available = {n: m for n, m in BENCHMARKS.items() if importlib.util.find_spec(m) is not None}
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"available: {', '.join(available)}")
        return 0
    if argv:
        name, rest = argv[0], argv[1:]
        if name not in available:
            print(
                f"python -m bench: unknown benchmark {name!r}; expected one of: "
                f"{', '.join(available)}",
                file=sys.stderr,
            )
            return 2
        return importlib.import_module(available[name]).main(rest)
    status = 0
    for name, module in available.items():
        print(f"== bench {name} ==", flush=True)
        status = importlib.import_module(module).main([]) or status
    return status


if __name__ == "__main__":
    sys.exit(main())

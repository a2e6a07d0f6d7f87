"""``python -m service`` / ``bnn-serve``: validate the settings, then serve until SIGTERM.

A bad setting prints one line naming it and exits with status 2. On SIGTERM (or Ctrl-C) the
server stops accepting connections and reports not ready, lets in-flight requests finish (at
most ``BNN_GRACEFUL_SHUTDOWN_S``), drains the batchers and exits 0.

With ``BNN_WORKERS=N`` (N > 1, or ``auto``: see :mod:`service.workers`) N server processes
share the one port: the parent binds the socket and uvicorn's supervisor starts the workers,
each accepting from it. Every worker builds the app from the same settings, so each loads the
models and polls the repository itself and sees every new version; their metrics are shared
through files (:mod:`service.metrics`). SIGTERM to the parent is passed to every worker, each
drains as above, and the parent exits once all have. Each worker's engine gets
``usable cores // N`` threads, so the processes do not oversubscribe the cores.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess

from service.logs import configure_logging
from service.settings import Settings, describe_validation_error
from service.workers import divide_engine_threads, usable_cores, worker_count

if TYPE_CHECKING:
    from service.app import ServingApp

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# prometheus-client reads this when it is imported (in each worker): its values go to files.
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def serving_app() -> ServingApp:
    """uvicorn's app factory, called in each server process: the app for the environment's
    settings, flipping readiness to false the moment a stop signal arrives."""
    from service.app import create_app  # here: prometheus-client must see the multiproc dir

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings)
    drain_on_stop_signals(app)
    return app


def drain_on_stop_signals(app: ServingApp) -> None:
    """Chain a handler before uvicorn's own (installed by the time it loads the app): a stop
    signal marks the data plane draining, so readiness turns false at once."""
    for sig in STOP_SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def stop(signum: int, frame: FrameType | None, previous=previous) -> None:
            app.state.dataplane.draining = True
            previous(signum, frame)

        signal.signal(sig, stop)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the stop signal once it has shut down; a drained stop is a success.
    sys.exit(0)


def share_metrics(settings: Settings, workers: int) -> Path | None:
    """The metrics directory the workers share (made here when not configured, emptied of a
    previous run's files when it was); None for one process without one configured."""
    if settings.metrics_dir is None and workers == 1:
        return None
    directory = settings.metrics_dir or Path(tempfile.mkdtemp(prefix="bnnserve-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["BNN_METRICS_DIR"] = os.environ[PROMETHEUS_MULTIPROC_ENV] = str(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    if argv if argv is not None else sys.argv[1:]:
        print(
            "bnn-serve takes no arguments; configure it with BNN_* environment variables "
            "(see docs/api.md)",
            file=sys.stderr,
        )
        return 2
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"bnn-serve: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    cores = usable_cores()
    workers = worker_count(settings.workers, cores)
    # Before any worker imports the engine: numba and OpenMP size their pools from these.
    divide_engine_threads(workers, cores, os.environ)
    # The engine's OpenMP workers share the cores with the event loop. Spinning while idle (the
    # OpenMP default) steals the loop's time and, on a busy machine, stalls each parallel
    # region for a scheduler tick; sleeping workers keep small requests fast. Set before the
    # engine loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Likewise the engine's helper team (model.engine.team) spins only 50 µs after a task: long
    # enough to stay awake through the layers of one call, short enough to leave the event loop
    # its core between requests. BNN_SPIN_US in the environment wins.
    os.environ.setdefault("BNN_SPIN_US", "50")  # not imported: the engine loads lazily
    metrics_dir = share_metrics(settings, workers)
    made_metrics_dir = metrics_dir is not None and settings.metrics_dir is None
    logging.getLogger("service").info(
        "starting bnn-serve",
        extra={"settings": settings.model_dump(mode="json", exclude={"api_key"})}
        | {"api_key_set": settings.api_key is not None, "usable_cores": cores}
        | {"workers": workers, "engine_threads": os.environ["NUMBA_NUM_THREADS"]},
    )
    config = uvicorn.Config(
        "service.__main__:serving_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        lifespan="on",
    )
    try:
        return serve(config, workers)
    finally:
        if made_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def serve(config: uvicorn.Config, workers: int) -> int:
    """Run one server in this process, or ``workers`` under uvicorn's supervisor; 3 when a
    server failed to start."""
    if workers == 1:
        server = uvicorn.Server(config)
        signal.signal(signal.SIGTERM, _exit_cleanly)
        try:
            server.run()
        except SystemExit:
            if not server.started:
                raise
        return 0 if server.started else 3
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

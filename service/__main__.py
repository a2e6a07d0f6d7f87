"""``python -m service [--flags]`` / ``bnn-serve``: validate the settings, then serve until
SIGTERM.

Every setting is a flag (``--model-repository DIR --port N --models a,b ...``, see ``--help``);
a flag overrides its ``BNN_*`` variable, which overrides the default. A bad setting or an
unknown flag prints one line naming it and exits with status 2. On SIGTERM (or Ctrl-C) the
server stops accepting connections and reports not ready, lets in-flight requests finish (at
most ``BNN_GRACEFUL_SHUTDOWN_S``), drains the batchers and exits 0.

With ``BNN_WORKERS=N`` (N > 1, or ``auto``: see :mod:`service.workers`) N server processes
share the one port: the parent binds the socket and uvicorn's supervisor starts the workers,
each accepting from it. Every worker builds the app from the same settings (the parent hands
its resolved settings down as ``BNN_*`` variables), so each loads the models and polls the
repository itself and sees every new version; their metrics are shared through files
(:mod:`service.metrics`). SIGTERM to the parent is passed to every worker, each drains as
above, and the parent exits once all have. Each worker's engine gets ``usable cores // N``
threads, so the processes do not oversubscribe the cores.
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
from pydantic_settings import SettingsError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess

from model.cpus import usable_cores
from service.logs import configure_logging
from service.registry import Loader
from service.settings import (
    PROGRAM,
    Settings,
    as_environment,
    describe_validation_error,
    settings_from_command_line,
)
from service.tracing import Tracing, tracing_from_environment
from service.workers import die_with_parent, divide_engine_threads, worker_count

if TYPE_CHECKING:
    from service.app import ServingApp

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# prometheus-client reads this when it is imported (in each worker): its values go to files.
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def build_app(settings: Settings, tracing: Tracing, loader: Loader | None = None) -> ServingApp:
    """The app for ``settings``, flipping readiness to false the moment a stop signal arrives."""
    from service.app import create_app  # here: prometheus-client must see the multiproc dir

    app = create_app(settings, loader=loader, tracing=tracing)
    drain_on_stop_signals(app)
    return app


def serving_app() -> ServingApp:
    """uvicorn's app factory, called in each worker process: the settings the parent resolved
    (handed down as ``BNN_*`` variables) and the ``OTEL_*`` tracing it checked."""
    die_with_parent()  # a killed supervisor leaves no worker behind
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    return build_app(settings, tracing_from_environment())


def drain_on_stop_signals(app: ServingApp) -> None:
    """Chain a handler before uvicorn's own (installed by the time it loads the app, and
    re-installed by uvicorn.Server.run in one process): a stop signal marks the data plane
    draining, so readiness turns false at once."""
    for sig in STOP_SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def stop(signum: int, frame: FrameType | None, previous=previous) -> None:
            app.state.dataplane.draining = True
            previous(signum, frame)

        signal.signal(sig, stop)


class GracefulServer(uvicorn.Server):
    """uvicorn's server in this process, also flipping readiness to false the moment a stop
    signal arrives (uvicorn installs its own handlers when it runs)."""

    def __init__(self, config: uvicorn.Config, app: ServingApp) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._app.state.dataplane.draining = True
        super().handle_exit(sig, frame)


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


def main(argv: list[str] | None = None, *, loader: Loader | None = None) -> int:
    """Serve until SIGTERM, configured by flags, then ``BNN_*`` variables, then defaults;
    ``loader`` replaces :func:`model.load_model` in a single process (tests inject a slow one
    to exercise shutdown during a load)."""
    try:
        settings = settings_from_command_line(sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        print(f"{PROGRAM}: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # unknown flag, flag without its value
        print(f"{PROGRAM}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        tracing = tracing_from_environment()  # the OpenTelemetry standard's OTEL_* variables
    except ValueError as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
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
    metrics_dir = share_metrics(settings, workers)
    made_metrics_dir = metrics_dir is not None and settings.metrics_dir is None
    if made_metrics_dir:
        settings = settings.model_copy(update={"metrics_dir": metrics_dir})
    logging.getLogger("service").info(
        "starting bnn-serve",
        extra={"settings": settings.model_dump(mode="json", exclude={"api_key"})}
        | {"api_key_set": settings.api_key is not None, "tracing": tracing.enabled}
        | {"usable_cores": cores, "workers": workers},
    )
    options = dict(
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        limit_concurrency=settings.max_connections or None,
        lifespan="on",
    )
    try:
        if workers == 1:
            return serve_here(build_app(settings, tracing, loader), options)
        return serve_workers(settings, workers, options)
    finally:
        if made_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def serve_here(app: ServingApp, options: dict) -> int:
    """One server in this process; 3 when it failed to start."""
    server = GracefulServer(uvicorn.Config(app, **options), app)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run()
    except SystemExit:
        if not server.started:
            raise
    return 0 if server.started else 3


def serve_workers(settings: Settings, workers: int, options: dict) -> int:
    """``workers`` servers under uvicorn's supervisor, each building its app from the settings
    this process resolved; 3 when one failed to start."""
    for name, value in as_environment(settings).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    config = uvicorn.Config(
        "service.__main__:serving_app", factory=True, workers=workers, **options
    )
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

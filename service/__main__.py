"""``python -m service [--flags]`` / ``bnn-serve``: validate the settings, then serve until
SIGTERM.

Every setting is a flag (``--model-repository DIR --port N --models a,b ...``, see ``--help``);
a flag overrides its ``BNN_*`` variable, which overrides the default. A bad setting or an
unknown flag prints one line naming it and exits with status 2. On SIGTERM (or Ctrl-C) the
server stops accepting connections and reports not ready, lets in-flight requests finish (at
most ``BNN_GRACEFUL_SHUTDOWN_S``), drains the batchers and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.app import create_app
from service.logs import configure_logging
from service.registry import Loader
from service.settings import PROGRAM, describe_validation_error, settings_from_command_line
from service.tracing import tracing_from_environment


class GracefulServer(uvicorn.Server):
    """uvicorn's server, also flipping readiness to false the moment a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, on_stop) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_stop()
        super().handle_exit(sig, frame)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the stop signal once it has shut down; a drained stop is a success.
    sys.exit(0)


def main(argv: list[str] | None = None, *, loader: Loader | None = None) -> int:
    """Serve until SIGTERM, configured by flags, then ``BNN_*`` variables, then defaults;
    ``loader`` replaces :func:`model.load_model` (tests inject a slow one to exercise shutdown
    during a load)."""
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
    # The engine's OpenMP workers share the cores with the event loop. Spinning while idle (the
    # OpenMP default) steals the loop's time and, on a busy machine, stalls each parallel
    # region for a scheduler tick; sleeping workers keep small requests fast. Set before the
    # engine loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Likewise the engine's helper team (model.engine.team) spins only 50 µs after a task: long
    # enough to stay awake through the layers of one call, short enough to leave the event loop
    # its core between requests. BNN_SPIN_US in the environment wins.
    os.environ.setdefault("BNN_SPIN_US", "50")  # not imported: the engine loads lazily
    logging.getLogger("service").info(
        "starting bnn-serve",
        extra={"settings": settings.model_dump(mode="json", exclude={"api_key"})}
        | {"api_key_set": settings.api_key is not None, "tracing": tracing.enabled},
    )
    app = create_app(settings, loader=loader, tracing=tracing)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        limit_concurrency=settings.max_connections or None,
        lifespan="on",
    )
    server = GracefulServer(config, on_stop=lambda: setattr(app.state.dataplane, "draining", True))
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run()
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())

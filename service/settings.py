"""Typed service configuration from ``BNN_*`` environment variables and an optional ``.env``.

Every value is validated when :class:`Settings` is built; :func:`describe_validation_error`
turns pydantic's report into the one-line message that ``python -m service`` prints before it
exits with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.errors import InvalidModelNameError
from model.repository import validate_model_name

ENV_PREFIX = "BNN_"


class Settings(BaseSettings):
    """Everything the service can be told; each field is ``BNN_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # --- what to serve ---------------------------------------------------------------------
    model_repo: Path = Field(Path("models"), description="Model repository: REPO/<name>/<version>/")
    models: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Comma-separated models to load at start; empty = every model in the repo"
    )
    device: str = Field(
        "auto", description="auto | cpu | cuda | cuda:N (auto picks a GPU when one is present)"
    )
    poll_interval_s: float = Field(
        5.0, ge=0, description="Seconds between repository scans for new versions; 0 = off"
    )
    warmup: bool = Field(True, description="Run a warm-up batch before a version serves")

    # --- HTTP server -----------------------------------------------------------------------
    host: str = Field("0.0.0.0", min_length=1, description="Address to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    graceful_shutdown_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long in-flight requests may take to finish"
    )
    workers: int | Literal["auto"] = Field(
        1,
        description="Server processes on the one port, each loading the models itself; "
        "auto = the usable cores (affinity and cgroup CPU quota)",
    )

    # --- dynamic batching ------------------------------------------------------------------
    max_batch_size: int = Field(64, ge=1, le=65536, description="Rows per engine call, at most")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, le=10_000, description="How long an idle engine waits for more rows"
    )
    max_queue_size: int = Field(
        256, ge=1, description="Requests waiting per model; beyond it 503 with Retry-After"
    )
    request_timeout_s: float = Field(30.0, gt=0, description="Per-request deadline (504)")
    inline_compute_ms: float = Field(
        1.0,
        ge=0,
        description="Engine calls that recently took less than this run on the event loop "
        "instead of a worker thread (the hop costs more than a small model); 0 = never",
    )

    # --- limits and security ---------------------------------------------------------------
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Request body limit (413)")
    max_request_batch: int = Field(1024, ge=1, description="Instances per request, at most (400)")
    api_key: SecretStr | None = Field(
        None, description="When set, 'Authorization: Bearer <key>' is required except on health"
    )

    # --- observability ---------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = Field(True, description="One JSON object per log line")
    access_log: bool = Field(
        False, description="Log a line per successful request too (errors are always logged)"
    )
    metrics_dir: Path | None = Field(
        None,
        description="Directory where the server processes share their metrics; set, /metrics "
        "reports the totals of all. Default: a fresh temporary one when BNN_WORKERS > 1",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _check_model_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            try:
                validate_model_name(name)
            except InvalidModelNameError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda"):
            return value
        index = value.removeprefix("cuda:")
        if value.startswith("cuda:") and index.isdigit():
            return value
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            if value != "auto" and not value.isdigit():
                raise ValueError(f"expected a positive number of processes or auto, got {value!r}")
            value = value if value == "auto" else int(value)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"expected a positive number of processes or auto, got {value}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad setting as its environment variable, e.g.
    ``invalid setting BNN_PORT='x': Input should be a valid integer``."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        value = error.get("input")
        shown = f"={value!r}" if isinstance(value, str | int | float) else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{ENV_PREFIX}{field.upper()}{shown}: {message}")
    return "invalid setting " + "; ".join(problems)

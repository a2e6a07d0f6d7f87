"""Typed service configuration from command-line flags, ``BNN_*`` environment variables and an
optional ``.env``, in that order of precedence (then the defaults).

Every value is validated when :class:`Settings` is built; :func:`describe_validation_error`
turns pydantic's report into the one-line message that ``python -m service`` prints before it
exits with status 2. :func:`settings_from_command_line` derives one flag per field
(``model_repo`` → ``--model-repo``) with pydantic-settings' CLI source, so flags never drift
from the fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, CliSettingsSource, NoDecode, SettingsConfigDict

from model.engine.options import EngineOptions
from model.errors import InvalidModelNameError
from model.repository import validate_model_name

ENV_PREFIX = "BNN_"
PROGRAM = "bnn-serve"
# Extra flag names, as tritonserver spells them: field (as a kebab-case flag) → aliases.
FLAG_ALIASES = {"model-repo": "model-repository", "port": "http-port"}


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
        "auto",
        description="auto | cpu | cuda | cuda:N (auto: the GPU only when one is present and "
        "the model measured faster there at the served batch sizes)",
    )
    poll_interval_s: float = Field(
        5.0, ge=0, description="Seconds between repository scans for new versions; 0 = off"
    )
    warmup: bool = Field(True, description="Run a warm-up batch before a version serves")
    load_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Seconds a version may take to verify, compile and warm up; a slower one "
        "is refused ('load timed out') and its worker thread abandoned",
    )

    # --- HTTP and gRPC servers--------------------------------------------------------------
    host: str = Field("0.0.0.0", min_length=1, description="Address to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    max_connections: int = Field(
        0,
        ge=0,
        description="Open connections and requests in progress beyond which new requests get "
        "503 at once (uvicorn's limit_concurrency); 0 = no limit",
    )
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="gRPC port (V2 GRPCInferenceService); 0 = no gRPC"
    )
    graceful_shutdown_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long in-flight requests may take to finish"
    )
    workers: int | Literal["auto"] = Field(
        1,
        description="Server processes on the one port, each loading the models itself; "
        "auto = the usable cores (affinity and cgroup CPU quota)",
    )

    engine_threads: int | None = Field(
        None,
        ge=1,
        description="Threads one engine call may use in each server process; default: the "
        "usable cores shared out among the workers",
    )
    kernel_cache_dir: Path | None = Field(
        None,
        description="Writable directory where compiled CPU kernels are cached (the image: "
        "/var/cache/bnnserve/kernels); default: numba's",
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
    body_timeout_s: float = Field(
        15.0, gt=0, description="A request body must arrive within this many seconds (408)"
    )
    decode_offload_bytes: int = Field(
        1 << 20,
        ge=0,
        description="Request JSON longer than this is decoded in a worker process, off the "
        "event loop",
    )
    max_model_memory_bytes: int = Field(
        4 * 1024**3,
        ge=1,
        description="A version whose weights plus activations at the largest engine call "
        "(max of max_batch_size and max_request_batch rows) may need more is refused at load",
    )
    api_key: SecretStr | None = Field(
        None, description="When set, 'Authorization: Bearer <key>' is required except on health"
    )
    api_key_file: Path | None = Field(
        None, description="A file holding the API key (instead of BNN_API_KEY; kept out of ps)"
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

    @field_validator("api_key_file")
    @classmethod
    def _check_api_key_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                key = value.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read the API key file: {exc.strerror}") from None
            if not key:
                raise ValueError("the API key file is empty")
        return value

    @model_validator(mode="after")
    def _key_from_file(self) -> Settings:
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ValueError("set BNN_API_KEY or BNN_API_KEY_FILE, not both")
            key = self.api_key_file.read_text(encoding="utf-8").strip()
            object.__setattr__(self, "api_key", SecretStr(key))  # frozen: set once, here
        return self

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

    def engine_options(self) -> EngineOptions:
        """The CPU engine's options: threads per call and kernel cache directory."""
        return EngineOptions(threads=self.engine_threads, kernel_cache_dir=self.kernel_cache_dir)

    @property
    def served_batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes a model is warmed at, and timed at when BNN_DEVICE=auto chooses."""
        return (1, min(self.max_batch_size, 256))


def flag_of(field: str) -> str:
    """The command-line flag of a settings field: ``max_batch_size`` → ``--max-batch-size``."""
    return "--" + field.replace("_", "-")


def settings_from_command_line(argv: Sequence[str]) -> Settings:
    """Settings from ``argv`` (flags), then ``BNN_*`` variables and ``.env``, then defaults.

    ``--help`` prints every flag with its variable and default, then exits 0; an unknown flag
    or a flag without its value raises :class:`pydantic_settings.SettingsError`, a bad value
    :class:`pydantic.ValidationError`."""
    flags = CliSettingsSource(
        Settings,
        cli_parse_args=list(argv),
        cli_prog_name=PROGRAM,
        cli_kebab_case=True,
        cli_implicit_flags=True,  # --warmup / --no-warmup
        cli_show_env_vars=True,
        cli_exit_on_error=False,
        cli_avoid_json=True,
        cli_hide_none_type=True,
        cli_shortcuts=FLAG_ALIASES,
    )
    return Settings(_cli_settings_source=flags)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad setting as its flag and environment variable, e.g.
    ``invalid setting --port/BNN_PORT='x': Input should be a valid integer``."""
    problems = []
    for error in exc.errors():
        value = error.get("input")
        shown = f"={value!r}" if isinstance(value, str | int | float) else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            field = str(error["loc"][0])
            problems.append(f"{flag_of(field)}/{ENV_PREFIX}{field.upper()}{shown}: {message}")
        else:  # a check across fields names them itself
            problems.append(message)
    return "invalid setting " + "; ".join(problems)


def as_environment(settings: Settings) -> dict[str, str | None]:
    """The resolved settings as ``BNN_*`` variables (None: unset it), so that worker processes,
    which read the environment, get exactly what flags, variables and defaults gave the parent.
    The API key travels as its value (never its file: the parent already read it)."""
    env: dict[str, str | None] = {}
    for field, value in settings.model_dump(exclude={"api_key", "api_key_file"}).items():
        if isinstance(value, tuple | list):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"{ENV_PREFIX}{field.upper()}"] = None if value is None else str(value)
    env[f"{ENV_PREFIX}API_KEY_FILE"] = None
    key = settings.api_key
    env[f"{ENV_PREFIX}API_KEY"] = key.get_secret_value() if key is not None else None
    return env

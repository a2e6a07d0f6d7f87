"""The models being served: which version of each is loaded, ready, refused, and why.

A version goes LOADING → READY (verified against its manifest, compiled, warmed) or
UNAVAILABLE (refused, with the reason). Publishing a newer version swaps it in without a failed
request: the new one is loaded while the old one keeps serving, the default pointer switches in
one step, and only then does the old one drain its queue and go. A corrupt or invalid newer
version is refused and remembered, so the poller does not retry it every scan, while the old
version keeps serving.

New versions are found by polling the repository every ``BNN_POLL_INTERVAL_S`` and by the
explicit load call of the repository extension. A request for a specific older version loads
it on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

from model.engine.memory import MemoryLimit
from model.errors import BnnError, ModelNotFoundError
from model.repository import ModelVersion, list_models, list_versions, resolve, verify_version
from service.batcher import DynamicBatcher
from service.errors import ModelLoadError, ModelNotReadyError
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("service.registry")
Loader = Callable[..., Any]  # load_model(path, device=..., memory_limit=...) -> compiled model


class ModelState(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class VersionStatus:
    state: ModelState
    reason: str = ""
    failed: bool = False  # refused at load: not retried until an explicit load


@dataclass
class ServedModel:
    """One loaded version: the compiled engine and the batcher in front of it."""

    name: str
    version: int
    path: Path
    engine: Any
    batcher: DynamicBatcher
    loaded_at: float = field(default_factory=time.time)

    @property
    def input_spec(self) -> Any:
        return self.engine.input_spec

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.engine.labels)

    @property
    def logits_name(self) -> str:
        return self.engine.spec.output_name


@dataclass
class _Model:
    name: str
    default: ServedModel | None = None
    served: dict[int, ServedModel] = field(default_factory=dict)
    status: dict[int, VersionStatus] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    unloaded: bool = False  # explicitly unloaded: the poller leaves it alone
    reason: str = ""  # why there is no default (no versions, all refused...)


class ModelRegistry:
    def __init__(self, settings: Settings, loader: Loader, metrics: ServiceMetrics) -> None:
        self._settings = settings
        self._loader = loader
        self._metrics = metrics
        self._repo = settings.model_repo
        self._models: dict[str, _Model] = {}
        self._draining: set[asyncio.Task[None]] = set()
        self._background: asyncio.Task[None] | None = None
        self.startup_complete = False

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Load the configured models, then poll for new versions, in the background."""
        self._background = asyncio.get_running_loop().create_task(self._load_then_poll())

    async def close(self) -> None:
        """Stop polling and loading, then let every batcher finish its queue."""
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
        for entry in self._models.values():
            for served in entry.served.values():
                self._retire(served)
            entry.served.clear()
            entry.default = None
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)

    async def _load_then_poll(self) -> None:
        await self.poll()
        self.startup_complete = True
        if not self._models:
            log.warning(
                "no models to serve yet; publish one into the repository",
                extra={"repository": str(self._repo)},
            )
        log.info("startup loading complete", extra={"ready": self.is_ready()})
        interval = self._settings.poll_interval_s
        while interval > 0:
            await asyncio.sleep(interval)
            await self.poll()

    async def poll(self) -> None:
        """Bring every model in scope to its newest loadable version."""
        for name in self._names_in_scope():
            try:
                await self.refresh(name)
            except Exception:  # one bad model must not stop the others or the poller
                log.exception("refreshing model failed", extra={"model": name})

    def _names_in_scope(self) -> list[str]:
        names = list(self._settings.models) or list_models(self._repo)
        names += [name for name in self._models if name not in names]
        return [name for name in names if not self._entry(name).unloaded]

    # --- queries -------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Startup done, at least one model serving, and every model named in BNN_MODELS too."""
        if not self.startup_complete:
            return False
        serving = {name for name, entry in self._models.items() if entry.default is not None}
        return bool(serving) and all(name in serving for name in self._settings.models)

    def get(self, name: str, version: int | None = None) -> ServedModel:
        """The served model for a request, without awaiting (so the caller can enqueue in the
        same step); ModelNotReadyError when it must be loaded first (see :meth:`load_version`)."""
        entry = self._models.get(name)
        if entry is not None:
            served = entry.default if version is None else entry.served.get(version)
            if served is not None:
                return served
        self._raise_unavailable(name, version)
        raise AssertionError("unreachable")

    def _raise_unavailable(self, name: str, version: int | None) -> None:
        self._resolve(name, version)
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotReadyError(
                f"model {name!r} is not loaded; load it with POST /v2/repository/models/{name}/load"
            )
        if entry.unloaded:
            raise ModelNotReadyError(f"model {name!r} was unloaded")
        status = entry.status.get(version) if version is not None else None
        if status is not None and status.failed:
            raise ModelNotReadyError(
                f"model {name!r} version {version} is unavailable: {status.reason}"
            )
        if version is None:
            raise ModelNotReadyError(f"model {name!r} is not ready: {entry.reason or 'loading'}")
        raise ModelNotReadyError(f"model {name!r} version {version} is not loaded")

    async def get_or_load(self, name: str, version: int | None) -> ServedModel:
        """:meth:`get`, loading a published but not yet loaded version on first use."""
        try:
            return self.get(name, version)
        except ModelNotReadyError:
            entry = self._models.get(name)
            if version is None or entry is None or entry.unloaded:
                raise
            status = entry.status.get(version)
            if status is not None and status.failed:
                raise
        return await self.load_version(name, version)

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a model this registry has loaded or tried to."""
        return name in self._models

    def versions(self, name: str) -> list[int]:
        return list_versions(self._repo, name)

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every version in the repository and every one known here, with state and reason."""
        rows = []
        for name in sorted(set(list_models(self._repo)) | set(self._models)):
            entry = self._models.get(name)
            known = entry.status if entry is not None else {}
            for version in sorted(set(list_versions(self._repo, name)) | set(known)):
                status = known.get(version, VersionStatus(ModelState.UNAVAILABLE, "not loaded"))
                if ready_only and status.state is not ModelState.READY:
                    continue
                rows.append(
                    {
                        "name": name,
                        "version": str(version),
                        "state": status.state.value,
                        "reason": status.reason,
                    }
                )
        return rows

    # --- loading -------------------------------------------------------------------------
    async def refresh(self, name: str, *, explicit: bool = False) -> ServedModel | None:
        """Serve the newest version of ``name`` that loads, trying only versions newer than the
        one serving; refused versions are skipped unless ``explicit``."""
        entry = self._entry(name)
        async with entry.lock:
            current = entry.default.version if entry.default is not None else 0
            candidates = [v for v in reversed(list_versions(self._repo, name)) if v > current]
            if not candidates and entry.default is None:
                entry.reason = f"no published versions in {self._repo}"
                if explicit:
                    raise ModelNotFoundError(f"model {name!r} has no published versions")
            refusals = []
            for version in candidates:
                status = entry.status.get(version)
                if status is not None and status.failed and not explicit:
                    continue
                try:
                    served = await self._load(entry, version)
                except BnnError:
                    refusals.append(f"version {version} refused: {entry.status[version].reason}")
                    continue
                self._switch_default(entry, served)
                return served
            if explicit and refusals:
                serving = entry.default.version if entry.default else None
                keeps = f"; version {serving} keeps serving" if serving else ""
                raise ModelLoadError(f"model {name!r}: {'; '.join(refusals)}{keeps}")
            return entry.default

    async def load_version(self, name: str, version: int) -> ServedModel:
        """Load one specific version alongside the default (first request for an old one)."""
        self._resolve(name, version)
        entry = self._entry(name)
        async with entry.lock:
            if version in entry.served:
                return entry.served[version]
            try:
                return await self._load(entry, version)
            except BnnError as exc:
                raise ModelNotReadyError(f"model {name!r} version {version}: {exc}") from None

    async def load(self, name: str) -> ServedModel:
        """The repository extension's load: (re)try the newest version, clearing refusals."""
        self._resolve(name, None)
        entry = self._entry(name)
        entry.unloaded = False
        served = await self.refresh(name, explicit=True)
        if served is None:
            raise ModelLoadError(f"model {name!r} could not be loaded: {entry.reason}")
        return served

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name``; queued requests still finish."""
        entry = self._models.get(name)
        if entry is None:
            self._resolve(name, None)
            entry = self._entry(name)
        async with entry.lock:
            entry.unloaded = True
            entry.reason = "unloaded"
            for version, served in entry.served.items():
                entry.status[version] = VersionStatus(ModelState.UNAVAILABLE, "unloaded")
                self._retire(served)
            entry.served.clear()
            entry.default = None
        log.info("model unloaded", extra={"model": name})

    async def _load(self, entry: _Model, version: int) -> ServedModel:
        """Verify, compile and warm one version in a worker thread; record the outcome."""
        name = entry.name
        entry.status[version] = VersionStatus(ModelState.LOADING)
        model_version = ModelVersion(name, version, self._repo / name / str(version))
        started = time.perf_counter()
        try:
            engine = await asyncio.to_thread(self._open, model_version)
        except Exception as exc:  # named errors, but also anything a broken artifact provokes
            # Relative to the repository: the reason is shown to clients.
            reason = f"{type(exc).__name__}: {exc}".replace(f"{self._repo}/", "")
            entry.status[version] = VersionStatus(ModelState.UNAVAILABLE, reason, failed=True)
            if entry.default is None:
                entry.reason = f"version {version} refused: {reason}"
            self._metrics.model_load_failures.labels(name).inc()
            log.error(
                "model version refused",
                extra={"model": name, "version": version, "reason": reason},
            )
            if isinstance(exc, BnnError):
                raise
            raise ModelLoadError(reason) from exc
        served = ServedModel(
            name, version, model_version.path, engine, self._batcher(name, version, engine)
        )
        entry.served[version] = served
        entry.status[version] = VersionStatus(ModelState.READY)
        self._metrics.set_model_ready(name, str(version), True)
        log.info(
            "model version ready",
            extra={
                "model": name,
                "version": version,
                "device": str(getattr(engine, "device", "")),
                "backend": str(getattr(engine, "backend", "")),
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        return served

    def _open(self, model_version: ModelVersion) -> Any:
        """Blocking: check the manifest's sha256s, load and compile, warm up."""
        verify_version(model_version.path)
        settings = self._settings
        # A request larger than max_batch_size runs alone, so one call gets up to the larger.
        limit = MemoryLimit(
            settings.max_model_memory_bytes,
            max(settings.max_batch_size, settings.max_request_batch),
        )
        engine = self._loader(
            model_version.artifact_path, device=settings.device, memory_limit=limit
        )
        if self._settings.warmup:
            engine.warmup(batch_sizes=(1, min(self._settings.max_batch_size, 256)))
        return engine

    def _batcher(self, name: str, version: int, engine: Any) -> DynamicBatcher:
        settings = self._settings
        return DynamicBatcher(
            engine.predict,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_s,
            max_queue_size=settings.max_queue_size,
            timeout_s=settings.request_timeout_s,
            on_batch=partial(self._metrics.observe_batch, name, str(version)),
            name=name,
            inline_below_s=settings.inline_compute_ms / 1000.0,
        )

    def _switch_default(self, entry: _Model, served: ServedModel) -> None:
        """Point new requests at ``served`` in one step, then retire the old default."""
        old, entry.default = entry.default, served
        entry.reason = ""
        if old is not None and old is not served:
            entry.served.pop(old.version, None)
            entry.status[old.version] = VersionStatus(
                ModelState.UNAVAILABLE, f"superseded by version {served.version}"
            )
            self._retire(old)
            log.info(
                "model version switched",
                extra={"model": entry.name, "version": served.version, "previous": old.version},
            )

    def _retire(self, served: ServedModel) -> None:
        """Drain ``served``'s queue in the background, then drop it."""
        self._metrics.set_model_ready(served.name, str(served.version), False)
        task = asyncio.get_running_loop().create_task(served.batcher.close())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def _resolve(self, name: str, version: int | None) -> ModelVersion:
        """The published version, or ModelNotFoundError that does not reveal the repo's path."""
        if not list_versions(self._repo, name):  # validates the name first (400 for '../x')
            raise ModelNotFoundError(f"model {name!r} not found")
        return resolve(self._repo, name, version)

    def _entry(self, name: str) -> _Model:
        entry = self._models.get(name)
        if entry is None:
            entry = self._models[name] = _Model(name)
        return entry

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

Lifecycle, after Triton's poll mode: each scan brings a model to its newest loadable version;
when the serving version's directory has been deleted, the model falls back to the newest
remaining loadable version, or is unloaded when none is left; removed versions that were
loaded alongside are retired too. An explicit load of one version pins it (the poller leaves
it serving) until a load without a version, an unload, or the removal of its directory.

Isolation: every model has its own lock and its own refresh task, and each load runs in its own
daemon thread under ``BNN_LOAD_TIMEOUT_S``. A load that times out is refused ("load timed out")
and its thread abandoned (a thread cannot be killed; its late result is discarded); an unload
abandons a load in progress at once. So one model's slow or stuck version never delays another
model, a scan, an unload or shutdown, and a stuck thread never keeps the process alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from model.engine import Predictor
from model.engine.memory import MemoryLimit
from model.errors import BnnError, ModelNotFoundError
from model.repository import ModelVersion, list_models, list_versions, resolve, verify_version
from model.spec import InputSpec
from service.batcher import DynamicBatcher
from service.errors import (
    LoadAbandonedError,
    LoadTimeoutError,
    ModelLoadError,
    ModelNotReadyError,
)
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("service.registry")
Loader = Callable[..., Predictor]  # load_model(path, device=..., memory_limit=...)


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
    engine: Predictor
    batcher: DynamicBatcher
    loaded_at: float = field(default_factory=time.time)

    # Read per request, fixed for the engine's life: looked up once.
    @cached_property
    def input_spec(self) -> InputSpec:
        return self.engine.input_spec

    @cached_property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.engine.labels)

    @cached_property
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
    pinned: int | None = None  # chosen by an explicit load of that version: the poller keeps it
    loading: asyncio.Future[Any] | None = None  # the load in progress; unload cancels it


def run_in_daemon_thread(function: Callable[[], Any], name: str) -> asyncio.Future[Any]:
    """Run ``function()`` in a new daemon thread; its outcome settles the returned future.

    Not an executor: ``asyncio.run`` joins the default executor's threads and the interpreter
    joins every non-daemon thread at exit, so a thread stuck in a blocking call would keep the
    process alive. Cancelling the future abandons the thread: its result is discarded.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: Exception | None) -> None:
        if future.done():  # timed out or abandoned meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = function(), None
        except Exception as exc:  # handed to the awaiting task
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future


class ModelRegistry:
    def __init__(self, settings: Settings, loader: Loader, metrics: ServiceMetrics) -> None:
        self._settings = settings
        self._loader = loader
        self._metrics = metrics
        self._repo = settings.model_repo
        self._models: dict[str, _Model] = {}
        self._draining: set[asyncio.Task[None]] = set()
        self._background: asyncio.Task[None] | None = None
        self._startup: asyncio.Task[None] | None = None
        self._refreshing: dict[str, asyncio.Task[None]] = {}  # one refresh task per model
        self.startup_complete = False

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Load the configured models, then poll for new versions, in the background."""
        loop = asyncio.get_running_loop()
        self._startup = loop.create_task(self._initial_loads())
        self._background = loop.create_task(self._poll_forever())

    async def close(self) -> None:
        """Stop polling and abandon loads in progress, then let every batcher finish its
        queue. Never waits for a load's thread."""
        tasks = [self._startup, self._background, *self._refreshing.values()]
        tasks = [task for task in tasks if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for entry in self._models.values():
            if entry.loading is not None:
                entry.loading.cancel()
            for served in entry.served.values():
                self._retire(served)
            entry.served.clear()
            entry.default = None
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)

    async def _initial_loads(self) -> None:
        """Startup is complete (readiness may turn true) once every model's first refresh has
        finished; the poller does not wait for it."""
        await self.poll()
        self.startup_complete = True
        if not self._models:
            log.warning(
                "no models to serve yet; publish one into the repository",
                extra={"repository": str(self._repo)},
            )
        log.info("startup loading complete", extra={"ready": self.is_ready()})

    async def _poll_forever(self) -> None:
        interval = self._settings.poll_interval_s
        while interval > 0:
            await asyncio.sleep(interval)
            try:
                self._schedule_refreshes()  # without waiting: a slow model delays no scan
            except Exception:  # an unreadable repository must not stop the poller
                log.exception("scanning the repository failed")

    async def poll(self) -> None:
        """Bring every model in scope to its newest loadable version, each in its own task;
        returns when every one has finished (each load is bounded by BNN_LOAD_TIMEOUT_S)."""
        tasks = self._schedule_refreshes()
        if tasks:
            await asyncio.wait(tasks)

    def _schedule_refreshes(self) -> list[asyncio.Task[None]]:
        """A refresh task per model in scope; a model whose previous refresh still runs keeps
        that one (its next scan comes after it)."""
        tasks = []
        for name in self._names_in_scope():
            task = self._refreshing.get(name)
            if task is None or task.done():
                task = asyncio.get_running_loop().create_task(
                    self._refresh_logged(name), name=f"refresh {name}"
                )
                self._refreshing[name] = task
            tasks.append(task)
        return tasks

    async def _refresh_logged(self, name: str) -> None:
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
    async def refresh(
        self, name: str, *, explicit: bool = False, version: int | None = None
    ) -> ServedModel | None:
        """Serve the newest version of ``name`` that loads (see :meth:`_candidates`), then
        retire versions whose directories are gone. Refused versions are skipped unless
        ``explicit``; an explicit ``version`` is loaded and pinned."""
        entry = self._entry(name)
        async with entry.lock:
            if entry.unloaded and not explicit:
                return None
            versions = list_versions(self._repo, name)
            refusals: list[str] = []
            for candidate in self._candidates(entry, versions, explicit, version):
                status = entry.status.get(candidate)
                if status is not None and status.failed and not explicit:
                    continue
                try:  # a version already loaded alongside is reused, never compiled twice
                    served = entry.served.get(candidate) or await self._load(entry, candidate)
                except LoadAbandonedError:
                    break
                except BnnError:
                    reason = entry.status[candidate].reason
                    refusals.append(f"version {candidate} refused: {reason}")
                    continue
                self._switch_default(entry, served)
                entry.pinned = version
                break
            self._retire_removed(entry, versions, refusals)
            if not versions:
                entry.reason = f"no published versions in {self._repo}"
                if explicit:
                    raise ModelNotFoundError(f"model {name!r} has no published versions")
            if explicit and refusals:
                serving = entry.default.version if entry.default else None
                keeps = f"; version {serving} keeps serving" if serving else ""
                raise ModelLoadError(f"model {name!r}: {'; '.join(refusals)}{keeps}")
            return entry.default

    def _candidates(
        self, entry: _Model, versions: list[int], explicit: bool, version: int | None
    ) -> list[int]:
        """Versions to try, best first: the requested one; nothing while a pinned version
        serves a scan; versions newer than the serving one; every version, newest first, when
        none serves or the serving version's directory is gone (the fall-back)."""
        if version is not None:
            if version not in versions:
                raise ModelNotFoundError(
                    f"model {entry.name!r} has no version {version}; available: {versions[-20:]}"
                )
            return [version]
        if explicit:
            entry.pinned = None
        current = entry.default.version if entry.default is not None else None
        if current is None or current not in versions:
            return list(reversed(versions))
        if entry.pinned == current:
            return []
        return [v for v in reversed(versions) if v > current]

    def _retire_removed(self, entry: _Model, versions: list[int], refusals: list[str]) -> None:
        """Stop serving versions whose directories were deleted; forget their states."""
        present = set(versions)
        default = entry.default
        if default is not None and default.version not in present:
            entry.default = entry.pinned = None
            because = f": {'; '.join(refusals)}" if refusals else ""
            entry.reason = (
                f"version {default.version} was removed from the repository and no other "
                f"version loads{because}"
            )
            log.warning(
                "serving version removed; model unloaded",
                extra={"model": entry.name, "version": default.version},
            )
        for version in [v for v in entry.served if v not in present]:
            self._retire(entry.served.pop(version))
        for version in [v for v in entry.status if v not in present]:
            del entry.status[version]

    async def load_version(self, name: str, version: int) -> ServedModel:
        """Load one specific version alongside the default (first request for an old one)."""
        self._resolve(name, version)
        entry = self._entry(name)
        async with entry.lock:
            if version in entry.served:
                return entry.served[version]
            if entry.unloaded:
                raise ModelNotReadyError(f"model {name!r} was unloaded")
            try:
                return await self._load(entry, version)
            except BnnError as exc:
                raise ModelNotReadyError(f"model {name!r} version {version}: {exc}") from None

    async def load(self, name: str, version: int | None = None) -> ServedModel:
        """The repository extension's load: (re)try the newest version, clearing refusals;
        with ``version``, load that one and pin it (see the module docstring)."""
        self._resolve(name, version)
        entry = self._entry(name)
        entry.unloaded = False
        served = await self.refresh(name, explicit=True, version=version)
        if served is None:
            raise ModelLoadError(f"model {name!r} could not be loaded: {entry.reason}")
        return served

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name``; queued requests still finish, a load in
        progress is abandoned."""
        entry = self._models.get(name)
        if entry is None:
            self._resolve(name, None)
            entry = self._entry(name)
        entry.unloaded = True
        if entry.loading is not None:
            entry.loading.cancel()  # the loading task lets go of the lock at once
        async with entry.lock:
            entry.unloaded = True
            entry.reason = "unloaded"
            entry.pinned = None
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
            engine = await self._open_with_time_limit(entry, model_version)
        except LoadAbandonedError:
            entry.status[version] = VersionStatus(ModelState.UNAVAILABLE, "unloaded")
            raise
        except asyncio.CancelledError:  # shutdown, or the request that asked for it went away
            entry.status[version] = VersionStatus(ModelState.UNAVAILABLE, "load cancelled")
            raise
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

    async def _open_with_time_limit(self, entry: _Model, model_version: ModelVersion) -> Any:
        """:meth:`_open` in a daemon thread, waited for at most BNN_LOAD_TIMEOUT_S;
        LoadTimeoutError after that, LoadAbandonedError when an unload cancels it."""
        limit = self._settings.load_timeout_s
        future = run_in_daemon_thread(
            partial(self._open, model_version),
            name=f"load {model_version.name}/{model_version.version}",
        )
        entry.loading = future
        try:
            done, _ = await asyncio.wait({future}, timeout=limit)
        finally:
            entry.loading = None
            future.cancel()  # no-op when settled; else the thread's late result is discarded
        if not done:
            raise LoadTimeoutError(
                f"load timed out after {limit:g} s (BNN_LOAD_TIMEOUT_S); its thread was abandoned"
            )
        if future.cancelled():
            raise LoadAbandonedError(f"load of model {entry.name!r} abandoned: unloaded")
        return future.result()

    def _open(self, model_version: ModelVersion) -> Predictor:
        """Blocking: check the manifest's sizes and sha256s, load and compile, warm up."""
        verify_version(model_version.path, root=self._repo)
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
            engine.warmup(batch_sizes=self._settings.served_batch_sizes)
        return engine

    def _batcher(self, name: str, version: int, engine: Predictor) -> DynamicBatcher:
        settings = self._settings
        return DynamicBatcher(
            engine.predict_rows,  # the data plane conforms each request's rows
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_s,
            max_queue_size=settings.max_queue_size,
            timeout_s=settings.request_timeout_s,
            on_batch=self._metrics.batch_observer(name, str(version)),
            name=name,
            inline_below_s=inline_below_s(settings, engine),
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


def inline_below_s(settings: Settings, engine: Predictor) -> float:
    """BNN_INLINE_COMPUTE_MS for CPU models; 0 (never inline) for a model on a GPU: its calls
    wait on the device and must not block the event loop."""
    on_gpu = engine.device.startswith("cuda")
    return 0.0 if on_gpu else settings.inline_compute_ms / 1000.0

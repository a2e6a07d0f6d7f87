"""The model repository: ``REPO/<name>/<version>/`` directories with a manifest of sha256s.

Layout::

    REPO/
      digits-mlp/
        1/  model.safetensors  metrics.json  curves.png  manifest.json
        2/  ...

Versions are increasing integers. A version is visible only once its directory exists under its
final name, and that name appears in one atomic ``rename`` of a fully written staging directory,
so readers never see a partial version and a crash mid-publish leaves only an ignored
``.staging-*`` directory. Two concurrent publishers both pick ``max + 1``; the loser's rename
fails (the target exists and is not empty) and it retries with the next number, so each gets a
distinct version and none overwrites another.

Reading is defensive (see :mod:`model.safe_files`): only regular files are opened, a symbolic
link is followed only while it stays inside the repository, and a version serves only the files
its manifest lists with their size and sha256, which must include ``model.safetensors``. Names
and version numbers match their patterns in full (a directory ``"9\\n"`` is not version 9).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model.artifact import ARTIFACT_FILENAME
from model.errors import (
    InvalidModelNameError,
    ManifestError,
    ModelNotFoundError,
    RepositoryError,
    VersionLimitError,
)
from model.safe_files import open_regular_file, read_regular_file, resolve_inside

MANIFEST_FILENAME = "manifest.json"
STAGING_PREFIX = ".staging-"
STALE_STAGING_SECONDS = 24 * 3600
MAX_MANIFEST_BYTES = 1024 * 1024
# Patterns are used with fullmatch only: "$" would also match before a trailing newline.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
MAX_VERSION = 10**18 - 1  # the largest number _VERSION matches (18 digits)
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelVersion:
    """One published version of a model."""

    name: str
    version: int
    path: Path

    @property
    def artifact_path(self) -> Path:
        return self.path / ARTIFACT_FILENAME


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a safe model name: letters, digits, '-', '_', '.', no '..'."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name) or ".." in name:
        raise InvalidModelNameError(
            f"invalid model name {name!r}: expected 1-128 characters from [A-Za-z0-9._-], "
            "not starting with '.' or '-' and without '..'"
        )
    return name


def parse_version(text: str | int) -> int:
    """A version number from a path segment or API argument: an integer in 1..MAX_VERSION."""
    if isinstance(text, int) and not isinstance(text, bool) and 0 < text <= MAX_VERSION:
        return text
    if isinstance(text, str) and _VERSION.fullmatch(text):
        return int(text)
    raise ModelNotFoundError(
        f"invalid version {text!r}: expected a positive integer of at most 18 digits"
    )


def list_models(repo: str | os.PathLike[str]) -> list[str]:
    """Names of the models that have at least one published version, sorted."""
    root = Path(repo)
    if not root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir()
        and _MODEL_NAME.fullmatch(entry.name)
        and ".." not in entry.name
        and list_versions(root, entry.name)
    )


def list_versions(repo: str | os.PathLike[str], name: str) -> list[int]:
    """Published versions of ``name``, ascending: directories named by a version number that
    contain a ``manifest.json`` entry. Only names are looked at here (nothing is opened), so an
    unreadable or hostile version is listed and then refused by :func:`verify_version`, with
    its reason, rather than silently skipped."""
    model_dir = Path(repo) / validate_model_name(name)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(entry.name)
        for entry in model_dir.iterdir()
        if _VERSION.fullmatch(entry.name)
        and entry.is_dir()
        and os.path.lexists(entry / MANIFEST_FILENAME)
    )


def resolve(repo: str | os.PathLike[str], name: str, version: int | None = None) -> ModelVersion:
    """The requested version of ``name`` (the newest when ``version`` is None)."""
    versions = list_versions(repo, name)
    if not versions:
        raise ModelNotFoundError(f"model {name!r} has no published versions in {repo}")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ModelNotFoundError(f"model {name!r} has no version {version}; available: {versions}")
    return ModelVersion(name=name, version=version, path=Path(repo) / name / str(version))


def publish(
    repo: str | os.PathLike[str],
    name: str,
    files: Mapping[str, bytes | os.PathLike[str]],
    *,
    manifest_extra: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Publish ``files`` (file name → bytes or a path to copy) as the next version of ``name``.

    ``files`` must include ``model.safetensors``. Returns the new version; never overwrites one.
    """
    validate_model_name(name)
    if ARTIFACT_FILENAME not in files:
        raise RepositoryError(
            f"publish needs {ARTIFACT_FILENAME!r} among the files, got {sorted(files)}"
        )
    model_dir = Path(repo) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(model_dir)
    staging = model_dir / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        records = {
            file_name: _write_file(staging, file_name, content)
            for file_name, content in files.items()
        }
        return _rename_into_place(staging, model_dir, name, records, manifest_extra or {})
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def read_manifest(
    version_dir: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """The parsed manifest of a version directory; ManifestError when absent, larger than
    MAX_MANIFEST_BYTES or malformed; NotARegularFileError / LinkOutsideRepositoryError when it
    is not a regular file inside ``root``."""
    path = Path(version_dir) / MANIFEST_FILENAME
    try:
        with open_regular_file(path, root=root) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                raise ManifestError(
                    f"{path} has {size} bytes; expected at most {MAX_MANIFEST_BYTES}"
                )
            manifest = json.loads(handle.read())
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{path} must be an object with a 'files' table")
    return manifest


def verify_version(
    version_dir: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Check a version directory against its manifest; returns the manifest.

    The manifest must list ``model.safetensors``; every listed file must be a regular file
    inside ``root`` (default: the repository, ``version_dir/../..``) whose size and sha256
    equal the manifest's ``bytes`` and ``sha256``. Files the manifest does not list are never
    read, so they can never be served.
    """
    version_dir = Path(version_dir)
    root = version_dir.parent.parent if root is None else root
    resolve_inside(version_dir, root)  # a version directory linked out of the repository
    manifest = read_manifest(version_dir, root=root)
    files = manifest["files"]
    if ARTIFACT_FILENAME not in files:
        raise ManifestError(
            f"{version_dir}: the manifest does not list {ARTIFACT_FILENAME}; "
            f"expected it among the files, got {sorted(files)[:10]}"
        )
    for file_name, record in files.items():
        _verify_file(version_dir, root, file_name, record)
    return manifest


# --- helpers -------------------------------------------------------------------------------------
def _write_file(
    directory: Path, file_name: str, content: bytes | os.PathLike[str]
) -> dict[str, Any]:
    if not _FILE_NAME.fullmatch(file_name) or file_name == MANIFEST_FILENAME:
        raise RepositoryError(f"invalid file name {file_name!r} for a model version")
    data = content if isinstance(content, bytes) else read_regular_file(content)
    _write_durably(directory / file_name, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _rename_into_place(
    staging: Path, model_dir: Path, name: str, records: dict[str, Any], extra: Mapping[str, Any]
) -> ModelVersion:
    for _attempt in range(1000):
        version = max(list_versions(model_dir.parent, name), default=0) + 1
        while os.path.lexists(model_dir / str(version)):  # an unfinished or foreign entry
            version += 1
        if version > MAX_VERSION:
            raise VersionLimitError(
                f"model {name!r}: the next version would be {version}, above the largest "
                f"version the repository lists ({MAX_VERSION}); remove the stray directories "
                "with 18-digit names"
            )
        manifest = {
            **extra,
            "name": name,
            "version": version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": records,
        }
        _write_durably(staging / MANIFEST_FILENAME, json.dumps(manifest, indent=2).encode())
        try:
            os.rename(staging, model_dir / str(version))
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                continue  # another publisher took this version first
            raise
        _fsync_directory(model_dir)
        return ModelVersion(name=name, version=version, path=model_dir / str(version))
    raise RepositoryError(f"could not find a free version number for {name!r}")


def _remove_stale_staging(model_dir: Path) -> None:
    cutoff = time.time() - STALE_STAGING_SECONDS
    for entry in model_dir.glob(f"{STAGING_PREFIX}*"):
        try:
            stale = entry.stat().st_mtime < cutoff
        except FileNotFoundError:  # another publisher renamed or removed it meanwhile
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _verify_file(
    version_dir: Path, root: str | os.PathLike[str], file_name: str, record: Any
) -> None:
    """One manifest entry: a safe name, ``{"sha256": 64 hex digits, "bytes": int}``, and a
    regular file inside ``root`` with exactly that size and digest."""
    bytes_ = record.get("bytes") if isinstance(record, dict) else None
    sha256 = record.get("sha256") if isinstance(record, dict) else None
    if (
        not isinstance(file_name, str)
        or not _FILE_NAME.fullmatch(file_name)
        or file_name == MANIFEST_FILENAME
        or not isinstance(bytes_, int)
        or isinstance(bytes_, bool)
        or bytes_ < 0
        or not isinstance(sha256, str)
        or not _SHA256.fullmatch(sha256)
    ):
        raise ManifestError(
            f"{version_dir}: manifest entry {file_name!r} is malformed; expected a file name "
            'and {"sha256": 64 lowercase hex digits, "bytes": a non-negative integer}'
        )
    try:
        handle = open_regular_file(version_dir / file_name, root=root)
    except FileNotFoundError:
        raise ManifestError(
            f"{version_dir}: {file_name} is listed in the manifest but missing"
        ) from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size != bytes_:
            raise ManifestError(
                f"{version_dir}: {file_name} has {size} bytes, the manifest records {bytes_}"
            )
        actual = _sha256_of(handle)
    if actual != sha256:
        raise ManifestError(
            f"{version_dir}: {file_name} has sha256 {actual[:16]}…, "
            f"the manifest records {sha256[:16]}…"
        )


def _sha256_of(handle: Any) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()

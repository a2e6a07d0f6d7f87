"""The model repository: versioning, name validation, manifests, atomic concurrent publishing."""

import hashlib
import json
import multiprocessing
import os

import pytest

from model.errors import InvalidModelNameError, ManifestError, ModelNotFoundError, RepositoryError
from model.repository import (
    MANIFEST_FILENAME,
    list_models,
    list_versions,
    parse_version,
    publish,
    resolve,
    verify_version,
)

ARTIFACT = {"model.safetensors": b"artifact bytes"}


def test_versions_increase_from_one(tmp_path):
    first = publish(tmp_path, "digits-mlp", ARTIFACT)
    second = publish(tmp_path, "digits-mlp", ARTIFACT | {"metrics.json": b"{}"})
    assert (first.version, second.version) == (1, 2)
    assert second.path == tmp_path / "digits-mlp" / "2"
    assert (second.path / "metrics.json").read_bytes() == b"{}"
    assert list_versions(tmp_path, "digits-mlp") == [1, 2]
    assert resolve(tmp_path, "digits-mlp").version == 2
    assert resolve(tmp_path, "digits-mlp", 1).artifact_path.read_bytes() == b"artifact bytes"


def test_manifest_records_the_sha256_of_every_file(tmp_path):
    version = publish(tmp_path, "m", ARTIFACT, manifest_extra={"arch": "mlp"})
    manifest = verify_version(version.path)
    assert manifest["arch"] == "mlp"
    assert (manifest["name"], manifest["version"]) == ("m", 1)
    assert manifest["files"]["model.safetensors"] == {
        "sha256": hashlib.sha256(b"artifact bytes").hexdigest(),
        "bytes": 14,
    }


def test_a_modified_file_fails_verification(tmp_path):
    version = publish(tmp_path, "m", ARTIFACT)
    version.artifact_path.write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="model.safetensors has sha256"):
        verify_version(version.path)


def test_a_malformed_manifest_is_reported(tmp_path):
    version = publish(tmp_path, "m", ARTIFACT)
    (version.path / MANIFEST_FILENAME).write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        verify_version(version.path)


@pytest.mark.parametrize(
    "name", ["../evil", "a/b", "..", ".hidden", "-x", "", "a b", "x" * 129, "a..b"]
)
def test_unsafe_model_names_are_refused(tmp_path, name):
    with pytest.raises(InvalidModelNameError, match="invalid model name"):
        publish(tmp_path, name, ARTIFACT)
    assert list(tmp_path.iterdir()) == []


def test_publish_needs_the_artifact_and_safe_file_names(tmp_path):
    with pytest.raises(RepositoryError, match="needs 'model.safetensors'"):
        publish(tmp_path, "m", {"metrics.json": b"{}"})
    with pytest.raises(RepositoryError, match="invalid file name '../x'"):
        publish(tmp_path, "m", ARTIFACT | {"../x": b""})
    assert list_versions(tmp_path, "m") == []


def test_unknown_models_and_versions(tmp_path):
    publish(tmp_path, "m", ARTIFACT)
    with pytest.raises(ModelNotFoundError, match="'other' has no published versions"):
        resolve(tmp_path, "other")
    with pytest.raises(ModelNotFoundError, match=r"no version 7; available: \[1\]"):
        resolve(tmp_path, "m", 7)


@pytest.mark.parametrize("text", ["0", "-1", "01", "1.0", "latest", ""])
def test_versions_must_be_positive_integers(text):
    with pytest.raises(ModelNotFoundError, match="expected a positive integer"):
        parse_version(text)


def test_half_written_versions_are_invisible(tmp_path):
    publish(tmp_path, "m", ARTIFACT)
    (tmp_path / "m" / ".staging-123-abc").mkdir()  # a crashed publisher's leftovers
    (tmp_path / "m" / "2").mkdir()  # a directory without a manifest
    assert list_versions(tmp_path, "m") == [1]
    assert list_models(tmp_path) == ["m"]
    assert publish(tmp_path, "m", ARTIFACT).version == 3  # never reuses the foreign "2"


def test_a_crash_before_the_rename_leaves_no_version(tmp_path, monkeypatch):
    def crash(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="disk on fire"):
        publish(tmp_path, "m", ARTIFACT)
    assert list_versions(tmp_path, "m") == []
    assert [p.name for p in (tmp_path / "m").iterdir()] == []


def _publish_many(repo, count, queue):
    queue.put([publish(repo, "shared", ARTIFACT).version for _ in range(count)])


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_publish_many, args=(tmp_path, 10, queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    versions = [v for _ in workers for v in queue.get(timeout=60)]
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(versions) == list(range(1, 41))
    assert list_versions(tmp_path, "shared") == list(range(1, 41))
    for version in versions:
        manifest = json.loads((tmp_path / "shared" / str(version) / MANIFEST_FILENAME).read_text())
        assert manifest["version"] == version

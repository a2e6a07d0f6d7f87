"""The model repository: versioning, name validation, manifests, atomic concurrent publishing."""

import hashlib
import json
import multiprocessing
import os
import socket
import threading

import pytest

from model.artifact import read_artifact
from model.errors import (
    InvalidModelNameError,
    LinkOutsideRepositoryError,
    ManifestError,
    ModelNotFoundError,
    NotARegularFileError,
    RepositoryError,
    VersionLimitError,
)
from model.repository import (
    MANIFEST_FILENAME,
    MAX_MANIFEST_BYTES,
    MAX_VERSION,
    list_models,
    list_versions,
    parse_version,
    publish,
    resolve,
    validate_model_name,
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
    version.artifact_path.write_bytes(b"artifact byteZ")  # same size, other bytes
    with pytest.raises(ManifestError, match="model.safetensors has sha256"):
        verify_version(version.path)
    version.artifact_path.write_bytes(b"tampered")
    with pytest.raises(
        ManifestError, match="model.safetensors has 8 bytes, the manifest records 14"
    ):
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


# --- defensive reading: regular files only, links inside the repository, full matches ----------
def rewrite_manifest(version_dir, edit) -> None:
    path = version_dir / MANIFEST_FILENAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def within(seconds, function, *args):
    """``function(*args)`` in a daemon thread; fails (instead of hanging the run) when it has
    not returned or raised within ``seconds`` — which is what a blocking open of a FIFO does."""
    outcome = {}

    def run():
        try:
            outcome["result"] = function(*args)
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_a_manifest_must_list_the_artifact_with_size_and_sha256(tmp_path):
    version = publish(tmp_path, "m", ARTIFACT | {"metrics.json": b"{}"})
    rewrite_manifest(version.path, lambda m: m["files"].pop("model.safetensors"))
    with pytest.raises(ManifestError, match="does not list model.safetensors"):
        verify_version(version.path)
    version = publish(tmp_path, "m", ARTIFACT)
    rewrite_manifest(version.path, lambda m: m["files"]["model.safetensors"].pop("bytes"))
    with pytest.raises(ManifestError, match="'model.safetensors' is malformed"):
        verify_version(version.path)
    version = publish(tmp_path, "m", ARTIFACT)
    rewrite_manifest(version.path, lambda m: m["files"].update({"../x": {"sha256": "0" * 64}}))
    with pytest.raises(ManifestError, match=r"'\.\./x' is malformed"):
        verify_version(version.path)


def test_an_oversized_manifest_is_refused_unread(tmp_path):
    version = publish(tmp_path, "m", ARTIFACT)
    (version.path / MANIFEST_FILENAME).write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ManifestError, match=f"expected at most {MAX_MANIFEST_BYTES}"):
        verify_version(version.path)


def test_a_fifo_planted_as_the_artifact_is_refused_without_blocking(tmp_path):
    listed = publish(tmp_path, "m", ARTIFACT)
    listed.artifact_path.unlink()
    os.mkfifo(listed.artifact_path)
    with pytest.raises(NotARegularFileError, match="model.safetensors is a FIFO"):
        within(5, verify_version, listed.path)
    # Not in the manifest: refused before anything is opened; the loader refuses it too.
    unlisted = publish(tmp_path, "m", ARTIFACT | {"metrics.json": b"{}"})
    unlisted.artifact_path.unlink()
    os.mkfifo(unlisted.artifact_path)
    rewrite_manifest(unlisted.path, lambda m: m["files"].pop("model.safetensors"))
    with pytest.raises(ManifestError, match="does not list model.safetensors"):
        within(5, verify_version, unlisted.path)
    with pytest.raises(NotARegularFileError, match="is a FIFO; expected a regular file"):
        within(5, read_artifact, unlisted.artifact_path)


def test_a_fifo_planted_as_the_manifest_is_listed_and_refused(tmp_path):
    version = publish(tmp_path, "m", ARTIFACT)
    (version.path / MANIFEST_FILENAME).unlink()
    os.mkfifo(version.path / MANIFEST_FILENAME)
    assert list_versions(tmp_path, "m") == [1]  # listed, so the refusal is visible
    with pytest.raises(NotARegularFileError, match="manifest.json is a FIFO"):
        within(5, verify_version, version.path)


def test_a_socket_or_directory_planted_as_a_file_is_refused(tmp_path):
    version = publish(tmp_path, "m", ARTIFACT)
    version.artifact_path.unlink()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(version.artifact_path))
        with pytest.raises(NotARegularFileError, match="model.safetensors is a socket"):
            verify_version(version.path)
    version.artifact_path.unlink()
    version.artifact_path.mkdir()
    with pytest.raises(NotARegularFileError, match="model.safetensors is a directory"):
        verify_version(version.path)


def test_links_inside_the_repository_are_followed(tmp_path):
    first = publish(tmp_path, "m", ARTIFACT)
    second = publish(tmp_path, "m", ARTIFACT)
    second.artifact_path.unlink()
    second.artifact_path.symlink_to(first.artifact_path)
    assert verify_version(second.path)["version"] == 2
    os.symlink("1", tmp_path / "m" / "3")  # a version directory linked to a sibling
    assert list_versions(tmp_path, "m") == [1, 2, 3]
    assert verify_version(tmp_path / "m" / "3")["version"] == 1
    linked_root = tmp_path.parent / f"{tmp_path.name}-link"  # the repository itself via a link
    linked_root.symlink_to(tmp_path)
    assert verify_version(linked_root / "m" / "2", root=linked_root)["version"] == 2


def test_links_that_leave_the_repository_are_refused(tmp_path):
    repo = tmp_path / "repo"
    version = publish(repo, "m", ARTIFACT)
    secret = tmp_path / "passwd"
    secret.write_bytes(b"artifact bytes")  # same size and sha256 as the manifest records
    version.artifact_path.unlink()
    version.artifact_path.symlink_to(secret)
    with pytest.raises(LinkOutsideRepositoryError, match="outside the repository"):
        verify_version(version.path)
    # A whole version directory linked to a published-looking directory elsewhere.
    elsewhere = publish(tmp_path / "elsewhere", "m", ARTIFACT).path
    os.symlink(elsewhere, repo / "m" / "2")
    assert list_versions(repo, "m") == [1, 2]
    with pytest.raises(LinkOutsideRepositoryError, match=r"m/2 resolves to .*elsewhere/m/1"):
        verify_version(repo / "m" / "2")
    # A whole model directory linked out of the repository.
    os.symlink(tmp_path / "elsewhere" / "m", repo / "linked")
    assert list_versions(repo, "linked") == [1]
    with pytest.raises(LinkOutsideRepositoryError, match="outside the repository"):
        verify_version(repo / "linked" / "1")


@pytest.mark.parametrize("name", ["m\n", "m\nn", "\nm"])
def test_model_names_match_in_full(name):
    with pytest.raises(InvalidModelNameError, match="invalid model name"):
        validate_model_name(name)


def test_versions_match_in_full(tmp_path):
    publish(tmp_path, "m", ARTIFACT)
    stray = tmp_path / "m" / "9\n"
    stray.mkdir()
    (stray / MANIFEST_FILENAME).write_text("{}")
    assert list_versions(tmp_path, "m") == [1]
    for text in ("9\n", "1" * 19):
        with pytest.raises(ModelNotFoundError, match="expected a positive integer"):
            parse_version(text)
    with pytest.raises(ModelNotFoundError, match="expected a positive integer"):
        parse_version(MAX_VERSION + 1)
    assert parse_version(str(MAX_VERSION)) == MAX_VERSION


def test_publish_never_creates_a_version_that_is_not_listed(tmp_path):
    publish(tmp_path, "m", ARTIFACT)
    (tmp_path / "m" / str(10**18)).mkdir()  # not a version: 19 digits
    assert publish(tmp_path, "m", ARTIFACT).version == 2
    largest = tmp_path / "m" / str(MAX_VERSION)
    largest.mkdir()
    (largest / MANIFEST_FILENAME).write_text("{}")
    assert list_versions(tmp_path, "m")[-1] == MAX_VERSION
    with pytest.raises(VersionLimitError, match=f"above the largest version .*{MAX_VERSION}"):
        publish(tmp_path, "m", ARTIFACT)
    assert list_versions(tmp_path, "m") == [1, 2, MAX_VERSION]
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".staging")]

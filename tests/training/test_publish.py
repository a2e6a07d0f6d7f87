"""Publishing a run: files, manifest, provenance, and an artifact that reproduces the model."""

from __future__ import annotations

import json

import pytest
import torch

from model.artifact import read_artifact
from model.repository import list_versions, verify_version
from training.architectures import MLPConfig
from training.config import TrainConfig
from training.export import module_from_artifact
from training.loop import train
from training.publish import publish_result

pytestmark = pytest.mark.slow  # trains models (left out of `make test-fast`)


@pytest.fixture(scope="module")
def result():
    config = TrainConfig(arch="mlp", model=MLPConfig(hidden=(48, 24)), epochs=1, progress=False)
    return train(config)


def test_publish_writes_a_verified_version_with_metrics_and_curves(result, tmp_path):
    version = publish_result(result, tmp_path, "digits-tiny")
    assert (version.name, version.version) == ("digits-tiny", 1)
    assert version.path == tmp_path / "digits-tiny" / "1"
    manifest = verify_version(version.path)  # every file matches its sha256
    assert set(manifest["files"]) == {
        "model.safetensors",
        "metrics.json",
        "curves.png",
        "summary.json",
    }
    assert manifest["test_accuracy"] == result.metrics["test_accuracy"]
    assert manifest["architecture"] == "mlp" and manifest["dataset"] == "digits"
    metrics = json.loads((version.path / "metrics.json").read_text())
    assert metrics["metrics"]["best_epoch"] == result.metrics["best_epoch"]
    summary = json.loads((version.path / "summary.json").read_text())
    assert summary["totals"]["binary_params"] == 64 * 48 + 48 * 24
    assert (version.path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_second_publish_gets_the_next_version(result, tmp_path):
    first = publish_result(result, tmp_path, "m")
    second = publish_result(result, tmp_path, "m")
    assert (first.version, second.version) == (1, 2)
    assert list_versions(tmp_path, "m") == [1, 2]


def test_artifact_carries_provenance_and_metrics(result, tmp_path):
    artifact = read_artifact(publish_result(result, tmp_path, "m").artifact_path)
    spec = artifact.spec
    assert spec.name == "m" and spec.architecture == "mlp"
    assert spec.labels == tuple("0123456789")
    assert spec.input.value_range == (0.0, 16.0) and spec.input.integer_valued
    assert spec.training["test_accuracy"] == result.metrics["test_accuracy"]
    provenance = spec.provenance
    assert provenance["dataset"] == "digits" and provenance["seed"] == 0
    assert provenance["torch_version"] == torch.__version__
    assert "code_revision" in provenance
    assert provenance["config"]["model"]["hidden"] == [48, 24]


def test_published_artifact_reproduces_the_trained_model(result, tmp_path):
    path = publish_result(result, tmp_path, "m").artifact_path
    rebuilt = module_from_artifact(path)
    x = torch.from_numpy(result.data.test.x)
    with torch.no_grad():
        expected, actual = result.model(x), rebuilt(x)
    assert torch.allclose(actual, expected, atol=1e-5)
    assert torch.equal(actual.argmax(1), expected.argmax(1))

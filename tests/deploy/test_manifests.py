"""The Kubernetes and KServe manifests, validated offline.

Kubernetes objects are checked against the Kubernetes OpenAPI schemas that
``kubernetes-validate`` ships (strict: an unknown field is an error, as with
``kubectl apply --validate=strict``); KServe objects against KServe's CRD schemas vendored in
``schemas/kserve`` (source and commit in each file's ``$comment``), made strict the same way —
the API server would silently drop a misspelt field of a custom resource. Beyond the schemas,
the tests check what ties the objects together: selectors, claim names, ports, probe paths and
settings the server knows.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
KSERVE_DIR = ROOT / "deploy" / "kserve"
SCHEMAS = Path(__file__).parent / "schemas" / "kserve"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for
KUSTOMIZATION = "kustomization.yaml"
OPTIONAL_K8S = {"hpa-queue.yaml"}  # applied by hand instead of hpa.yaml (see its header)
V2_PROBES = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    k8s = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != KUSTOMIZATION)
    return k8s + sorted(KSERVE_DIR.glob("*.yaml"))


def all_objects() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_documents(path)]


def find(kind: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    matches = [o for o in (objects if objects is not None else all_objects()) if o["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def strict(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its
    properties and neither allows extra ones nor preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@cache
def kserve_validator(kind: str, version: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / f"{kind.lower()}-{version}.json").read_text())
    return jsonschema.Draft7Validator(strict(schema))


def validate(obj: dict[str, Any]) -> None:
    """Raise if ``obj`` does not match its schema (Kubernetes built-in or KServe CRD)."""
    group, _, version = obj["apiVersion"].rpartition("/")
    if group == "serving.kserve.io":
        errors = sorted(kserve_validator(obj["kind"], version).iter_errors(obj), key=str)
        if errors:
            raise jsonschema.ValidationError(
                "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
            )
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


# --- every object against its schema ---------------------------------------------------------
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_manifest_matches_its_schema(path: Path) -> None:
    documents = load_documents(path)
    assert documents, f"{path} holds no object"
    for obj in documents:
        validate(obj)


@pytest.mark.parametrize(
    ("kind", "path", "typo"),
    [
        ("Deployment", ("spec", "template", "spec", "containers", 0), "readinesProbe"),
        ("ServingRuntime", ("spec", "containers", 0), "readinesProbe"),
        ("InferenceService", ("spec", "predictor", "model"), "storageURI"),
    ],
)
def test_a_misspelt_field_fails_validation(kind: str, path: tuple, typo: str) -> None:
    obj = copy.deepcopy(find(kind))
    node = obj
    for key in path:
        node = node[key]
    node[typo] = {}
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)) as info:
        validate(obj)
    assert typo in str(info.value)


def test_a_wrong_type_fails_kserve_validation() -> None:
    runtime = copy.deepcopy(find("ServingRuntime"))
    runtime["spec"]["protocolVersions"] = "v2"  # a list is expected
    with pytest.raises(jsonschema.ValidationError, match="protocolVersions"):
        validate(runtime)


def test_vendored_schemas_name_their_source() -> None:
    for path in SCHEMAS.glob("*.json"):
        comment = json.loads(path.read_text())["$comment"]
        assert re.search(r"github\.com/kserve/kserve .+ at commit [0-9a-f]{40}", comment), path


# --- the kustomization ------------------------------------------------------------------------
def test_kustomization_lists_every_manifest_once() -> None:
    kustomization = yaml.safe_load((K8S_DIR / KUSTOMIZATION).read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    present = {p.name for p in K8S_DIR.glob("*.yaml")} - {KUSTOMIZATION} - OPTIONAL_K8S
    assert set(listed) == present
    assert [image["name"] for image in kustomization["images"]] == ["bnnserve"]


# --- how the objects fit together -------------------------------------------------------------
def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def test_selectors_and_targets_point_at_the_server_pods() -> None:
    objects = all_objects()
    deployment = find("Deployment", objects)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert find("Service", objects)["spec"]["selector"] == selector
    assert find("PodDisruptionBudget", objects)["spec"]["selector"]["matchLabels"] == selector
    hpas = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    assert len(hpas) == 2
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert hpa["spec"]["minReplicas"] >= 2  # the PDB's minAvailable 1 leaves room to drain


def test_server_container_is_non_root_read_only_with_probes_and_limits() -> None:
    deployment = find("Deployment")
    spec = pod_spec(deployment)
    (server,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    for probe, path in V2_PROBES.items():
        assert server[probe]["httpGet"]["path"] == path
    assert server["ports"][0]["containerPort"] == Settings.model_fields["port"].default
    for key in ("cpu", "memory"):
        assert key in server["resources"]["requests"] and key in server["resources"]["limits"]
    grace = float(env_of(server)["BNN_GRACEFUL_SHUTDOWN_S"])
    assert spec["terminationGracePeriodSeconds"] > grace


def test_kernel_cache_is_an_empty_dir_at_the_images_cache_path() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_cache = re.search(r"BNN_KERNEL_CACHE_DIR=(\S+)", dockerfile).group(1)
    deployment = find("Deployment")
    spec = pod_spec(deployment)
    volumes = {v["name"]: v for v in spec["volumes"]}
    (server,) = spec["containers"]
    assert env_of(server)["BNN_KERNEL_CACHE_DIR"] == image_cache
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[image_cache]]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    (copier,) = spec["initContainers"]  # seeds the emptyDir with the image's compiled kernels
    (copier_mount,) = copier["volumeMounts"]
    assert copier_mount["name"] == mounts[image_cache]
    assert f"{image_cache}/. {copier_mount['mountPath']}" in " ".join(copier["command"])


def test_model_repository_is_the_shared_read_write_many_claim() -> None:
    objects = all_objects()
    claim = find("PersistentVolumeClaim", objects)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    name = claim["metadata"]["name"]
    for kind in ("Deployment", "Job"):
        spec = pod_spec(find(kind, objects))
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v]  # fmt: skip
        assert claims == [name], kind
    (server,) = pod_spec(find("Deployment", objects))["containers"]
    models_mount = next(m for m in server["volumeMounts"] if m["name"] == "models")
    assert models_mount["mountPath"] == env_of(server)["BNN_MODEL_REPO"]
    assert find("InferenceService", objects)["spec"]["predictor"]["model"]["storageUri"] == (
        f"pvc://{name}"
    )


def test_every_bnn_variable_is_a_setting_the_server_knows() -> None:
    known = {f"BNN_{field.upper()}" for field in Settings.model_fields}
    containers = [
        *pod_spec(find("Deployment"))["containers"],
        *find("ServingRuntime")["spec"]["containers"],
        find("InferenceService")["spec"]["predictor"]["model"],
    ]
    for container in containers:
        names = {name for name in env_of(container) if name.startswith("BNN_")}
        assert names <= known, names - known
        settings = Settings(_env_file=None, **{
            name.removeprefix("BNN_").lower(): value
            for name, value in env_of(container).items() if name.upper() in known
        })  # fmt: skip
        assert settings is not None


def test_serving_runtime_serves_v2_on_its_declared_port_for_the_inference_service() -> None:
    runtime, service = find("ServingRuntime"), find("InferenceService")
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    port = int(env_of(container)["BNN_PORT"])
    assert container["ports"][0]["containerPort"] == port
    for probe, path in V2_PROBES.items():
        assert container[probe]["httpGet"] == {"path": path, "port": port}
    assert env_of(container)["BNN_MODEL_REPO"] == "/mnt/models"  # where KServe puts the model
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {
        f["name"] for f in runtime["spec"]["supportedModelFormats"]
    }
    assert model["protocolVersion"] == "v2"

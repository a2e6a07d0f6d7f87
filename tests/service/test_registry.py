"""Model repository behaviour through the app: hot swap, refusal of corrupt versions, explicit
load and unload, lazy loading of older versions, readiness."""

import dataclasses
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

from model.artifact import encode_artifact
from model.repository import MANIFEST_FILENAME, publish
from tests.model.factory import tiny_tensors
from tests.service.conftest import wait_ready
from tests.service.numpy_model import LinearModel, corrupt, expected_logits, publish_tiny

X = np.random.default_rng(0).integers(0, 17, (2, 36)).astype(np.float32)


def infer(client, path="/v2/models/tiny/infer"):
    body = {"inputs": [{"name": "input", "shape": [2, 36], "datatype": "FP32", "data": X.tolist()}]}
    return client.post(path, json=body)


def logits_of(response) -> np.ndarray:
    return np.reshape(response.json()["outputs"][0]["data"], (2, 3))


def spec_with_seed(seed):
    import dataclasses

    from tests.model.factory import tiny_spec

    return dataclasses.replace(tiny_spec(), provenance={"seed": seed})


def index(client):
    return {(r["name"], r["version"]): r for r in client.post("/v2/repository/index").json()}


def test_explicit_load_switches_to_the_new_version(client, repo):
    publish_tiny(repo, "tiny", seed=1)
    assert infer(client).json()["model_version"] == "1"  # no polling in this app
    response = client.post("/v2/repository/models/tiny/load")
    assert response.json() == {"name": "tiny", "version": "2", "state": "READY"}
    served = infer(client)
    assert served.json()["model_version"] == "2"
    np.testing.assert_allclose(logits_of(served), expected_logits(spec_with_seed(1), X), rtol=1e-6)
    rows = index(client)
    assert rows[("tiny", "2")]["state"] == "READY"
    assert rows[("tiny", "1")] == {
        "name": "tiny", "version": "1", "state": "UNAVAILABLE", "reason": "superseded by version 2"
    }  # fmt: skip
    # An older version is still served on request: loaded on first use.
    old = infer(client, "/v2/models/tiny/versions/1/infer")
    assert old.json()["model_version"] == "1"
    np.testing.assert_allclose(logits_of(old), expected_logits(spec_with_seed(0), X), rtol=1e-6)
    assert client.post("/v2/repository/index", json={"ready": True}).json() == [
        {"name": "tiny", "version": "1", "state": "READY", "reason": ""},
        {"name": "tiny", "version": "2", "state": "READY", "reason": ""},
    ]


def test_corrupt_new_version_is_refused_and_the_old_keeps_serving(client, repo):
    corrupt(publish_tiny(repo, "tiny", seed=1))
    response = client.post("/v2/repository/models/tiny/load")
    assert response.status_code == 400
    error = response.json()["error"]
    assert "ManifestError" in error and "sha256" in error and "version 1 keeps serving" in error
    assert infer(client).json()["model_version"] == "1"
    row = index(client)[("tiny", "2")]
    assert row["state"] == "UNAVAILABLE" and "sha256" in row["reason"]
    assert client.get("/v2/health/ready").status_code == 200
    assert 'bnn_model_load_failures_total{model="tiny"} 1.0' in client.get("/metrics").text
    # Asking for the refused version names the reason instead of retrying the load.
    refused = infer(client, "/v2/models/tiny/versions/2/infer")
    assert refused.status_code == 503 and "sha256" in refused.json()["error"]


def test_poller_picks_up_new_versions_without_a_request(make_client, repo):
    client = make_client(poll_interval_s=0.1)
    publish_tiny(repo, "tiny", seed=5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and infer(client).json()["model_version"] != "2":
        time.sleep(0.05)
    assert infer(client).json()["model_version"] == "2"


def test_hot_swap_under_load_fails_no_request(make_client, repo):
    client = make_client(
        poll_interval_s=0.05,
        loader=lambda p, device, **options: LinearModel(p, device, 0.002, **options),
    )
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            response = infer(client)
            statuses.append(response.status_code)
            versions.add(response.json().get("model_version", "?"))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for seed in (1, 2):
        time.sleep(0.3)
        publish_tiny(repo, "tiny", seed=seed)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert versions == {"1", "2", "3"}
    assert len(statuses) > 50 and set(statuses) == {200}


def test_unload_then_load(client):
    assert client.post("/v2/repository/models/tiny/unload").json() == {
        "name": "tiny", "state": "UNAVAILABLE"
    }  # fmt: skip
    response = infer(client)
    assert response.status_code == 503
    assert response.json() == {"error": "model 'tiny' was unloaded"}
    assert response.headers["retry-after"] == "1"
    assert client.get("/v2/models/tiny/ready").status_code == 400
    assert client.get("/v2/health/ready").status_code == 400  # nothing serves any more
    assert client.post("/v2/repository/models/tiny/load").status_code == 200
    assert infer(client).status_code == 200


def test_repository_errors(client):
    assert client.post("/v2/repository/models/ghost/load").status_code == 404
    assert client.post("/v2/repository/models/ghost/unload").status_code == 404
    bad = client.post("/v2/repository/models/.x/load")
    assert bad.status_code == 400 and "invalid model name" in bad.json()["error"]
    assert client.post("/v2/repository/index", content=b"[1]").status_code == 400


def test_not_ready_until_loaded_and_warmed(make_client, repo):
    gate = threading.Event()

    class SlowToLoad(LinearModel):
        def warmup(self, batch_sizes=(1, 64)):
            gate.wait(10)
            return super().warmup(batch_sizes)

    client = make_client(loader=SlowToLoad, wait=False)
    time.sleep(0.2)
    assert client.get("/v2/health/ready").status_code == 400
    assert client.get("/v2/health/live").status_code == 200
    response = infer(client)
    assert response.status_code == 503 and "loading" in response.json()["error"]
    assert index(client)[("tiny", "1")]["state"] == "LOADING"
    gate.set()
    wait_ready(client)
    assert infer(client).status_code == 200


def test_configured_model_that_is_missing_keeps_the_server_unready(make_client, repo):
    client = make_client(models=("tiny", "absent"), wait=False)
    deadline = time.monotonic() + 5
    while not client.app.state.registry.startup_complete and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.get("/v2/health/ready").status_code == 400
    assert infer(client).status_code == 200


def test_corrupt_only_version_at_start_serves_the_previous_one(make_client, repo):
    corrupt(publish_tiny(repo, "tiny", seed=3))
    client = make_client()
    assert infer(client).json()["model_version"] == "1"
    assert index(client)[("tiny", "2")]["state"] == "UNAVAILABLE"


def test_a_loader_that_crashes_refuses_the_version_instead_of_hanging(make_client, repo):
    publish_tiny(repo, "tiny", seed=1)

    def loader(path, device, **options):
        if "/2/" in str(path):
            raise ValueError("numba exploded")
        return LinearModel(path, device, **options)

    client = make_client(loader=loader)
    assert infer(client).json()["model_version"] == "1"
    row = index(client)[("tiny", "2")]
    assert row["state"] == "UNAVAILABLE"
    assert row["reason"] == "ValueError: numba exploded"


# --- a hostile repository: planted files, stuck loads, time limits -----------------------------
def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


def serving_version(client, name: str = "tiny") -> str | None:
    response = infer(client, f"/v2/models/{name}/infer")
    return response.json().get("model_version") if response.status_code == 200 else None


def load_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"load {name}/")]


def test_an_artifact_the_manifest_does_not_list_is_never_served(client, repo):
    spec = spec_with_seed(0)
    reversed_labels = dataclasses.replace(spec, labels=tuple(reversed(spec.labels)))
    version = publish(repo, "tiny", {"model.safetensors": b"x", "metrics.json": b"{}"})
    version.artifact_path.write_bytes(encode_artifact(reversed_labels, tiny_tensors(0)))
    manifest = json.loads((version.path / MANIFEST_FILENAME).read_text())
    del manifest["files"]["model.safetensors"]
    (version.path / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    response = client.post("/v2/repository/models/tiny/load")
    assert response.status_code == 400
    assert "does not list model.safetensors" in response.json()["error"]
    assert infer(client).json()["model_version"] == "1"
    assert client.get("/v2/models/tiny").json()["parameters"]["labels"] == ["a", "b", "c"]
    assert index(client)[("tiny", "2")]["state"] == "UNAVAILABLE"
    refused = infer(client, "/v2/models/tiny/versions/2/infer")
    assert refused.status_code == 503 and "does not list model.safetensors" in refused.text


@pytest.mark.timeout(60)
def test_fifos_planted_in_one_model_block_nothing(make_client, repo):
    fifo_artifact = publish_tiny(repo, "planted", seed=1)  # manifest lists no model.safetensors
    manifest = json.loads((fifo_artifact.path / MANIFEST_FILENAME).read_text())
    del manifest["files"]["model.safetensors"]
    (fifo_artifact.path / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    fifo_artifact.artifact_path.unlink()
    os.mkfifo(fifo_artifact.artifact_path)
    fifo_manifest = publish_tiny(repo, "planted", seed=2)
    (fifo_manifest.path / MANIFEST_FILENAME).unlink()
    os.mkfifo(fifo_manifest.path / MANIFEST_FILENAME)
    client = make_client(poll_interval_s=0.05)
    rows = index(client)
    assert "does not list model.safetensors" in rows[("planted", "1")]["reason"]
    assert "NotARegularFileError" in rows[("planted", "2")]["reason"]
    assert "manifest.json is a FIFO" in rows[("planted", "2")]["reason"]
    publish_tiny(repo, "tiny", seed=1)  # another model's new version is picked up
    wait_until(lambda: serving_version(client) == "2", what="tiny version 2 serving")
    assert client.post("/v2/repository/models/planted/unload").status_code == 200
    # Leaving the with-block of make_client (shutdown) completes: checked by the timeout.


@pytest.mark.timeout(60)
def test_a_stuck_load_delays_no_other_model_no_unload_and_no_shutdown(make_client, repo):
    publish_tiny(repo, "stuck", seed=1)
    gate = threading.Event()

    def loader(path, device, **options):
        if "/stuck/" in str(path):
            gate.wait()  # like an open() that never returns
        return LinearModel(path, device, **options)

    try:
        client = make_client(loader=loader, poll_interval_s=0.05, wait=False)
        wait_until(lambda: serving_version(client) == "1", what="tiny serving")
        wait_until(lambda: load_threads("stuck"), what="the stuck load")
        assert index(client)[("stuck", "1")]["state"] == "LOADING"
        publish_tiny(repo, "tiny", seed=1)
        wait_until(lambda: serving_version(client) == "2", what="tiny version 2 serving")
        response = client.post("/v2/repository/models/stuck/unload")
        assert response.json() == {"name": "stuck", "state": "UNAVAILABLE"}
        assert index(client)[("stuck", "1")] == {
            "name": "stuck", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"
        }  # fmt: skip
        assert load_threads("stuck")  # abandoned, still blocked
        client.__exit__(None, None, None)  # shutdown does not wait for it
        assert load_threads("stuck") and all(t.daemon for t in load_threads("stuck"))
    finally:
        gate.set()


def test_a_load_past_the_time_limit_is_refused_and_its_late_result_discarded(make_client, repo):
    gate = threading.Event()

    def loader(path, device, **options):
        if "/tiny/2/" in str(path):
            gate.wait(30)
        return LinearModel(path, device, **options)

    client = make_client(loader=loader, load_timeout_s=0.3)
    publish_tiny(repo, "tiny", seed=1)
    response = client.post("/v2/repository/models/tiny/load")
    assert response.status_code == 400
    error = response.json()["error"]
    assert "load timed out after 0.3 s" in error and "version 1 keeps serving" in error
    row = index(client)[("tiny", "2")]
    assert row["state"] == "UNAVAILABLE"
    assert row["reason"].startswith("LoadTimeoutError: load timed out after 0.3 s")
    gate.set()
    for thread in load_threads("tiny"):
        thread.join(10)
    client.get("/v2/health/live")  # let the loop run the thread's late callback
    assert infer(client).json()["model_version"] == "1"
    assert index(client)[("tiny", "2")]["state"] == "UNAVAILABLE"


# --- version lifecycle -----------------------------------------------------------------------
def test_deleting_the_serving_version_falls_back_then_unloads(make_client, repo):
    client = make_client(poll_interval_s=0.05)
    second = publish_tiny(repo, "tiny", seed=1)
    wait_until(lambda: serving_version(client) == "2", what="version 2 serving")
    shutil.rmtree(second.path)
    wait_until(lambda: serving_version(client) == "1", what="fall-back to version 1")
    np.testing.assert_allclose(logits_of(infer(client)), expected_logits(spec_with_seed(0), X))
    assert set(index(client)) == {("tiny", "1")}
    load = client.post("/v2/repository/models/tiny/load").json()
    assert load == {"name": "tiny", "version": "1", "state": "READY"}
    shutil.rmtree(repo / "tiny" / "1")
    wait_until(lambda: infer(client).status_code == 404, what="model gone")
    assert client.get("/v2/health/ready").status_code == 400  # "false"
    assert index(client) == {}


def test_deleting_the_serving_version_skips_refused_versions(make_client, repo):
    corrupt(publish_tiny(repo, "tiny", seed=1))
    third = publish_tiny(repo, "tiny", seed=2)
    client = make_client()
    assert serving_version(client) == "3"
    shutil.rmtree(third.path)
    response = client.post("/v2/repository/models/tiny/load")  # no poller: an explicit scan
    assert response.status_code == 400  # version 2 retried and refused again...
    assert serving_version(client) == "1"  # ...and version 1 serves
    assert "version 1 keeps serving" in response.json()["error"]


def test_deleting_every_loadable_version_unloads_the_model(make_client, repo):
    second = publish_tiny(repo, "tiny", seed=1)
    client = make_client(poll_interval_s=0.05)
    corrupt(repo_version(repo, 1))
    assert serving_version(client) == "2"
    shutil.rmtree(second.path)
    wait_until(lambda: infer(client).status_code == 503, what="model unloaded")
    error = infer(client).json()["error"]
    assert "version 2 was removed from the repository and no other version loads" in error
    assert "sha256" in error


def repo_version(repo, version: int):
    from model.repository import resolve

    return resolve(repo, "tiny", version)


def test_load_honours_a_requested_version_and_pins_it(make_client, repo):
    client = make_client()
    publish_tiny(repo, "tiny", seed=1)
    assert client.post("/v2/repository/models/tiny/load").json()["version"] == "2"
    pinned = client.post("/v2/repository/models/tiny/load", json={"parameters": {"version": "1"}})
    assert pinned.json() == {"name": "tiny", "version": "1", "state": "READY"}
    assert serving_version(client) == "1"
    registry = client.app.state.registry
    client.portal.call(registry.poll)  # a scan leaves the pinned version serving
    assert serving_version(client) == "1"
    assert client.post("/v2/repository/models/tiny/load").json()["version"] == "2"  # unpins
    by_number = client.post("/v2/repository/models/tiny/load", json={"parameters": {"version": 1}})
    assert by_number.json()["version"] == "1"
    missing = client.post("/v2/repository/models/tiny/load", json={"parameters": {"version": 9}})
    assert missing.status_code == 404 and "no version 9" in missing.json()["error"]
    for bad in ("x", "9\n", 0, True, 1.5):
        response = client.post(
            "/v2/repository/models/tiny/load", json={"parameters": {"version": bad}}
        )
        assert response.status_code == 400, bad
        assert "parameters.version: expected a positive integer" in response.json()["error"]
    assert client.post("/v2/repository/models/tiny/load", content=b"[").status_code == 400


def test_a_version_loaded_on_request_then_loaded_again_is_compiled_once(make_client, repo):
    loads: list[str] = []

    def loader(path, device, **options):
        loads.append(path.parent.name)
        return LinearModel(path, device, **options)

    client = make_client(loader=loader)
    publish_tiny(repo, "tiny", seed=1)
    assert infer(client, "/v2/models/tiny/versions/2/infer").json()["model_version"] == "2"
    registry = client.app.state.registry
    on_request, old = registry.get("tiny", 2), registry.get("tiny")
    assert client.post("/v2/repository/models/tiny/load").json()["version"] == "2"
    assert loads == ["1", "2"]
    assert registry.get("tiny") is on_request  # the same engine and batcher, not a copy
    client.__exit__(None, None, None)
    assert on_request.batcher._closing and old.batcher._closing


def test_auto_device_choice_and_its_figures_are_in_the_model_metadata(make_client):
    """The real engine under BNN_DEVICE=auto: metadata says which device and why."""
    client = make_client(loader=None, device="auto", max_batch_size=8)
    choice = client.get("/v2/models/tiny").json()["parameters"]["device_choice"]
    assert choice["device"] in ("cpu", "cuda:0")
    assert choice["reason"]
    if choice["device"] == "cpu" and choice["gpu"] is None:  # no GPU here: nothing timed
        assert choice["cpu_ms_per_call"] == choice["gpu_ms_per_call"] == {}
    else:  # timed at the served batch sizes (1 and BNN_MAX_BATCH_SIZE)
        assert set(choice["cpu_ms_per_call"]) == {"1", "8"}


def test_a_named_device_has_no_device_choice(make_client):
    client = make_client(loader=None, device="cpu")
    assert client.get("/v2/models/tiny").json()["parameters"]["device_choice"] is None


def test_a_model_on_a_gpu_never_computes_on_the_event_loop(repo):
    """inline_compute_ms applies to CPU models only: a GPU call waits on the device."""
    import types

    from service.registry import inline_below_s
    from tests.service.conftest import make_settings

    settings = make_settings(repo, inline_compute_ms=5.0)
    assert inline_below_s(settings, types.SimpleNamespace(device="cpu")) == 0.005
    assert inline_below_s(settings, types.SimpleNamespace(device="cuda:0")) == 0.0

"""Model repository behaviour through the app: hot swap, refusal of corrupt versions, explicit
load and unload, lazy loading of older versions, readiness."""

import threading
import time

import numpy as np

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
    assert client.get("/v2/models/tiny/ready").status_code == 503
    assert client.get("/v2/health/ready").status_code == 503  # nothing serves any more
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
    assert client.get("/v2/health/ready").status_code == 503
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
    assert client.get("/v2/health/ready").status_code == 503
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

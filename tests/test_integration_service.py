"""End to end: ``python -m service`` in a subprocess on models the training package has just
trained and published; every output compared with the eager PyTorch model in eval mode."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import httpx
import numpy as np
import pytest

from model.repository import ModelVersion
from tests.service.live import (
    ServiceProcess,
    eager_logits,
    random_mlp,
    train_and_publish,
)
from tests.service.numpy_model import corrupt

pytestmark = pytest.mark.slow
KEY = "integration-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A repository with a trained mlp and cnn (digits), plus their eager models."""
    repo = tmp_path_factory.mktemp("repo")
    models = {arch: train_and_publish(repo, f"digits-{arch}", arch) for arch in ("mlp", "cnn")}
    from training.data import load_dataset

    x = load_dataset("digits").test.x  # (360, 1, 8, 8) float32, integer values 0..16
    return repo, {arch: model for arch, (_, model) in models.items()}, x


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    repo, _, _ = trained
    log = tmp_path_factory.mktemp("logs") / "server.log"
    service = ServiceProcess(
        repo, log, api_key=KEY, max_body_bytes=1 << 20, poll_interval_s=0.2, max_queue_delay_ms=1
    )
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        yield client


def v2_body(x: np.ndarray, datatype="FP32", flat=False, **extra) -> dict:
    data = x.astype(np.float64 if datatype.startswith("FP") else np.int64)
    data = data.ravel().tolist() if flat else data.tolist()
    return {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": datatype, "data": data}],
        **extra,
    }


def assert_matches_eager(logits: np.ndarray, model, x: np.ndarray) -> None:
    want = eager_logits(model, x)
    np.testing.assert_array_equal(logits.argmax(1), want.argmax(1))
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


# --- correctness over both protocols and encodings ------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize(("datatype", "flat"), [("FP32", False), ("FP32", True), ("UINT8", False)])
def test_v2_json_matches_eager(trained, http, arch, batch, datatype, flat):
    _, models, x_all = trained
    x = x_all[batch : 2 * batch]
    response = http.post(f"/v2/models/digits-{arch}/infer", json=v2_body(x, datatype, flat, id="q"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (f"digits-{arch}", "1", "q")
    outputs = {out["name"]: out for out in body["outputs"]}
    logits = np.asarray(outputs["logits"]["data"], np.float32).reshape(batch, 10)
    assert_matches_eager(logits, models[arch], x)
    assert outputs["predicted_class"]["datatype"] == "INT64"
    assert outputs["predicted_class"]["data"] == eager_logits(models[arch], x).argmax(1).tolist()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize(("datatype", "dtype"), [("FP32", "<f4"), ("UINT8", "u1"), ("FP64", "<f8")])
def test_v2_binary_matches_eager(trained, http, arch, datatype, dtype):
    _, models, x_all = trained
    x = x_all[:100]
    blob = x.astype(dtype).tobytes()
    header = json.dumps(
        {
            "inputs": [{"name": "input", "shape": [100, 64], "datatype": datatype,
                        "parameters": {"binary_data_size": len(blob)}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                        {"name": "predicted_class", "parameters": {"binary_data": True}}],
        }
    ).encode()  # fmt: skip
    # No Content-Type, as some V2 clients send.
    response = http.post(
        f"/v2/models/digits-{arch}/infer",
        content=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    meta = json.loads(response.content[:length])
    sizes = [out["parameters"]["binary_data_size"] for out in meta["outputs"]]
    assert sizes == [100 * 10 * 4, 100 * 8]
    tail = response.content[length:]
    logits = np.frombuffer(tail[: sizes[0]], "<f4").reshape(100, 10)
    assert_matches_eager(logits, models[arch], x)
    classes = np.frombuffer(tail[sizes[0] :], "<i8")
    np.testing.assert_array_equal(classes, logits.argmax(1))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("batch", [1, 32])
def test_simple_rest_matches_eager(trained, http, arch, batch):
    _, models, x_all = trained
    x = x_all[-batch:]
    response = http.post(f"/v1/models/digits-{arch}:predict", json={"instances": x.tolist()})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    want = eager_logits(models[arch], x)
    shifted = np.exp(want - want.max(1, keepdims=True))
    probabilities = shifted / shifted.sum(1, keepdims=True)
    for prediction, row, p in zip(predictions, want, probabilities, strict=True):
        assert prediction["class_index"] == int(row.argmax())
        assert prediction["label"] == str(row.argmax())
        np.testing.assert_allclose(list(prediction["probabilities"].values()), p, atol=1e-5)


def test_concurrent_requests_are_batched_and_correct(trained, http, server):
    _, models, x_all = trained
    want = eager_logits(models["mlp"], x_all)

    async def one(client, i):
        response = await client.post(
            "/v2/models/digits-mlp/infer",
            json=v2_body(x_all[i : i + 1], outputs=[{"name": "logits"}]),
        )
        return i, np.asarray(response.json()["outputs"][0]["data"], np.float32)

    async def many():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    for i, logits in asyncio.run(many()):
        np.testing.assert_allclose(logits, want[i], rtol=1e-4, atol=1e-4)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'bnn_batch_size_rows_bucket{le="1.0",model="digits-mlp",version="1"}' in metrics


# --- metadata, health, docs ------------------------------------------------------------------------
def test_metadata_health_and_docs(http):
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    meta = http.get("/v2/models/digits-cnn").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["parameters"]["labels"] == [str(i) for i in range(10)]
    assert http.get("/v2/models/digits-cnn/versions/1/ready").json()["ready"] is True
    assert http.get("/v2/models/digits-mlp/config").json()["max_batch_size"] == 64
    assert "/v2/repository/index" in http.get("/openapi.json").json()["paths"]
    assert "bnn_models_loaded" in http.get("/metrics").text


# --- each error status over HTTP ---------------------------------------------------------------
def test_error_statuses(trained, http, server):
    _, _, x = trained
    good = v2_body(x[:2])
    cases = [
        (http.post("/v2/models/digits-mlp/infer", json=v2_body(x[:2, :, :4])), 400, "expected shape"),
        (http.post("/v2/models/digits-mlp/infer", content=b"{"), 400, "malformed"),
        (httpx.post(f"{server.url}/v2/models/digits-mlp/infer", json=good), 401, "missing API key"),
        (http.post("/v2/models/unknown/infer", json=good), 404, "not found"),
        (http.post("/v2/models/digits-mlp/versions/9/infer", json=good), 404, "no version 9"),
        (http.post("/v2/models/digits-mlp/infer", content=b"0" * (2 << 20)), 413, "exceeds"),
    ]  # fmt: skip
    for response, status, fragment in cases:
        assert response.status_code == status, response.text
        assert fragment in response.json()["error"], response.text
    nan = json.dumps(v2_body(x[:2])).replace("16.0", "NaN", 1)
    response = http.post("/v2/models/digits-mlp/infer", content=nan)
    assert response.status_code == 400 and "NaN" in response.json()["error"]


def test_unloaded_model_is_503_and_comes_back(trained, http):
    repo, _, x = trained
    shutil.copytree(repo / "digits-mlp", repo / "spare")
    deadline = time.monotonic() + 10
    while http.post("/v2/models/spare/infer", json=v2_body(x[:1])).status_code != 200:
        assert time.monotonic() < deadline, "the poller did not load the new model"
        time.sleep(0.1)
    assert http.post("/v2/repository/models/spare/unload").status_code == 200
    response = http.post("/v2/models/spare/infer", json=v2_body(x[:1]))
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    time.sleep(0.5)  # the poller leaves an unloaded model alone
    assert http.post("/v2/models/spare/infer", json=v2_body(x[:1])).status_code == 503
    assert http.post("/v2/repository/models/spare/load").status_code == 200
    assert http.post("/v2/models/spare/infer", json=v2_body(x[:1])).status_code == 200


# --- hot reload --------------------------------------------------------------------------------
def test_hot_reload_under_load_and_corrupt_version_refused(trained, http, server):
    """v1 = the mlp; v2 (the cnn's artifact) is published while clients hammer the endpoint;
    no request fails and v2's answers are the cnn's. A corrupt v3 is refused, v2 keeps serving."""
    repo, models, x_all = trained
    x = x_all[:4]
    shutil.copytree(repo / "digits-mlp", repo / "swap")
    deadline = time.monotonic() + 10
    while http.post("/v2/models/swap/infer", json=v2_body(x)).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    results: list[tuple[int, str, list]] = []
    stop = threading.Event()

    def hammer():
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
            while not stop.is_set():
                response = client.post(
                    "/v2/models/swap/infer", json=v2_body(x, outputs=[{"name": "logits"}])
                )
                body = response.json()
                results.append(
                    (response.status_code, body.get("model_version"), body.get("outputs"))
                )

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    staging = repo / ".incoming"
    shutil.copytree(repo / "digits-cnn" / "1", staging)
    staging.rename(repo / "swap" / "2")  # published atomically, as the repository does
    deadline = time.monotonic() + 15
    while not any(version == "2" for _, version, _ in results[-20:]):
        assert time.monotonic() < deadline, "version 2 never served"
        time.sleep(0.05)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()

    assert {status for status, _, _ in results} == {200}, [r for r in results if r[0] != 200][:3]
    assert {version for _, version, _ in results} == {"1", "2"}
    for arch, version in (("mlp", "1"), ("cnn", "2")):
        served = next(out for _, v, out in results if v == version)
        logits = np.asarray(served[0]["data"], np.float32).reshape(4, 10)
        assert_matches_eager(logits, models[arch], x)

    shutil.copytree(repo / "digits-mlp" / "1", staging)
    corrupt(ModelVersion("swap", 3, staging))
    staging.rename(repo / "swap" / "3")
    deadline = time.monotonic() + 10
    while True:
        index = http.post("/v2/repository/index").json()
        rows = {r["version"]: r for r in index if r["name"] == "swap"}
        if "sha256" in rows.get("3", {}).get("reason", ""):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    assert rows["3"]["state"] == "UNAVAILABLE"
    assert rows["2"]["state"] == "READY"
    assert http.post("/v2/models/swap/infer", json=v2_body(x)).json()["model_version"] == "2"
    assert '"message": "model version refused"' in server.logs()


# --- overload and graceful shutdown ------------------------------------------------------------------
def _binary_request(x: np.ndarray) -> tuple[bytes, dict]:
    blob = x.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": len(blob)}}],
            "outputs": [{"name": "predicted_class"}],
        }
    ).encode()  # fmt: skip
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


@pytest.fixture(scope="module")
def heavy_repo(tmp_path_factory):
    """A random-weight 3×2048 mlp: heavy enough that a 1,024-row request takes milliseconds."""
    repo = tmp_path_factory.mktemp("heavy")
    random_mlp(repo, "heavy", hidden=(2048, 2048, 2048))
    return repo


def test_overload_gives_503_with_retry_after(heavy_repo, tmp_path):
    service = ServiceProcess(
        heavy_repo, tmp_path / "log", max_queue_size=1, max_batch_size=1024,
        max_request_batch=1024,
    )  # fmt: skip
    try:
        service.wait_ready()
        x = np.random.default_rng(0).integers(0, 17, (1024, 1, 8, 8))
        body, headers = _binary_request(x)

        async def burst():
            async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
                return await asyncio.gather(
                    *(client.post("/v2/models/heavy/infer", content=body, headers=headers)
                      for _ in range(24))
                )  # fmt: skip

        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 503}, statuses
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["Retry-After"] == "1"
        assert "overloaded" in rejected.json()["error"]
        metrics = httpx.get(f"{service.url}/metrics").text
        assert 'status="503"' in metrics
    finally:
        service.stop()


def test_sigterm_drains_in_flight_requests_and_exits_0(heavy_repo, tmp_path):
    service = ServiceProcess(heavy_repo, tmp_path / "log", max_batch_size=1024)
    try:
        service.wait_ready()
        x = np.random.default_rng(1).integers(0, 17, (1024, 1, 8, 8))
        body, headers = _binary_request(x)
        first_done = threading.Event()
        completed: list[float] = []

        async def in_flight():
            async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:

                async def one():
                    response = await client.post(
                        "/v2/models/heavy/infer", content=body, headers=headers
                    )
                    completed.append(time.monotonic())
                    first_done.set()
                    return response.status_code

                return await asyncio.gather(*(one() for _ in range(12)))

        statuses: list[int] = []
        sender = threading.Thread(target=lambda: statuses.extend(asyncio.run(in_flight())))
        sender.start()
        assert first_done.wait(30)
        signalled_at = time.monotonic()
        code = service.terminate()
        sender.join(60)
        assert statuses == [200] * 12
        assert sum(t > signalled_at for t in completed) >= 6  # these were still in flight
        assert code == 0, service.logs()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{service.url}/v2/health/live", timeout=2)
    finally:
        service.stop()

"""Hostile model versions through the app: a version whose checksums are valid but whose numbers
are poison, that overflows on its warm-up batch, or that needs too much memory is refused with
its reason in the repository index, while the previous version keeps answering correctly; an
input that drives the logits out of range is the client's 400; no response carries NaN."""

from __future__ import annotations

import re

import numpy as np
import pytest

from model import load_model
from model.artifact import encode_artifact
from model.engine.memory import MemoryLimit
from model.engine.warm import random_tensors
from model.repository import publish
from service.errors import NonFiniteResponseError, status_for
from service.protocol.codec import encode_infer_response
from service.tensors import Tensor
from tests.model.engine.test_memory import padded_conv_spec
from tests.model.factory import replace_tensor, tiny_spec, tiny_tensors
from tests.service.numpy_model import LinearModel

X = np.random.default_rng(0).integers(0, 17, (2, 1, 6, 6)).astype(np.float32)


def infer(client, x: np.ndarray = X):
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    return client.post("/v2/models/tiny/infer", json=body)


def index(client) -> dict[str, dict]:
    return {
        r["version"]: r for r in client.post("/v2/repository/index").json() if r["name"] == "tiny"
    }


def poison(name: str, index_: int, value: float) -> bytes:
    """The tiny model with one value replaced, checksums (and then the manifest) valid."""
    tensors = tiny_tensors(1)
    array = tensors[name].copy()
    array.reshape(-1)[index_] = value
    return replace_tensor(encode_artifact(tiny_spec(), tensors), name, array)


@pytest.fixture
def engine_client(make_client, repo):
    """The app with the real compiled engine serving tiny version 1."""
    return make_client(loader=load_model)


@pytest.mark.parametrize(
    ("artifact", "reason"),
    [
        (lambda: poison("fc.bias", 1, np.nan), "NonFiniteTensorError: .*fc.bias"),
        (lambda: poison("bn1.running_var", 4, -1.0), "InvalidBatchNormError: .*bn1.*channel 4"),
        (lambda: poison("conv0.weight", 0, np.inf), "NonFiniteTensorError: .*conv0.weight"),
        # finite weights whose sums overflow float32 on the warm-up batch
        (
            lambda: replace_tensor(
                encode_artifact(tiny_spec(), tiny_tensors(1)),
                "fc.weight",
                np.full((3, 630), 3e38, np.float32),
            ),
            "NonFiniteOutputError: .*expected finite logits",
        ),
    ],
    ids=["nan-output-bias", "negative-variance", "infinite-weight", "overflow-at-warm-up"],
)
def test_a_poisoned_version_is_refused_and_the_old_one_keeps_serving(
    engine_client, repo, artifact, reason
):
    before = infer(engine_client)
    assert before.status_code == 200 and before.json()["model_version"] == "1"
    publish(repo, "tiny", {"model.safetensors": artifact()})

    response = engine_client.post("/v2/repository/models/tiny/load")

    assert response.status_code == 400
    assert "version 2 refused" in response.json()["error"]
    assert "version 1 keeps serving" in response.json()["error"]
    rows = index(engine_client)
    assert rows["2"]["state"] == "UNAVAILABLE"
    assert re.search(reason, rows["2"]["reason"]), rows["2"]["reason"]
    assert rows["1"]["state"] == "READY"
    after = infer(engine_client)
    assert after.status_code == 200 and after.json()["model_version"] == "1"
    assert after.json()["outputs"] == before.json()["outputs"]


def test_a_version_too_large_for_the_memory_limit_is_refused(make_client, repo):
    client = make_client(max_model_memory_bytes=1024**3, max_batch_size=64, max_request_batch=512)
    spec = padded_conv_spec(300)  # 16.5 MiB of activations per instance
    publish(repo, "tiny", {"model.safetensors": encode_artifact(spec, random_tensors(spec))})
    assert client.post("/v2/repository/models/tiny/load").status_code == 400
    reason = index(client)["2"]["reason"]
    assert reason.startswith("ModelTooLargeError: ")
    assert "at a batch of 512" in reason and "the limit is 1.00 GiB" in reason  # max(64, 512)
    assert infer(client).json()["model_version"] == "1"


def test_the_registry_hands_the_memory_limit_to_the_loader(make_client):
    limits = []

    def loader(path, device, memory_limit):
        limits.append(memory_limit)
        return LinearModel(path, device, memory_limit=memory_limit)

    make_client(
        loader=loader, max_model_memory_bytes=123456789, max_batch_size=300, max_request_batch=100
    )
    assert limits == [MemoryLimit(max_bytes=123456789, max_batch=300)]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_an_input_that_drives_the_logits_out_of_range_is_a_400(client):
    """Finite float32 values, far outside value_range: the sums overflow to infinity."""
    x = np.full((2, 1, 6, 6), 3e38, np.float32)
    response = infer(client, x)
    assert response.status_code == 400
    assert "instance 0 drives the model's logits out of float32 range" in response.json()["error"]
    assert "[0.0, 16.0]" in response.json()["error"]
    assert infer(client).status_code == 200


def test_the_json_encoder_refuses_nan_as_a_server_error():
    logits = Tensor("logits", "FP32", np.array([[0.5, np.nan, 1.0]], np.float32))
    with pytest.raises(NonFiniteResponseError, match="output 'logits'.*NaN or infinity") as err:
        encode_infer_response(
            model_name="tiny", model_version="1", request_id=None, outputs=[logits], binary=set()
        )
    assert status_for(err.value) == 500


def test_the_memory_limit_setting(monkeypatch):
    from pydantic import ValidationError

    from service.settings import Settings, describe_validation_error

    monkeypatch.delenv("BNN_MAX_MODEL_MEMORY_BYTES", raising=False)
    assert Settings(_env_file=None).max_model_memory_bytes == 4 * 1024**3
    monkeypatch.setenv("BNN_MAX_MODEL_MEMORY_BYTES", "536870912")
    assert Settings(_env_file=None).max_model_memory_bytes == 512 * 1024**2
    monkeypatch.setenv("BNN_MAX_MODEL_MEMORY_BYTES", "0")
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None)
    assert "BNN_MAX_MODEL_MEMORY_BYTES='0': Input should be greater" in describe_validation_error(
        info.value
    )

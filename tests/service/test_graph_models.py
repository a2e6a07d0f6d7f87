"""Format v2 graphs through the app: model metadata describes the layer graph (v1 chains too),
and a residual model is served as the engine computes it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from model import load_model
from model.artifact import encode_artifact
from model.repository import publish
from tests.model.engine.reference import bireal_spec, random_tensors

SPEC = bireal_spec(input_shape=(1, 8, 8), widths=(4, 8), reactnet=True, concat=True)
TENSORS = random_tensors(SPEC, np.random.default_rng(0))


@pytest.fixture
def graph_repo(repo):
    """The repository with tiny (a v1 chain) and ``bireal`` (a v2 ReActNet-shaped graph)."""
    publish(repo, "bireal", {"model.safetensors": encode_artifact(SPEC, TENSORS)})
    return repo


def test_a_v1_chains_metadata_names_each_previous_layer(client):
    meta = client.get("/v2/models/tiny").json()
    assert meta["parameters"]["format_version"] == 1
    assert meta["parameters"]["architecture"] == "cnn"
    graph = meta["graph"]
    assert [layer["name"] for layer in graph][:3] == ["conv0", "bn0", "conv1"]
    assert graph[0] == {
        "name": "conv0",
        "kind": "conv2d",
        "inputs": ["@input"],
        "shape": [-1, 5, 6, 6],
    }
    assert all(layer["inputs"] == [prev["name"]] for prev, layer in itertools.pairwise(graph))
    assert graph[-1]["shape"] == meta["outputs"][0]["shape"] == [-1, 3]  # the logits


def test_a_v2_models_metadata_describes_its_graph(make_client, graph_repo):
    client = make_client()
    for path in ("/v2/models/bireal", "/v2/models/bireal/versions/1"):
        meta = client.get(path).json()
        assert meta["parameters"]["format_version"] == 2
        assert meta["parameters"]["architecture"] == "reactnet"
        layers = {layer["name"]: layer for layer in meta["graph"]}
        assert [layer["name"] for layer in meta["graph"]] == [x.name for x in SPEC.layers]
        # a residual sum of the branch and the downsampling shortcut
        assert layers["s1b0_add"] == {
            "name": "s1b0_add",
            "kind": "add",
            "inputs": ["s1b0_bn", "s1b0_down_bn"],
            "shape": [-1, 8, 4, 4],
        }
        # RSign: the shift takes the previous block's RPReLU output; the shortcut pool too
        assert layers["s1b0_rsign"]["inputs"] == ["s0b0_rp_out"]
        assert layers["s1b0_pool"]["inputs"] == ["s0b0_rp_out"]
        assert layers["join"]["kind"] == "concat" and layers["join"]["shape"] == [-1, 16, 4, 4]
        assert layers["gap"]["shape"] == [-1, 16]
        assert meta["graph"][-1]["shape"] == meta["outputs"][0]["shape"] == [-1, 10]
    assert (
        "graph"
        in client.get("/openapi.json").json()["components"]["schemas"]["ModelMetadataResponse"][
            "properties"
        ]
    )


def test_a_v2_model_is_served_as_the_engine_computes_it(make_client, graph_repo):
    client = make_client(loader=load_model, wait=False)
    response = client.post("/v2/repository/models/bireal/load")
    assert response.status_code == 200, response.text
    x = np.random.default_rng(1).integers(0, 17, (5, 1, 8, 8)).astype(np.float32)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    response = client.post("/v2/models/bireal/infer", json=body)
    assert response.status_code == 200, response.text
    logits = next(o for o in response.json()["outputs"] if o["name"] == "logits")
    expected = load_model(graph_repo / "bireal" / "1" / "model.safetensors").predict(x)
    np.testing.assert_array_equal(np.array(logits["data"], np.float32).reshape(5, 10), expected)

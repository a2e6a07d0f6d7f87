"""ONNX export: standard ops from the symbolics, and ONNX Runtime agreeing with the bnnserve
engine (same class on every digits test sample and on random inputs, logits within 1e−4 of each
row's largest) for every architecture; metadata, the Triton entry, and each bad input."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from model import InputSpec, load_model  # noqa: E402
from model.spec import Dense, Flatten, Layer, ModelSpec, Shape  # noqa: E402
from tests.model.engine.conftest import calibrate_batchnorm, export_random_model  # noqa: E402
from tests.model.factory import rewrite_metadata  # noqa: E402
from training.architectures import (  # noqa: E402
    ARCHITECTURES,
    BinaryNet,
    BiRealConfig,
    CNNConfig,
    MLPConfig,
    ReActNetConfig,
    build_model,
)
from training.blocks import Concat, GlobalAvgPool2d, Shift  # noqa: E402
from training.cli import main  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.functional import linear  # noqa: E402
from training.layers import BinaryLinear  # noqa: E402
from training.loop import train  # noqa: E402
from training.onnx_export import (  # noqa: E402
    MIN_OPSET,
    OnnxDependencyError,
    OutputPathError,
    UnsupportedLayerError,
    check_exportable,
    check_onnx,
    compare_with_engine,
    export_artifact_to_onnx,
    export_onnx,
    export_published,
    import_onnx,
    onnx_runtime_session,
    random_inputs,
    write_bytes,
)
from training.publish import publish_result  # noqa: E402
from training.quantizers import QUANTIZERS, Quantizer  # noqa: E402

pytestmark = pytest.mark.slow  # trains small models and runs ONNX Runtime

DIGITS = InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0), integer_valued=True)
DIGITS_SPEC = ModelSpec("digits", "none", DIGITS, tuple("0123456789"), (Flatten("flatten"),))
# One small config per architecture, trained for real on digits (a new architecture must be
# added here: test_every_architecture_is_covered).
TINY = {
    "mlp": MLPConfig(hidden=(64, 32)),
    "cnn": CNNConfig(stem_channels=8, channels=(16, 32), pool=(False, True), hidden=(32,)),
    "birealnet": BiRealConfig(stem_channels=8, channels=(8, 16), blocks=1),
    "reactnet": ReActNetConfig(stem_channels=8, channels=(8, 16), blocks=1),
}
# Random-weight models with calibrated BatchNorm: every quantizer, α on and off, pad ±1 and 0.
RANDOM_CONFIGS = [
    MLPConfig(hidden=(100, 70), activation_quantizer="clipped_ste", kernel_quantizer="approx_sign",
              scale=True),
    MLPConfig(hidden=(70,), activation_quantizer="stochastic_binary", kernel_quantizer="ste_sign"),
    CNNConfig(stem_channels=12, channels=(20, 33), pool=(True, False), hidden=(40,),
              activation_quantizer="swish_sign", kernel_quantizer="clipped_ste", pad_value=-1.0,
              scale=True),
    CNNConfig(stem_channels=12, channels=(20,), pool=(True,), activation_quantizer="stochastic_binary",
              kernel_quantizer="swish_sign", pad_value=0.0),
]  # fmt: skip
STANDARD_OPS = {
    "Add", "BatchNormalization", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv",
    "Flatten", "Gemm", "Greater", "GreaterOrEqual", "Identity", "MaxPool", "Mul", "Pad",
    "Reshape", "Slice", "Transpose", "Where",
    "AveragePool", "PRelu", "ReduceMean",  # v2 graphs
}  # fmt: skip


def assert_agrees(onnx_logits: np.ndarray, engine_logits: np.ndarray) -> None:
    np.testing.assert_array_equal(onnx_logits.argmax(1), engine_logits.argmax(1))
    error = np.abs(onnx_logits - engine_logits) / np.abs(engine_logits).max(axis=1, keepdims=True)
    assert error.max() <= 1e-4, f"largest relative logit error {error.max():.3g} > 1e-4"


def run_onnx(proto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"input": np.ascontiguousarray(x, np.float32)})[0]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def ops_of(proto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


# --- part 1: symbolics ---------------------------------------------------------------------------
class Binarize(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.quantizer = Quantizer(name)

    def forward(self, x):
        return self.quantizer(x)


def torch_export(module: nn.Module, example: torch.Tensor):
    """torch.onnx.export without inlining autograd Functions: one without a symbolic fails."""
    buffer = io.BytesIO()
    with warnings_off():
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=18,
            autograd_inlining=False,
            input_names=["input"],
            output_names=["logits"],
        )
    return onnx.load_from_string(buffer.getvalue())


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_each_quantizer_exports_its_inference_binarizer(name, mode):
    """sign(0) = +1 (and −0.0 too) for the sign family; stochastic_binary is its evaluation step
    1{x > 0} even when exported from a module in training mode (no sigmoid, no random draw)."""
    module = Binarize(name).train(mode == "train")
    x = torch.tensor([[-2.0, -1e-7, -0.0, 0.0, 1e-7, 3.0]])
    proto = torch_export(module, x)
    check_onnx(proto)
    (got,) = run_onnx(proto, x.numpy())
    if name == "stochastic_binary":
        assert ops_of(proto) == ["Constant", "Greater", "Cast"]
        np.testing.assert_array_equal(got, [0, 0, 0, 0, 1, 1])
    else:
        assert [op for op in ops_of(proto) if op != "Constant"] == ["GreaterOrEqual", "Where"]
        np.testing.assert_array_equal(got, [-1, -1, 1, 1, 1, 1])


@pytest.mark.parametrize("bias", [True, False])
def test_custom_linear_exports_as_one_gemm(bias):
    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 7))
            self.bias = nn.Parameter(torch.randn(5)) if bias else None

        def forward(self, x):
            return linear(x, self.weight, self.bias)

    torch.manual_seed(0)
    module = Linear()
    x = torch.randn(3, 7)
    proto = torch_export(module, x)
    (gemm,) = proto.graph.node
    assert gemm.op_type == "Gemm"
    assert len(gemm.input) == (3 if bias else 2)
    assert {a.name: a.i for a in gemm.attribute} == {"transB": 1}
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(proto, x.numpy()), module(x).numpy(), rtol=1e-5)


def test_plain_torch_onnx_export_of_a_training_module_goes_through_the_symbolics():
    """Without freezing: every dense layer is one Gemm (the custom linear's symbolic; traced, its
    forward would be Transpose + MatMul + Add) and each binary layer binarizes its weight and its
    input with GreaterOrEqual + Where."""
    torch.manual_seed(0)
    model = build_model(MLPConfig(hidden=(40, 30)), DIGITS.shape, 10).eval()
    proto = torch_export(model, torch.zeros(2, *DIGITS.shape))
    check_onnx(proto)
    ops = ops_of(proto)
    assert set(ops) <= STANDARD_OPS and "MatMul" not in ops
    assert ops.count("Gemm") == 3
    # weights of dense1, dense2; inputs of dense2, output (dense1 sees real-valued pixels)
    assert ops.count("GreaterOrEqual") == ops.count("Where") == 4
    x = random_inputs(DIGITS_SPEC, 2)  # this graph's batch axis is fixed at the example's
    with torch.no_grad():
        np.testing.assert_allclose(
            run_onnx(proto, x), model(torch.from_numpy(x)).numpy(), atol=1e-5
        )


@pytest.mark.parametrize("config", RANDOM_CONFIGS[:1] + RANDOM_CONFIGS[2:3], ids=["mlp", "cnn"])
def test_training_module_exports_standard_ops_with_pm1_weights(config):
    torch.manual_seed(0)
    model = build_model(config, DIGITS.shape, 10)
    # BatchNorm statistics as training leaves them: an untrained BatchNorm (mean 0, var 1) puts
    # binary decisions at exact ties, which ONNX Runtime's Conv+BatchNorm fusion may round
    # either way (docs/onnx.md, "Limits").
    calibrate_batchnorm(model, random_inputs(DIGITS_SPEC, 256), seed=0)
    proto = export_onnx(model)
    check_onnx(proto)
    assert proto.opset_import[0].version >= MIN_OPSET
    assert all(opset.domain in ("", "ai.onnx") for opset in proto.opset_import)
    assert set(ops_of(proto)) <= STANDARD_OPS
    assert "Gemm" in ops_of(proto) and "GreaterOrEqual" in ops_of(proto)
    if isinstance(config, CNNConfig):
        assert {"Conv", "Pad", "MaxPool", "BatchNormalization"} <= set(ops_of(proto))
    # Binary weights are ±1 initializers, not latent floats binarized at run time.
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    binary = [layer for layer in model.spec_layers() if getattr(layer, "kernel_quantizer", None)]
    for layer in binary:
        (weight,) = [w for n, w in initializers.items() if n == f"layers.{layer.name}.weight"]
        assert set(np.unique(weight)) == {-1.0, 1.0}
    # Dynamic batch: the same graph runs at batch 1 and 33, as the eval-mode module does.
    model.eval()
    for batch in (1, 33):
        x = random_inputs(DIGITS_SPEC, batch, seed=batch)
        with torch.no_grad():
            reference = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(run_onnx(proto, x), reference, rtol=1e-4, atol=1e-4)


# --- parts 2 and 3: from published artifacts -----------------------------------------------------
def test_every_architecture_is_covered():
    assert set(TINY) == set(ARCHITECTURES)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Each architecture trained briefly on digits and published: arch → (repo, TrainResult)."""
    repo = tmp_path_factory.mktemp("repo")
    out = {}
    for arch, config in TINY.items():
        result = train(TrainConfig(arch=arch, model=config, epochs=2, progress=False))
        publish_result(result, repo, f"digits-{arch}")
        out[arch] = (repo, result)
    return out


@pytest.mark.parametrize(
    "config", [TINY["birealnet"], TINY["reactnet"]], ids=["birealnet", "reactnet"]
)
def test_residual_graphs_export_standard_ops_matching_the_module(config):
    torch.manual_seed(0)
    model = build_model(config, DIGITS.shape, 10)
    calibrate_batchnorm(model, random_inputs(DIGITS_SPEC, 256), seed=0)
    proto = export_onnx(model)
    check_onnx(proto)
    ops = set(ops_of(proto))
    assert ops <= STANDARD_OPS and {"AveragePool", "ReduceMean", "Add", "Conv"} <= ops
    assert ("PRelu" in ops) == (config.arch == "reactnet")
    model.eval()
    for batch in (1, 33):
        x = random_inputs(DIGITS_SPEC, batch, seed=batch)
        with torch.no_grad():
            reference = model(torch.from_numpy(x)).numpy()
        assert_agrees(run_onnx(proto, x), reference)


def test_concat_and_the_model_input_as_a_named_input_export():
    """A hand-made graph: shift(x) joined with x itself ("@input") along channels."""
    torch.manual_seed(0)
    layers = [("shift", Shift(1)), ("join", Concat()), ("gap", GlobalAvgPool2d()),
              ("output", BinaryLinear(2, 10, kernel_quantizer=None))]  # fmt: skip
    model = BinaryNet(layers, architecture="join", input_shape=DIGITS.shape, num_classes=10,
                      inputs={"join": ("shift", "@input")}).eval()  # fmt: skip
    with torch.no_grad():
        model.layers.shift.shift.fill_(3.0)
    proto = export_onnx(model)
    check_onnx(proto)
    assert "Concat" in ops_of(proto)
    x = random_inputs(DIGITS_SPEC, 5)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(proto, x), model(torch.from_numpy(x)).numpy(),
                                   rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize("arch", sorted(TINY))
def test_onnx_runtime_matches_the_engine_on_every_digits_test_sample(arch, published, tmp_path):
    repo, result = published[arch]
    path = repo / f"digits-{arch}" / "1" / "model.safetensors"
    artifact, proto = export_artifact_to_onnx(path, version=1)
    check_onnx(proto)
    x = result.data.test.x
    assert len(x) > 300
    engine_logits = load_model(path).predict(x)
    assert_agrees(run_onnx(proto, x), engine_logits)
    assert_agrees(run_onnx(proto, random_inputs(artifact.spec, 200, seed=1)),
                  load_model(path).predict(random_inputs(artifact.spec, 200, seed=1)))  # fmt: skip


@pytest.mark.parametrize(
    "config", RANDOM_CONFIGS, ids=[f"{c.arch}-{c.activation_quantizer}" for c in RANDOM_CONFIGS]
)
def test_onnx_runtime_matches_the_engine_on_random_inputs(config, tmp_path):
    path = export_random_model(config, tmp_path / "model.safetensors", DIGITS, seed=3)
    artifact, proto = export_artifact_to_onnx(path)
    for batch in (1, 7, 256):
        x = random_inputs(artifact.spec, batch, seed=batch)
        assert_agrees(run_onnx(proto, x), load_model(path).predict(x))
    agreement = compare_with_engine(
        proto.SerializeToString(), path, random_inputs(artifact.spec, 64)
    )
    assert agreement.passed and agreement.same_class == 64


def test_metadata_carries_labels_input_spec_sha256_and_version(published):
    repo, result = published["mlp"]
    path = repo / "digits-mlp" / "1" / "model.safetensors"
    _, proto = export_artifact_to_onnx(path, version=1)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["bnnserve.labels"]) == list(result.data.labels)
    assert json.loads(props["bnnserve.input"]) == {
        "name": "input", "shape": [1, 8, 8], "datatype": "FP32", "value_range": [0.0, 16.0],
        "integer_valued": True,
    }  # fmt: skip
    assert props["bnnserve.source_artifact_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert props["bnnserve.model"] == "digits-mlp" and props["bnnserve.model_version"] == "1"
    from importlib.metadata import version

    assert props["bnnserve.bnnserve_version"] == version("bnnserve")
    (graph_input,) = proto.graph.input
    (graph_output,) = proto.graph.output
    assert (graph_input.name, graph_output.name) == ("input", "logits")
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 8, 8]


def test_cli_writes_onnx_and_a_triton_entry_that_parses(published, tmp_path, capsys):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    repo, result = published["cnn"]
    out, triton = tmp_path / "digits-cnn.onnx", tmp_path / "triton"
    status, stdout, stderr = run_cli(
        ["export-onnx", "--repo", str(repo), "--name", "digits-cnn", "--out", str(out),
         "--triton-repo", str(triton), "--triton-max-batch", "32", "--verify", "64"], capsys
    )  # fmt: skip
    assert status == 0, stderr
    proto = onnx.load(out)
    assert f"opset 18, {len(proto.graph.node)} nodes, {out.stat().st_size:,} bytes" in stdout
    assert "onnx.checker: passed" in stdout
    assert "ONNX Runtime vs bnnserve engine on 64 random inputs: passed (same class 64/64" in stdout
    model_dir = triton / "digits-cnn"
    assert (model_dir / "1" / "model.onnx").read_bytes() == out.read_bytes()
    config = text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert (config.name, config.backend, config.max_batch_size) == ("digits-cnn", "onnxruntime", 32)
    (inp,), (outp,) = config.input, config.output
    assert (inp.name, list(inp.dims), inp.data_type) == (
        "input",
        [1, 8, 8],
        model_config_pb2.TYPE_FP32,
    )
    assert (outp.name, list(outp.dims)) == ("logits", [10])
    labels = (model_dir / outp.label_filename).read_text().splitlines()
    assert labels == list(result.data.labels)
    # The Triton copy runs in ONNX Runtime as Triton's onnxruntime backend would run it.
    x = result.data.test.x[:5]
    assert_agrees(run_onnx(onnx.load(model_dir / "1" / "model.onnx"), x),
                  load_model(repo / "digits-cnn" / "1").predict(x))  # fmt: skip


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "version", "message"),
    [
        ("no-such-model", None, "no-such-model"),
        ("digits-mlp", "7", "version 7"),
    ],
)
def test_unknown_model_or_version_is_a_usage_error(
    name, version, message, published, tmp_path, capsys
):
    repo, _ = published["mlp"]
    argv = ["export-onnx", "--repo", str(repo), "--name", name, "--out", str(tmp_path / "m.onnx")]
    status, _, stderr = run_cli(argv + (["--version", version] if version else []), capsys)
    assert status == 2
    assert "export-onnx: error:" in stderr and message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("where", ["under-a-file", "a-directory"])
def test_unwritable_output_path_is_an_error_naming_it(where, published, tmp_path, capsys):
    repo, _ = published["mlp"]
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "m.onnx" if where == "under-a-file" else tmp_path
    argv = ["export-onnx", "--repo", str(repo), "--name", "digits-mlp", "--out", str(out)]
    status, stdout, stderr = run_cli(argv, capsys)
    assert status == 1 and stdout == ""
    expected = (
        f"cannot write {out}: Not a directory"
        if where == "under-a-file"
        else (f"output {out} is a directory; expected a file path")
    )
    assert f"export-onnx: error: {expected}" in stderr
    with pytest.raises(OutputPathError, match="Not a directory"):
        write_bytes(tmp_path / "file" / "x.onnx", b"x")


def test_unknown_layer_kind_in_the_artifact_is_named(published, tmp_path, capsys):
    repo, _ = published["mlp"]
    data = (repo / "digits-mlp" / "1" / "model.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(
        rewrite_metadata(data, lambda doc: doc["layers"][0].update(kind="gated_flatten"))
    )
    status, _, stderr = run_cli(
        ["export-onnx", "--artifact", str(bad), "--out", str(tmp_path / "m.onnx")], capsys
    )
    assert status == 2 and "unknown layer kind 'gated_flatten'" in stderr


@dataclass(frozen=True)
class Dropout(Layer):
    """A layer kind the spec could gain before the exporter learns it."""

    kind = "dropout"

    def output_shape(self, shape: Shape) -> Shape:
        return shape


def test_a_layer_kind_the_exporter_does_not_know_is_named():
    layers = (Flatten("flatten"), Dropout("drop1"), Dense("output", 64, 10))
    with pytest.raises(
        UnsupportedLayerError,
        match=r"layer 'drop1': .* layer kind 'dropout'; expected one of: add, avgpool2d, batchnorm",
    ):
        check_exportable(layers)


def test_bad_options_are_usage_errors(published, capsys):
    repo, _ = published["mlp"]
    base = ["export-onnx", "--repo", str(repo), "--name", "digits-mlp"]
    status, _, stderr = run_cli(base, capsys)
    assert status == 2 and "give --out FILE.onnx, --triton-repo DIR or both" in stderr
    status, _, stderr = run_cli([*base, "--out", "m.onnx", "--opset", "13"], capsys)
    assert status == 2 and "--opset must be 17 or later, got 13" in stderr
    status, _, stderr = run_cli([*base, "--out", "m.onnx", "--verify", "-1"], capsys)
    assert status == 2 and "expected an integer ≥ 0, got '-1'" in stderr


def test_missing_onnx_packages_name_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(OnnxDependencyError, match=r"needs onnxruntime; .*bnnserve\[onnx\]"):
        onnx_runtime_session(b"")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(OnnxDependencyError, match=r"needs the onnx package; .*bnnserve\[onnx\]"):
        import_onnx()


def test_export_without_any_output_is_refused(published):
    repo, _ = published["mlp"]
    with pytest.raises(OutputPathError, match="nothing to write"):
        export_published(repo / "digits-mlp" / "1" / "model.safetensors", out=None)

"""The artifact container: round trip, determinism, interop, and one named error per malformed case."""

import json
import pickle
import struct

import numpy as np
import pytest
import safetensors.numpy

from model.artifact import (
    MAX_HEADER_BYTES,
    METADATA_KEY,
    decode_artifact,
    encode_artifact,
    read_artifact,
    write_artifact,
)
from model.errors import (
    ChecksumMismatchError,
    HeaderTooLargeError,
    InvalidSpecError,
    MissingTensorError,
    NotSafetensorsError,
    TensorDtypeError,
    TensorShapeError,
    TruncatedArtifactError,
    UnknownLayerError,
    UnknownQuantizerError,
    UnsupportedFormatVersionError,
)
from model.packing import unpack_signs
from tests.model.factory import join_header, rewrite_metadata, split_header


@pytest.fixture
def data(spec, tensors) -> bytes:
    return encode_artifact(spec, tensors)


def test_round_trip_keeps_spec_and_tensors(tmp_path, spec, tensors):
    path = tmp_path / "model.safetensors"
    size = write_artifact(path, spec, tensors)
    artifact = read_artifact(path)
    assert size == path.stat().st_size == artifact.size_bytes
    assert artifact.spec == spec
    assert artifact.tensors.keys() == tensors.keys()
    for name, array in tensors.items():
        assert artifact.tensors[name].dtype == array.dtype
        np.testing.assert_array_equal(artifact.tensors[name], array)


def test_writer_is_deterministic(spec, tensors):
    assert encode_artifact(spec, tensors) == encode_artifact(spec, dict(reversed(tensors.items())))


def test_files_are_standard_safetensors(data, tensors):
    loaded = safetensors.numpy.load(data)
    np.testing.assert_array_equal(loaded["conv1.weight"], tensors["conv1.weight"])


def test_binary_weights_cost_one_bit_each(data, tensors):
    header, _ = split_header(data)
    entry = header["conv1.weight"]
    assert entry["dtype"] == "U64"
    assert entry["shape"] == [70, 3, 3, 1]  # 5 input channels packed into one word per tap
    doc = json.loads(header["__metadata__"][METADATA_KEY])
    assert doc["tensors"]["conv1.weight"]["logical_shape"] == [70, 5, 3, 3]
    assert doc["tensors"]["conv1.weight"]["packed_axis"] == 1
    signs = unpack_signs(decode_artifact(data).tensors["conv1.weight"], 5, axis=1)
    assert signs.shape == (70, 5, 3, 3)


def test_writer_refuses_tensors_the_graph_does_not_describe(spec, tensors):
    with pytest.raises(InvalidSpecError, match="unexpected tensors.*'extra'"):
        encode_artifact(spec, tensors | {"extra": np.zeros(2, np.float32)})


# --- one test per malformed case -----------------------------------------------------------------
def test_not_a_safetensors_file():
    with pytest.raises(NotSafetensorsError, match="expected a JSON header"):
        decode_artifact(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)


def test_header_that_is_not_json():
    raw = b"{not json"
    with pytest.raises(NotSafetensorsError, match="not valid JSON"):
        decode_artifact(struct.pack("<Q", len(raw)) + raw)


@pytest.mark.parametrize("keep", [0, 5])
def test_truncated_before_the_header_length(data, keep):
    with pytest.raises(TruncatedArtifactError, match="8-byte header length"):
        decode_artifact(data[:keep])


def test_truncated_inside_the_header(data):
    with pytest.raises(TruncatedArtifactError, match="header declares"):
        decode_artifact(data[:40])


def test_truncated_inside_the_tensor_data(data):
    with pytest.raises(TruncatedArtifactError, match="ends at byte"):
        decode_artifact(data[:-10])


def test_header_too_large():
    with pytest.raises(HeaderTooLargeError, match=f"limit is {MAX_HEADER_BYTES}"):
        decode_artifact(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{" + b" " * 16)


def test_trailing_bytes_after_the_tensors(data):
    with pytest.raises(NotSafetensorsError, match="trailing bytes"):
        decode_artifact(data + b"\x00" * 8)


def test_unsupported_format_version(data):
    bad = rewrite_metadata(data, lambda doc: doc.update(format_version=99))
    with pytest.raises(UnsupportedFormatVersionError, match="format_version 99 is not supported"):
        decode_artifact(bad)


def test_safetensors_file_without_bnnserve_metadata():
    plain = safetensors.numpy.save({"w": np.zeros(3, np.float32)})
    with pytest.raises(UnsupportedFormatVersionError, match="not a bnnserve artifact"):
        decode_artifact(plain)


def test_unknown_layer_kind(data):
    bad = rewrite_metadata(data, lambda doc: doc["layers"][3].update(kind="gelu"))
    with pytest.raises(UnknownLayerError, match="unknown layer kind 'gelu'"):
        decode_artifact(bad)


def test_unknown_quantizer(data):
    bad = rewrite_metadata(data, lambda doc: doc["layers"][2].update(input_quantizer="magic"))
    with pytest.raises(UnknownQuantizerError, match="unknown quantizer 'magic'"):
        decode_artifact(bad)


def test_step_quantizer_is_refused_for_weights(data):
    bad = rewrite_metadata(
        data, lambda doc: doc["layers"][2].update(kernel_quantizer="stochastic_binary")
    )
    with pytest.raises(InvalidSpecError, match="weights need a ±1 quantizer"):
        decode_artifact(bad)


def test_zero_padding_of_a_binary_convolution_is_refused(data):
    bad = rewrite_metadata(data, lambda doc: doc["layers"][2].update(pad_value=0.0))
    with pytest.raises(InvalidSpecError, match="pad_value=0.0 is not a binary value"):
        decode_artifact(bad)


def test_layer_widths_that_do_not_chain(data):
    bad = rewrite_metadata(data, lambda doc: doc["layers"][6].update(in_features=64))
    with pytest.raises(InvalidSpecError, match="in_features=64 but the previous layer gives 630"):
        decode_artifact(bad)


def test_missing_tensor(spec, tensors):
    header, body = split_header(encode_artifact(spec, tensors))
    header["__metadata__"][METADATA_KEY] = header["__metadata__"][METADATA_KEY].replace(
        '"bias":false', '"bias":true'
    )
    with pytest.raises(MissingTensorError, match="'conv1.bias' is missing"):
        decode_artifact(join_header(header, body))


def test_tensor_of_the_wrong_shape(spec, tensors):
    bad = dict(tensors, **{"fc.bias": np.zeros(4, np.float32)})
    with pytest.raises(TensorShapeError, match=r"'fc.bias': expected shape \[3\], got \[4\]"):
        encode_artifact(spec, bad)
    header, body = split_header(encode_artifact(spec, tensors))
    header["fc.bias"]["shape"] = [1, 3]
    with pytest.raises(TensorShapeError, match=r"'fc.bias': expected shape \[3\], got \[1, 3\]"):
        decode_artifact(join_header(header, body))


def test_tensor_of_the_wrong_dtype(data):
    header, body = split_header(data)
    header["fc.bias"]["dtype"] = "I32"
    with pytest.raises(TensorDtypeError, match="'fc.bias': expected dtype F32, got I32"):
        decode_artifact(join_header(header, body))


def test_checksum_mismatch(data):
    header, body = split_header(data)
    begin = header["conv1.weight"]["data_offsets"][0]
    corrupted = bytearray(body)
    corrupted[begin] ^= 0x01
    with pytest.raises(ChecksumMismatchError, match="'conv1.weight'.*file is corrupt"):
        decode_artifact(join_header(header, bytes(corrupted)))


def test_read_errors_name_the_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(TruncatedArtifactError, match="broken.safetensors"):
        read_artifact(path)


def test_a_pickle_is_rejected_without_being_unpickled(tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with pytest.raises(NotSafetensorsError):
        decode_artifact(pickle.dumps(Exploit()))
    assert not marker.exists()

"""The wire contract: committed stubs match the .proto files; tensors round-trip and bad ones are refused."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from sdmesh.v1 import tensor_pb2, tensors

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_match_the_proto_files(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    fresh = sorted((tmp_path / "sdmesh" / "v1").glob("*_pb2*.py*"))
    assert fresh, "protoc produced nothing"
    for path in fresh:
        committed = ROOT / "protos" / "sdmesh" / "v1" / path.name
        assert committed.is_file(), f"{path.name} is not committed: run python protos/generate.py"
        assert committed.read_text() == path.read_text(), (
            f"{path.name} drifted from the .proto files: run python protos/generate.py"
        )


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64", "uint8"])
def test_tensors_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    back = tensors.from_proto(tensor_pb2.Tensor.FromString(tensors.to_proto(array).SerializeToString()))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_wire_bytes_are_little_endian_row_major():
    t = tensors.to_proto(np.array([[1.0, 2.0]], dtype=">f4"))  # big-endian input is converted
    assert t.data == np.array([[1.0, 2.0]], dtype="<f4").tobytes() and list(t.shape) == [1, 2]


@pytest.mark.parametrize(
    "tensor,message",
    [
        (tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2, 2], data=b"\0" * 15), "need 16"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "dtype"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[-1, 4], data=b""), "not a valid"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2**40, 2**40], data=b""), "need"),
    ],
)
def test_inconsistent_tensors_are_refused(tensor, message):
    with pytest.raises(tensors.TensorError, match=message):
        tensors.from_proto(tensor)


def test_a_refusal_names_a_shape_of_too_many_dimensions_by_its_count():
    """Quoting 100000 dimensions would make a status message that never reaches the caller (past ~8 kB)."""
    with pytest.raises(tensors.TensorError, match="latents: shape has 100000 dimensions; at most 8") as e:
        tensors.from_proto(tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[1] * 100_000), name="latents")
    assert len(str(e.value)) < 100


def test_expected_dtype_and_rank_are_checked():
    t = tensors.to_proto(np.zeros((2, 3), np.float16))
    with pytest.raises(tensors.TensorError, match="expected float32"):
        tensors.from_proto(t, name="latents", dtype="float32")
    with pytest.raises(tensors.TensorError, match="expected 4 dimensions"):
        tensors.from_proto(t, name="latents", ndim=4)


@pytest.mark.processes
def test_light_client_imports_without_jax():
    code = "import sys, sdmesh.v1.tensors, sdmesh.v1.gateway_pb2_grpc; assert 'jax' not in sys.modules"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)

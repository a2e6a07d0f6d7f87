import numpy as np
import pytest

from model.spec import ModelSpec
from tests.model.factory import tiny_spec, tiny_tensors


@pytest.fixture
def spec() -> ModelSpec:
    return tiny_spec()


@pytest.fixture
def tensors() -> dict[str, np.ndarray]:
    return tiny_tensors()

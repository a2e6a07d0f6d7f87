import json

import pytest

from model.errors import (
    ChecksumMismatchError,
    DeviceUnavailableError,
    InvalidInputError,
    InvalidModelNameError,
    ModelMemoryError,
    ModelNotFoundError,
)
from service.errors import (
    STATUS_BY_ERROR,
    BadRequestError,
    ModelLoadError,
    ModelNotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnauthorizedError,
    error_response,
    status_for,
)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (BadRequestError("x"), 400),
        (InvalidInputError("x"), 400),
        (InvalidModelNameError("x"), 400),
        (ModelLoadError("x"), 400),
        (UnauthorizedError("x"), 401),
        (ModelNotFoundError("x"), 404),
        (PayloadTooLargeError("x"), 413),
        (ModelNotReadyError("x"), 503),
        (OverloadedError("x"), 503),
        (ChecksumMismatchError("x"), 503),  # subclass of ArtifactError, found through the MRO
        (DeviceUnavailableError("x"), 503),
        (ModelMemoryError("x"), 503),
        (RequestTimeoutError("x"), 504),
        (KeyError("bug"), 500),
        (ZeroDivisionError(), 500),
    ],
)
def test_status_table(error, status):
    assert status_for(error) == status


def test_every_table_entry_is_a_client_or_availability_status():
    assert all(400 <= status < 600 and status != 500 for status in STATUS_BY_ERROR.values())


def test_error_body_and_headers():
    response = error_response(OverloadedError("model 'm' is overloaded"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert json.loads(response.body) == {"error": "model 'm' is overloaded"}
    assert error_response(UnauthorizedError("no")).headers["www-authenticate"] == "Bearer"


def test_a_bug_does_not_leak_its_message():
    response = error_response(RuntimeError("secret internals"), request_id="abc")
    assert response.status_code == 500
    assert json.loads(response.body) == {"error": "internal server error (request id abc)"}

"""ladle.serve.exceptions against ray.serve.exceptions 2.60: names, constructors, text, pickling."""

from __future__ import annotations

import pickle

import pytest

from ladle.serve import exceptions

RAY_NAMES = {"RayServeException", "BackPressureError", "RequestCancelledError",
             "DeploymentUnavailableError", "ReplicaUnavailableError"}


def test_ray_names_are_there_and_share_the_root() -> None:
    assert RAY_NAMES <= set(exceptions.__all__)
    for name in RAY_NAMES:
        assert issubclass(getattr(exceptions, name), exceptions.RayServeException)


def test_request_cancelled_error_text() -> None:
    assert str(exceptions.RequestCancelledError("abc")) == "Request abc was cancelled."
    assert str(exceptions.RequestCancelledError()) == "Request was cancelled."
    assert exceptions.RequestCancelledError("abc").request_id == "abc"


def test_backpressure_error_takes_rays_arguments() -> None:
    text = "Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=2)."
    positional = exceptions.BackPressureError(1, 2)
    by_name = exceptions.BackPressureError(num_queued_requests=1, max_queued_requests=2)
    assert str(positional) == str(by_name) == positional.message == text
    assert positional.status_code == 503 and positional.retry_after_s is None
    limited = exceptions.BackPressureError(3, 3, status_code=429, retry_after_s=1.5)
    assert (limited.status_code, limited.retry_after_s) == (429, 1.5)


def test_replica_unavailable_error_text() -> None:
    error = exceptions.ReplicaUnavailableError("r1")
    assert error.message == str(error) == "Replica r1 is no longer available."


@pytest.mark.parametrize("error", [
    exceptions.RequestCancelledError("abc"), exceptions.RequestCancelledError(),
    exceptions.BackPressureError(3, 3, status_code=429, retry_after_s=1.5),
    exceptions.ReplicaUnavailableError("r1"),
])
def test_errors_pickle_as_they_were_made(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)

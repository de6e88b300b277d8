"""ladle's own exceptions, and how errors cross a process boundary.

Every error ladle raises itself derives from ``LadleError`` (alias
``RayServeException``, its name in ``ray.serve.exceptions``).  Each class
carries the HTTP ``status_code`` the proxy answers with, so mapping an error
to a response is one attribute lookup.

    LadleError (= RayServeException)             500
    ├── BackPressureError                         503  caller's queue is full
    ├── DeploymentUnavailableError                503  no replica can take it
    ├── ReplicaDiedError                          503  the replica died mid-request
    ├── ReplicaUnavailableError                   503  (Ray's name; not raised by ladle)
    ├── RequestCancelledError                     499  cancelled by caller/timeout
    ├── HandleClosedError                         503  used after serve.shutdown()
    ├── RemoteError                               500  user error that can't be pickled
    └── DeploymentFailedError                     500  constructor raised (serve.run)

User exceptions are not wrapped: they reach the caller as their own class
with the remote traceback attached (``__cause__`` and a note).
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any


class LadleError(Exception):
    """Base of every error raised by ladle itself."""

    status_code = 500


RayServeException = LadleError


class BackPressureError(LadleError):
    """The caller's queue for a deployment is full (``max_queued_requests``).

    Constructed as Ray's: ``BackPressureError(num_queued_requests,
    max_queued_requests, status_code=503, retry_after_s=None)``.
    """

    def __init__(self, num_queued_requests: int = 0, max_queued_requests: int = 0,
                 status_code: int = 503, retry_after_s: float | None = None) -> None:
        # Every argument goes to the base class, so the error pickles as it was made.
        super().__init__(num_queued_requests, max_queued_requests, status_code, retry_after_s)
        self.num_queued_requests = num_queued_requests
        self.max_queued_requests = max_queued_requests
        self.status_code = status_code
        self.retry_after_s = retry_after_s

    @property
    def message(self) -> str:
        return (f"Request dropped due to backpressure (num_queued_requests="
                f"{self.num_queued_requests}, max_queued_requests={self.max_queued_requests}).")

    def __str__(self) -> str:
        return self.message


class DeploymentUnavailableError(LadleError):
    """No replica of the deployment is available to take the request."""

    status_code = 503


class ReplicaUnavailableError(LadleError):
    """The replica chosen for a request is no longer available."""

    status_code = 503

    def __init__(self, replica_id: str = "") -> None:
        super().__init__(replica_id)
        self.replica_id = replica_id

    @property
    def message(self) -> str:
        return f"Replica {self.replica_id} is no longer available."

    def __str__(self) -> str:
        return self.message


class ReplicaDiedError(LadleError):
    """The replica running the request died before answering."""

    # As Ray Serve answers a request whose replica died in it (a server error, which
    # retrying may or may not fix; 503 means "not here yet, come back").
    status_code = 500


class RequestCancelledError(LadleError):
    """The request was cancelled (by the caller, a timeout or a disconnect).

    ``str()`` is Ray's: ``Request <request_id> was cancelled.``
    """

    status_code = 499

    def __init__(self, request_id: str | None = None) -> None:
        super().__init__(*(() if request_id is None else (request_id,)))
        self.request_id = request_id

    def __str__(self) -> str:
        if self.request_id:
            return f"Request {self.request_id} was cancelled."
        return "Request was cancelled."


class HandleClosedError(LadleError):
    """The handle's instance was shut down (``serve.shutdown()``)."""

    status_code = 503


class DeploymentFailedError(LadleError):
    """A deployment could not start (its constructor raised)."""


class RemoteError(LadleError):
    """A user exception that could not be pickled, as its type, text and traceback."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        self.type_name = type_name
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}\n\nRemote traceback:\n{remote_traceback}")

    def __reduce__(self) -> Any:
        return (RemoteError, (self.type_name, str(self), self.remote_traceback))


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process, shown as its cause."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


_PACKAGE_DIR = __file__.rsplit("/", 2)[0] + "/"


def user_traceback(exc: BaseException) -> str:
    """The traceback as the user should read it: without ladle's own outer frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and \
            tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def pack_exception(exc: BaseException) -> tuple[bytes, str]:
    """What an error frame carries: the pickled exception (or a RemoteError) and its traceback."""
    tb = user_traceback(exc)
    try:
        data = pickle.dumps(exc, protocol=5)
        pickle.loads(data)  # an exception that pickles but won't load is no better
    except Exception:
        try:
            from .serialization import dumps
            data = dumps(exc)
            pickle.loads(data)
        except Exception:
            data = pickle.dumps(RemoteError(type(exc).__qualname__, _safe_str(exc), tb))
    return data, tb


def unpack_exception(data: bytes, tb: str) -> BaseException:
    """The exception to raise at the caller, with the remote traceback attached."""
    try:
        exc: BaseException = pickle.loads(data)
    except Exception as load_error:
        exc = RemoteError("<unloadable exception>", repr(load_error), tb)
    if not isinstance(exc, LadleError) or isinstance(exc, RemoteError):
        if tb and exc.__cause__ is None:
            exc.__cause__ = RemoteTraceback(tb)
        if tb and not isinstance(exc, RemoteError):
            exc.add_note("Remote traceback:\n" + tb)
    return exc


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<unprintable>"

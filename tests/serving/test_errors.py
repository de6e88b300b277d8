"""Errors across the handle: missing methods, pickling, user exceptions, shutdown, misuse."""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading
import traceback

import pytest

from ladle import serve
from ladle.exceptions import RayServeException, RemoteError
from ladle.handle import DeploymentHandle


class UserError(Exception):
    pass


class UnpicklableError(Exception):
    """Holds a lock, so neither pickle nor cloudpickle can ship it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class UnloadableError(Exception):
    """Pickles, but its constructor's signature breaks unpickling."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


@serve.deployment
class Faulty:
    def __call__(self, x: int) -> int:
        return x

    def echo(self, *args: object, **kwargs: object) -> int:
        return len(args) + len(kwargs)

    def explode_sync(self) -> None:
        raise UserError("sync user failure")  # original line: explode_sync

    async def explode_async(self) -> None:
        await asyncio.sleep(0)
        raise UserError("async user failure")  # original line: explode_async

    def raise_unpicklable(self) -> None:
        raise UnpicklableError("cannot travel")

    def raise_unloadable(self) -> None:
        raise UnloadableError("left", "right")

    def return_lock(self) -> threading.Lock:
        return threading.Lock()

    async def return_generator(self) -> object:
        return (i for i in range(3))


def test_missing_method_names_the_method() -> None:
    handle = serve.run(Faulty.bind())
    with pytest.raises(RayServeException, match="no_such_method"):
        handle.no_such_method.remote().result(timeout_s=10)
    with pytest.raises(RayServeException, match="other_missing"):
        handle.options(method_name="other_missing").remote(1).result(timeout_s=10)

    async def in_loop() -> None:
        with pytest.raises(RayServeException, match="missing_async"):
            await handle.missing_async.remote()

    asyncio.run(in_loop())
    assert handle.remote(3).result(timeout_s=10) == 3


def test_missing_method_on_function_deployment() -> None:
    @serve.deployment
    def fn(x: int) -> int:
        return x

    handle = serve.run(fn.bind())
    with pytest.raises(RayServeException, match="predict"):
        handle.predict.remote(1).result(timeout_s=10)
    assert handle.remote(1).result(timeout_s=10) == 1


def test_unpicklable_argument_names_the_argument() -> None:
    handle = serve.run(Faulty.bind())
    with pytest.raises(TypeError, match="argument 1") as info:
        handle.echo.remote(1, threading.Lock()).result(timeout_s=10)
    assert "lock" in str(info.value)

    sock = socket.socket()
    try:
        holds_socket = lambda: sock  # noqa: E731
        with pytest.raises(TypeError, match="keyword argument 'callback'") as info:
            handle.echo.remote(1, callback=holds_socket).result(timeout_s=10)
        assert "socket" in str(info.value)
    finally:
        sock.close()

    async def in_loop() -> None:
        with pytest.raises(TypeError, match="argument 0"):
            await handle.echo.remote(threading.Lock())

    asyncio.run(in_loop())
    assert handle.echo.remote(1, 2, k=3).result(timeout_s=10) == 3


def test_unpicklable_result_names_the_method() -> None:
    handle = serve.run(Faulty.bind())
    with pytest.raises(TypeError, match="return_lock") as info:
        handle.return_lock.remote().result(timeout_s=10)
    assert "lock" in str(info.value)
    with pytest.raises(TypeError, match="return_generator"):
        handle.return_generator.remote().result(timeout_s=10)
    assert handle.remote(5).result(timeout_s=10) == 5


@pytest.mark.parametrize("method", ["explode_sync", "explode_async"])
def test_user_exception_keeps_its_class_and_remote_traceback(method: str) -> None:
    handle = serve.run(Faulty.bind())
    with pytest.raises(UserError) as info:
        handle.options(method_name=method).remote().result(timeout_s=10)
    exc = info.value
    assert type(exc) is UserError
    kind = method.split("_")[1]
    assert str(exc) == f"{kind} user failure"
    formatted = "".join(traceback.format_exception(exc))
    assert method in formatted
    assert f'raise UserError("{kind} user failure")  # original line: {method}' in formatted

    async def in_loop() -> None:
        with pytest.raises(UserError) as info:
            await handle.options(method_name=method).remote()
        assert method in "".join(traceback.format_exception(info.value))

    asyncio.run(in_loop())


def test_exception_class_defined_in_a_test_function() -> None:
    class LocalError(ValueError):
        pass

    @serve.deployment
    class Local:
        def fail(self, message: str) -> None:
            raise LocalError(message)

    handle = serve.run(Local.bind())
    with pytest.raises(ValueError, match="local failure") as info:
        handle.fail.remote("local failure").result(timeout_s=10)
    assert type(info.value).__name__ == "LocalError"
    assert "raise LocalError(message)" in "".join(traceback.format_exception(info.value))


def test_exception_that_cannot_be_pickled_arrives_as_remote_error() -> None:
    handle = serve.run(Faulty.bind())
    with pytest.raises(RemoteError) as info:
        handle.raise_unpicklable.remote().result(timeout_s=10)
    exc = info.value
    assert isinstance(exc, RayServeException)
    assert "UnpicklableError" in str(exc)
    assert "cannot travel" in str(exc)
    formatted = "".join(traceback.format_exception(exc))
    assert "raise_unpicklable" in formatted
    assert 'raise UnpicklableError("cannot travel")' in formatted

    with pytest.raises(RemoteError) as info2:
        handle.raise_unloadable.remote().result(timeout_s=10)
    assert "UnloadableError" in str(info2.value)
    assert "raise_unloadable" in "".join(traceback.format_exception(info2.value))
    # RemoteError itself pickles (it can be passed on).
    assert "UnpicklableError" in str(pickle.loads(pickle.dumps(exc)))


def test_calling_a_handle_after_shutdown_fails_promptly() -> None:
    handle = serve.run(Faulty.bind())
    assert handle.remote(1).result(timeout_s=10) == 1
    unused = serve.get_app_handle("default")
    pickled = pickle.dumps(handle)
    serve.shutdown()

    for h in (handle, unused, pickle.loads(pickled), handle.echo):
        with pytest.raises(RayServeException):
            h.remote(1).result(timeout_s=10)

    async def in_loop() -> None:
        with pytest.raises(RayServeException):
            await asyncio.wait_for(handle.remote(2), timeout=10)

    asyncio.run(in_loop())
    with pytest.raises(RayServeException):
        list(handle.options(stream=True).remote(1))


async def test_calling_a_handle_after_shutdown_from_a_loop_that_used_it() -> None:
    handle = serve.run(Faulty.bind())
    assert await handle.remote(1) == 1
    await asyncio.to_thread(serve.shutdown)
    with pytest.raises(RayServeException):
        await asyncio.wait_for(handle.remote(2), timeout=10)


def test_run_rejects_what_is_not_an_application() -> None:
    with pytest.raises(TypeError, match="bind"):
        serve.run(Faulty)  # a Deployment, not bound
    for not_an_app in (42, "app", Faulty.bind, DeploymentHandle("x")):
        with pytest.raises(TypeError):
            serve.run(not_an_app)  # type: ignore[arg-type]

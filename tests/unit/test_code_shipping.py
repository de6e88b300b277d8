"""Code shipped to replicas keeps its file name, so tracebacks show the user's file and line.

cloudpickle 3.1.3 renamed every shipped code object's file to ``<dynamic-code>``;
these run in this process against whatever cloudpickle is installed.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import traceback

from ladle._core.serialization import dumps, dumps_oob


def test_a_function_defined_in_a_test_keeps_its_file_and_line() -> None:
    def explode(x: int) -> int:
        inner = lambda: 1 / x  # noqa: E731  (a nested code object, shipped too)
        return inner()  # type: ignore[no-any-return]

    loaded = pickle.loads(dumps(explode))
    assert loaded is not explode
    assert loaded.__code__.co_filename == __file__
    assert loaded.__code__.co_firstlineno == explode.__code__.co_firstlineno
    try:
        loaded(0)
    except ZeroDivisionError as exc:
        formatted = "".join(traceback.format_exception(exc))
    assert "<dynamic-code>" not in formatted
    assert f'File "{__file__}"' in formatted
    assert "inner = lambda: 1 / x" in formatted  # the source line itself


def test_a_class_defined_in_a_test_keeps_its_methods_files_in_another_process() -> None:
    class Model:
        def predict(self) -> None:
            raise ValueError("no weights")

    # As a replica does: plain pickle.loads in a fresh interpreter (cloudpickle would
    # hand back the very same class in this process).
    loader = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())().predict()"
    done = subprocess.run([sys.executable, "-c", loader], input=dumps_oob(Model)[0],
                          capture_output=True, timeout=60)
    assert done.returncode == 1
    err = done.stderr.decode()
    assert f'File "{__file__}"' in err
    assert 'raise ValueError("no weights")' in err


def test_the_same_code_pickles_to_the_same_bytes() -> None:
    # Code versions are hashes of these bytes: the file name must not make them vary.
    def f() -> int:
        return 1

    assert dumps(f) == dumps(f)

"""A long-lived instance: ``ladle start``, then scripts and the CLI from other processes.

Applications deployed by a script outlive it; ``serve.status`` /
``get_app_handle`` / ``delete`` / ``shutdown`` of any process reach the
instance; ``ladle run`` against it removes only its own application; each
process of the instance names its role; another user is refused; a stale
run directory is removed and never connected to.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_for
from tests.instance.conftest import Instance, alive, popen

MODEL = textwrap.dedent('''
    import os

    from ladle import serve

    @serve.deployment(num_replicas=2)
    class Hello:
        def __call__(self, request=None):
            return f"hello from {os.getpid()}"

    app = Hello.bind()
''')


def test_start_deploy_from_scripts_status_and_shutdown(instance: Instance) -> None:
    (instance.app_dir / "model.py").write_text(MODEL)
    info = instance.start()
    assert info["http_port"] and info["rest_url"].startswith("http://127.0.0.1:")

    # Each process names its role, as Ray's `ray::ServeController` does.
    names = {p.name() for p in instance.processes() if alive(p)}
    assert {"ladle::supervis", "ladle::controll", "ladle::proxy"} <= names, names
    controller = [p for p in instance.processes() if p.name() == "ladle::controll"][0]
    assert controller.cmdline()[0].startswith("ladle::controller")

    # A script deploys and exits; the application stays.
    out = instance.python('''
        from ladle import serve
        import model
        handle = serve.run(model.app, name="hello", route_prefix="/hello")
        print(handle.remote().result())
    ''').stdout
    assert out.startswith("hello from ")
    response = instance.get("/hello")
    assert response.status_code == 200 and response.text.startswith("hello from ")

    # Another script: status, a handle by name, then delete.
    out = instance.python('''
        from ladle import serve
        status = serve.status()
        app = status.applications["hello"]
        print(app.status, app.deployments["Hello"].replica_states)
        print(serve.get_app_handle("hello").remote().result())
    ''').stdout.splitlines()
    assert out[0] == "RUNNING {'RUNNING': 2}" and out[1].startswith("hello from ")

    status = instance.ladle("status", check=True).stdout
    assert "  hello:\n    status: RUNNING\n" in status and "RUNNING: 2" in status
    assert status.startswith("proxies:\n  local: HEALTHY\napplications:")

    instance.python('''
        from ladle import serve
        serve.delete("hello")
        assert "hello" not in serve.status().applications
    ''')
    assert instance.get("/hello").status_code == 404

    # serve.shutdown() from any script stops the whole instance.
    processes = instance.processes()
    instance.python("from ladle import serve; serve.shutdown()")
    wait_for(lambda: not any(alive(p) for p in processes), timeout_s=30,
             message="every process of the instance to exit")
    assert not instance.dir.exists()
    assert instance.ladle("status").returncode == 1


def test_without_an_instance_serve_run_is_embedded(instance: Instance) -> None:
    (instance.app_dir / "model.py").write_text(MODEL)
    out = instance.python('''
        import os
        from ladle import serve
        from ladle._api import lifecycle
        import model
        serve.run(model.app, name="hello")
        print(type(lifecycle._instance).__name__)
    ''').stdout
    assert out.strip() == "EmbeddedClient"
    assert not instance.dir.exists()


def test_ladle_run_against_an_instance_removes_only_its_application(instance: Instance
                                                                     ) -> None:
    (instance.app_dir / "model.py").write_text(MODEL)
    instance.start()
    instance.python('''
        from ladle import serve
        import model
        serve.run(model.app, name="stays", route_prefix="/stays")
    ''')
    with popen(instance, "run", "model:app", "--name", "mine", "--route-prefix", "/mine"
               ) as (proc, _):
        wait_for(lambda: "mine" in instance.details()["applications"] and
                 instance.details()["applications"]["mine"]["status"] == "RUNNING",
                 timeout_s=60, message="`ladle run` to deploy into the instance")
        assert instance.get("/mine").status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    apps = instance.details()["applications"]
    assert "mine" not in apps and apps["stays"]["status"] == "RUNNING"
    assert instance.get("/stays").status_code == 200


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand the directory over")
def test_another_users_instance_is_refused(instance: Instance) -> None:
    # An instance directory that belongs to someone else (as another user's process
    # pointing LADLE_RUN_DIR at ours sees it): refused, never connected to.
    instance.start()
    os.chown(instance.dir, 65534, 65534)
    try:
        out = instance.python('''
            from ladle import serve
            for call in (serve.status, lambda: serve.delete("x"), serve.shutdown):
                try:
                    call()
                except Exception as exc:
                    print(type(exc).__name__, exc)
        ''').stdout.splitlines()
        assert len(out) == 3 and all("belongs to another user" in line for line in out), out
        refused = instance.ladle("status")
        assert refused.returncode == 1 and "belongs to another user" in refused.stderr
    finally:
        os.chown(instance.dir, 0, 0)
    assert instance.ladle("status").returncode == 0


def test_a_stale_run_directory_is_removed_and_never_connected_to(instance: Instance) -> None:
    (instance.app_dir / "model.py").write_text(MODEL)
    # What an instance killed with everything in it leaves: its files, a dead pid.
    stale = instance.dir
    stale.mkdir(mode=0o700, parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (stale / "supervisor.json").write_text(json.dumps({"pid": dead.pid, "start": 1}))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale / "controller.sock"))
    listener.listen(8)
    listener.setblocking(False)
    (stale / "instance.json").write_text(json.dumps({
        "address": f"unix:{stale / 'controller.sock'}", "controller_pid": dead.pid,
        "controller_start": 1}))
    os.utime(stale, (0, 0))
    try:
        out = instance.python('''
            from ladle import serve
            from ladle._api import lifecycle
            import model
            serve.run(model.app, name="hello")
            print(type(lifecycle._instance).__name__)
        ''').stdout
        assert out.strip() == "EmbeddedClient"
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked
    finally:
        listener.close()
    assert not stale.exists()

    # The same after a real instance was killed whole (supervisor and controller).
    info = instance.start()
    processes = instance.processes()
    for proc in processes:
        proc.kill()
    wait_for(lambda: not any(alive(p) for p in processes), timeout_s=30,
             message="the killed instance's replicas to exit with their lifeline")
    assert instance.ladle("status").stderr.strip() == "ladle: error: no running instance"
    assert not instance.dir.exists()
    assert info["address"]


def test_start_twice_and_bad_ports(instance: Instance) -> None:
    info = instance.start()
    again = instance.ladle("start", check=True)
    assert "already running" in again.stderr and info["address"] in again.stdout
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        instance.ladle("shutdown", check=True)
        failed = instance.ladle("start", "--http-port", str(busy.getsockname()[1]),
                                "--dashboard-port", "0")
        assert failed.returncode == 1
        assert "failed to start" in failed.stderr and "port" in failed.stderr.lower()
        assert not instance.dir.exists()
    finally:
        busy.close()



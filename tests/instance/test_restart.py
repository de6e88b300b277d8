"""The controller dies (SIGKILL) under load: nothing is lost.

The supervisor restarts it at once; the restarted controller adopts the
replicas and the proxy still alive (same pids, no restart), and health
checks, autoscaling and deploys work again.  HTTP and handle traffic running
all along sees no failed request.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import httpx
import psutil

from tests.conftest import wait_for
from tests.instance.conftest import Instance, alive

MODEL = textwrap.dedent('''
    import os

    from ladle import serve

    @serve.deployment(num_replicas=2, health_check_period_s=0.2, health_check_timeout_s=5)
    class Adder:
        def __init__(self, inc: int):
            self.inc = inc

        def __call__(self, x: int) -> int:
            return x + self.inc

    @serve.deployment
    class Front:
        def __init__(self, adder):
            self.adder = adder

        async def __call__(self, request=None):
            value = await self.adder.remote(1)
            return {"value": value, "pid": os.getpid()}

    app = Front.bind(Adder.bind(1))
''')

CONFIG = textwrap.dedent('''
    applications:
    - name: calc
      route_prefix: /calc
      import_path: model:app
      deployments:
      - name: Adder
        num_replicas: {n}
''')

HANDLE_LOAD = textwrap.dedent('''
    import sys, threading
    from ladle import serve
    handle = serve.get_app_handle("calc")
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    ok = failed = 0
    while not stop.is_set():
        try:
            assert handle.remote().result(timeout_s=30)["value"] == 2
            ok += 1
        except Exception as exc:
            failed += 1
            print("handle call failed:", repr(exc), file=sys.stderr, flush=True)
        if ok == 1:
            print("started", flush=True)
    print(ok, failed, flush=True)
''')


class HttpLoad:
    """Requests one after another on one thread until stopped; counts failures."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    response = client.get(self.url)
                    if response.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def __enter__(self) -> HttpLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_controller_sigkill_under_load_loses_nothing(instance: Instance) -> None:
    (instance.app_dir / "model.py").write_text(MODEL)
    (instance.app_dir / "config.yaml").write_text(CONFIG.format(n=2))
    instance.start()
    instance.ladle("deploy", "config.yaml", check=True)
    before = instance.replica_pids("calc")
    proxy_pid = [p.pid for p in instance.processes() if p.name() == "ladle::proxy"]
    old = instance.read_info()

    handles = subprocess.Popen([sys.executable, "-c", HANDLE_LOAD], env=instance.env,
                               cwd=instance.app_dir, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert handles.stdout is not None
        assert handles.stdout.readline().strip() == "started"
        with HttpLoad(f"{instance.http}/calc") as load:
            wait_for(lambda: load.ok >= 20, message="HTTP traffic to flow")
            controller = [p for p in instance.processes() if p.name() == "ladle::controll"]
            assert len(controller) == 1 and controller[0].pid == old["controller_pid"]
            controller[0].kill()

            # The supervisor starts another one at once; it adopts what is alive.
            wait_for(lambda: instance.read_info()["controller_pid"] != old["controller_pid"],
                     timeout_s=30, message="a new controller")
            assert instance.read_info()["restarted"] is True
            after = instance.replica_pids("calc")
            assert after == before  # adopted, not restarted
            assert [p.pid for p in instance.processes() if p.name() == "ladle::proxy"
                    ] == proxy_pid
            served = load.ok
            wait_for(lambda: load.ok >= served + 20, message="traffic after the restart")

            # Deploys work again: scale Adder up; its old replicas stay.
            (instance.app_dir / "config.yaml").write_text(CONFIG.format(n=3))
            instance.ladle("deploy", "config.yaml", check=True)
            scaled = instance.replica_pids("calc")
            assert len(scaled["Adder"]) == 3 and before["Adder"] <= scaled["Adder"]
            assert scaled["Front"] == before["Front"]
            served = load.ok
            wait_for(lambda: load.ok >= served + 20, message="traffic after the deploy")
        handles.stdin.close()  # type: ignore[union-attr]
        ok, failed = map(int, handles.stdout.readline().split())
        assert handles.wait(timeout=60) == 0
    finally:
        if handles.poll() is None:
            handles.kill()
            handles.wait()
        for stream in (handles.stdin, handles.stdout, handles.stderr):
            if stream is not None and not stream.closed:
                stream.close()
    assert load.failures == [] and load.ok > 0
    assert (failed, ok > 0) == (0, True)


def test_restarted_controller_replaces_replicas_that_died_meanwhile(instance: Instance
                                                                    ) -> None:
    # Health checks resume: a replica killed while no controller was there is replaced.
    (instance.app_dir / "model.py").write_text(MODEL)
    (instance.app_dir / "config.yaml").write_text(CONFIG.format(n=2))
    instance.start()
    instance.ladle("deploy", "config.yaml", check=True)
    before = instance.replica_pids("calc")
    old = instance.read_info()
    controller = [p for p in instance.processes() if p.name() == "ladle::controll"][0]
    supervisor = [p for p in instance.processes() if p.name() == "ladle::supervis"][0]
    supervisor.suspend()  # no restart until we say so
    try:
        controller.kill()
        wait_for(lambda: not alive(controller), message="the controller to die")
        victim = sorted(before["Adder"])[0]
        psutil.Process(victim).kill()
    finally:
        supervisor.resume()
    wait_for(lambda: instance.read_info()["controller_pid"] != old["controller_pid"],
             timeout_s=30, message="a new controller")

    def replaced() -> bool:
        pids = instance.replica_pids("calc")["Adder"]
        return len(pids) == 2 and victim not in pids
    wait_for(replaced, timeout_s=60, message="the dead replica to be replaced")
    survivors = instance.replica_pids("calc")["Adder"]
    assert (before["Adder"] - {victim}) <= survivors
    assert instance.get("/calc").json()["value"] == 2

"""Config files: declarative deploys with Ray's update rules, the REST API and its token,
bad files refused whole (field and line) before anything changes, ``ladle build``,
``ladle config``, ``ladle run config.yaml``.
"""

from __future__ import annotations

import signal
import textwrap

import yaml

from ladle.serve.schema import ServeDeploySchema, ServeInstanceDetails
from tests.conftest import wait_for
from tests.instance.conftest import Instance, popen

MODEL = textwrap.dedent('''
    import os

    from ladle import serve

    @serve.deployment(user_config={"greeting": "hi"})
    class Greeter:
        def reconfigure(self, config):
            self.greeting = config["greeting"]

        def __call__(self, request=None):
            return {"greeting": self.greeting, "pid": os.getpid(), "version": 1}

    app = Greeter.bind()

    @serve.deployment
    def other(request=None):
        return "other"
''')

CONFIG = textwrap.dedent('''
    applications:
    - name: greet
      route_prefix: /greet
      import_path: model:app
      deployments:
      - name: Greeter
        num_replicas: {n}
        user_config:
          greeting: {greeting}
''')


def _deploy(instance: Instance, text: str, *args: str) -> None:
    (instance.app_dir / "config.yaml").write_text(text)
    instance.ladle("deploy", "config.yaml", *args, check=True)


def test_declarative_updates_follow_rays_rules(instance: Instance) -> None:
    (instance.app_dir / "model.py").write_text(MODEL)
    instance.start()
    _deploy(instance, CONFIG.format(n=1, greeting="hello"))
    assert instance.get("/greet").json()["greeting"] == "hello"
    first = instance.replica_pids("greet")["Greeter"]

    # More replicas: the one running stays.
    _deploy(instance, CONFIG.format(n=2, greeting="hello"))
    scaled = instance.replica_pids("greet")["Greeter"]
    assert len(scaled) == 2 and first <= scaled

    # A new user_config: reconfigured in place, no restart.
    _deploy(instance, CONFIG.format(n=2, greeting="howdy"))
    assert instance.replica_pids("greet")["Greeter"] == scaled
    answers = {instance.get("/greet").json()["greeting"] for _ in range(10)}
    assert answers == {"howdy"}

    # The same config again: nothing happens.
    _deploy(instance, CONFIG.format(n=2, greeting="howdy"))
    assert instance.replica_pids("greet")["Greeter"] == scaled

    # The code changed: a rolling restart onto it.
    (instance.app_dir / "model.py").write_text(MODEL.replace('"version": 1', '"version": 2'))
    _deploy(instance, CONFIG.format(n=2, greeting="howdy"))
    restarted = instance.replica_pids("greet")["Greeter"]
    assert len(restarted) == 2 and not restarted & scaled
    assert instance.get("/greet").json()["version"] == 2

    # `ladle config` shows what the file said; an application from serve.run is left
    # alone by config deploys, and one missing from the new file is deleted.
    shown = instance.ladle("config", check=True).stdout
    assert yaml.safe_load(shown) == yaml.safe_load(CONFIG)["applications"][0] | {
        "deployments": [{"name": "Greeter", "num_replicas": 2,
                         "user_config": {"greeting": "howdy"}}]}
    instance.python('''
        from ladle import serve
        import model
        serve.run(model.other.bind(), name="script", route_prefix="/script")
    ''')
    _deploy(instance, textwrap.dedent('''
        applications:
        - name: second
          route_prefix: /second
          import_path: model:other
    '''))
    apps = instance.details()["applications"]
    assert sorted(apps) == ["script", "second"]
    assert (apps["script"]["source"], apps["second"]["source"]) == ("imperative",
                                                                   "declarative")
    assert instance.get("/greet").status_code == 404


def test_rest_api_needs_the_token(instance: Instance) -> None:
    (instance.app_dir / "model.py").write_text(MODEL)
    instance.start()
    token_file = instance.dir / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert instance.dir.stat().st_mode & 0o777 == 0o700

    for token in ("", "wrong", instance.token[:-1]):
        response = instance.rest("GET", token=token)
        assert response.status_code == 401 and str(token_file) in response.json()["error"]
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert instance.rest("PUT", {"applications": []}, token="wrong").status_code == 401

    config = yaml.safe_load(CONFIG.format(n=1, greeting="hey"))
    response = instance.rest("PUT", config,
                             headers_extra={"X-Ladle-App-Dir": str(instance.app_dir)})
    assert response.status_code == 200, response.text
    instance.wait_running("greet")
    details = ServeInstanceDetails.model_validate(instance.details())
    app = details.applications["greet"]
    assert (app.route_prefix, app.source.value) == ("/greet", "declarative")
    assert app.deployed_app_config is not None
    assert app.deployed_app_config.import_path == "model:app"
    replica = app.deployments["Greeter"].replicas[0]
    assert replica.state.value == "RUNNING" and replica.pid

    bad = instance.rest("PUT", {"applications": [{"import_path": "model:app", "nmae": "x"}]})
    assert bad.status_code == 400
    assert bad.json()["errors"][0]["field"] == "applications[0].nmae"

    assert instance.rest("DELETE").status_code == 200
    assert instance.details()["applications"] == {}


BAD_FILES = {
    "unknown field": ("applications:\n- name: a\n  import_path: model:app\n  deployments:\n"
                      "  - name: Greeter\n    num_replica: 2\n",
                      "config.yaml:6: applications[0].deployments[0].num_replica: unknown field"),
    "wrong type": ("applications:\n- name: a\n  import_path: model:app\n  deployments:\n"
                   "  - name: Greeter\n    max_ongoing_requests: lots\n",
                   "config.yaml:6: applications[0].deployments[0].max_ongoing_requests: "),
    "two apps, one name": ("applications:\n- name: a\n  import_path: model:app\n"
                           "  route_prefix: /a\n- name: a\n  import_path: model:other\n"
                           "  route_prefix: /b\n",
                           "multiple configs for application(s) ['a']"),
    "import_path does not import": ("applications:\n- name: a\n  import_path: nomodule:app\n",
                                    "config.yaml:3: applications[0].import_path: no module "
                                    "named 'nomodule'"),
    "route prefix clash": ("applications:\n- name: clash\n  route_prefix: /script\n"
                           "  import_path: model:other\n",
                           "config.yaml:3: applications[0].route_prefix: Prefix /script is "
                           "being used by application 'script'"),
    "unknown deployment": ("applications:\n- name: a\n  import_path: model:app\n"
                           "  deployments:\n  - name: Nope\n    num_replicas: 2\n",
                           "config.yaml:5: applications[0].deployments[0].name: no deployment "
                           "named 'Nope'"),
    "runtime_env pip": ("applications:\n- name: a\n  import_path: model:app\n"
                        "  runtime_env:\n    pip: [requests]\n",
                        "config.yaml:5: applications[0].runtime_env.pip: not supported on one "
                        "machine"),
    "not yaml": ("applications:\n- name: a\n  import_path: [model:app\n", "config.yaml:"),
}


def test_bad_config_files_are_refused_whole(instance: Instance) -> None:
    (instance.app_dir / "model.py").write_text(MODEL)
    (instance.app_dir / "broken.py").write_text("raise RuntimeError('weights missing')\n")
    instance.start()
    _deploy(instance, CONFIG.format(n=1, greeting="hello"))
    instance.python('''
        from ladle import serve
        import model
        serve.run(model.other.bind(), name="script", route_prefix="/script")
    ''')
    before = instance.replica_pids("greet")
    for what, (text, expected) in BAD_FILES.items():
        (instance.app_dir / "config.yaml").write_text(text)
        result = instance.ladle("deploy", "config.yaml")
        assert result.returncode == 1, what
        assert expected in result.stderr, (what, result.stderr)
    # A module that raises: the user's traceback, at the field.
    (instance.app_dir / "config.yaml").write_text(
        "applications:\n- name: a\n  import_path: broken:app\n")
    result = instance.ladle("deploy", "config.yaml")
    assert result.returncode == 1
    assert "applications[0].import_path" in result.stderr
    assert "weights missing" in result.stderr and "broken.py" in result.stderr
    # Nothing changed.
    assert sorted(instance.details()["applications"]) == ["greet", "script"]
    assert instance.replica_pids("greet") == before


def test_a_constructor_that_raises_names_app_deployment_and_traceback(instance: Instance
                                                                       ) -> None:
    (instance.app_dir / "model.py").write_text(MODEL + textwrap.dedent('''
        @serve.deployment
        class Broken:
            def __init__(self):
                raise ValueError("no weights here")

        broken = Broken.bind()
    '''))
    instance.start()
    (instance.app_dir / "config.yaml").write_text(
        "applications:\n- name: bad\n  route_prefix: /bad\n  import_path: model:broken\n")
    result = instance.ladle("deploy", "config.yaml")
    assert result.returncode == 1
    assert "application 'bad' failed to deploy" in result.stderr
    assert "Broken" in result.stderr and "no weights here" in result.stderr
    assert "Traceback (most recent call last)" in result.stderr


def test_build_writes_a_config_that_deploys(instance: Instance) -> None:
    (instance.app_dir / "model.py").write_text(MODEL)
    built = instance.ladle("build", "model:app", "-o", "built.yaml", check=True)
    assert "wrote built.yaml" in built.stderr
    text = (instance.app_dir / "built.yaml").read_text()
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert config.applications[0].import_path == "model:app"
    assert config.applications[0].deployments[0].user_options() == {
        "user_config": {"greeting": "hi"}}
    # Keep it local: ladle's defaults (127.0.0.1) for what the file leaves out.
    (instance.app_dir / "built.yaml").write_text(
        text.replace("host: 0.0.0.0", "host: 127.0.0.1"))
    instance.start()
    instance.ladle("deploy", "built.yaml", check=True)
    assert instance.get("/").json()["greeting"] == "hi"


def test_ladle_run_a_config_file_without_an_instance(instance: Instance) -> None:
    (instance.app_dir / "model.py").write_text(MODEL)
    (instance.app_dir / "config.yaml").write_text(CONFIG.format(n=1, greeting="yo"))
    with popen(instance, "run", "config.yaml", "--port", "0") as (proc, err_path):
        def ready() -> bool:
            assert proc.poll() is None, err_path.read_text()
            return "is ready at" in err_path.read_text()
        wait_for(ready, timeout_s=60, message="`ladle run config.yaml` to be ready")
        status = instance.ladle("status", check=True).stdout
        assert "greet:" in status and "RUNNING" in status
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def test_ladle_run_reload_restarts_replicas_on_a_change(instance: Instance) -> None:
    import re

    import httpx

    (instance.app_dir / "model.py").write_text(MODEL)
    with popen(instance, "run", "model:app", "--port", "0", "--reload") as (proc, err_path):
        def ready_url() -> str | None:
            assert proc.poll() is None, err_path.read_text()
            found = re.search(r"ready at (http://\S+)", err_path.read_text())
            return found.group(1) if found and "watching" in err_path.read_text() else None
        url = wait_for(ready_url, timeout_s=60, message="`ladle run --reload` to be ready")
        first = httpx.get(url, timeout=30).json()
        assert first["version"] == 1
        (instance.app_dir / "model.py").write_text(MODEL.replace('"version": 1',
                                                                 '"version": 2'))

        def reloaded() -> dict[str, object] | None:
            answer = httpx.get(url, timeout=30).json()
            return answer if answer["version"] == 2 else None
        second = wait_for(reloaded, timeout_s=60, message="the new code to serve")
        assert second["pid"] != first["pid"]
        assert "changed; redeploying" in err_path.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0

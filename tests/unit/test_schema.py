"""``ladle.serve.schema``: Ray 2.60's config schema, its defaults, and what ladle refuses.

The field lists and defaults below were read from Ray 2.60's ``ray.serve.schema``;
the YAML documents are the configs of Ray's docs (doc/source/serve/doc_code/).
"""

from __future__ import annotations

import pydantic
import pytest
import yaml

from ladle.serve.config import ProxyLocation
from ladle.serve.schema import (
    ApplicationDetails,
    DeploymentDetails,
    DeploymentSchema,
    DeploymentStatus,
    HTTPOptionsSchema,
    LoggingConfig,
    ReplicaDetails,
    ServeApplicationSchema,
    ServeDeploySchema,
    ServeInstanceDetails,
    ServeStatus,
    gRPCOptionsSchema,
)
from ladle.serve.schema import ApplicationStatus as SchemaApplicationStatus
from ladle._api.status import ApplicationStatus

RAY_DOC_CONFIGS = {
    "config.yaml": """
proxy_location: EveryNode

http_options:

  host: 0.0.0.0

  port: 8000

applications:

- name: app1

  route_prefix: /calculator

  import_path: basic_calculator.app

  runtime_env: {}

  deployments:

  - name: Adder

  - name: Multiplier

  - name: Router

  - name: DAGDriver

- name: app2

  route_prefix: /greet

  import_path: basic_greet:app

  runtime_env: {}

  deployments:

  - name: greet

  - name: DAGDriver
""",
    "application_level_autoscaling.yaml": """
applications:
  - name: MyApp
    import_path: application_level_autoscaling:app
    autoscaling_policy:
      policy_function: autoscaling_policy:coordinated_scaling_policy
    deployments:
      - name: Preprocessor
        autoscaling_config:
          min_replicas: 1
          max_replicas: 10
      - name: Model
        autoscaling_config:
          min_replicas: 2
          max_replicas: 20
""",
    "application_level_autoscaling_with_defaults.yaml": """
applications:
  - name: MyApp
    import_path: application_level_autoscaling:app
    autoscaling_policy:
      policy_function: autoscaling_policy:coordinated_scaling_policy_with_defaults
    deployments:
      - name: Preprocessor
        autoscaling_config:
          min_replicas: 1
          max_replicas: 10
          target_ongoing_requests: 1
          upscale_delay_s: 2
          downscale_delay_s: 5
      - name: Model
        autoscaling_config:
          min_replicas: 2
          max_replicas: 20
          target_ongoing_requests: 1
          upscale_delay_s: 3
          downscale_delay_s: 5
""",
    "async_inference_autoscaling.yaml": """
applications:
  - name: default
    import_path: my_module:app
    deployments:
      - name: MyConsumer
        max_ongoing_requests: 5
        autoscaling_config:
          min_replicas: 1
          max_replicas: 10
          target_ongoing_requests: 2
          policy:
            policy_function: "ray.serve.async_inference_autoscaling_policy:AsyncInferenceAutoscalingPolicy"
            policy_kwargs:
              broker_url: "redis://localhost:6379/0"
              queue_name: "my_queue"
""",
    "external_scaler_config.yaml": """
applications:
  - name: my-app
    import_path: my_module:app
    external_scaler_enabled: true
    deployments:
      - name: TextProcessor
        num_replicas: 1
""",
    "nixl_example.yaml": """
applications:
  - args:
      prefill_config:
        model_loading_config:
          model_id: meta-llama/Llama-3.1-8B-Instruct
        deployment_config:
          autoscaling_config:
            min_replicas: 2
            max_replicas: 4
      decode_config:
        model_loading_config:
          model_id: meta-llama/Llama-3.1-8B-Instruct
    import_path: ray.serve.llm:build_pd_openai_app
    name: pd-disaggregation-nixl
    route_prefix: "/"
""",
    # serveConfigV2 of fault_tolerance/k8s_config.yaml
    "k8s_config.yaml (serveConfigV2)": """
applications:
  - name: sleepy_pid
    import_path: sleepy_pid:app
    route_prefix: /
    runtime_env:
      working_dir: "https://github.com/ray-project/serve_config_examples/archive/42d10bab77741b40d11304ad66d39a4ec2345247.zip"
    deployments:
      - name: SleepyPid
        num_replicas: 6
        ray_actor_options:
          num_cpus: 0
""",
    # what `serve build` writes on Ray 2.60
    "serve build output": """
proxy_location: EveryNode

http_options:
  host: 0.0.0.0
  port: 8000

grpc_options:
  port: 9000
  grpc_servicer_functions: []
  enable_reflection: true

logging_config:
  encoding: TEXT
  log_level: INFO
  logs_dir: null
  enable_access_log: true
  additional_log_standard_attrs: []

applications:
- name: app1
  route_prefix: /
  import_path: app1:app
  runtime_env: {}
  deployments:
  - name: A
    num_replicas: 2
    user_config:
      a: 1
  - name: B
""",
}


@pytest.mark.parametrize("name", sorted(RAY_DOC_CONFIGS))
def test_ray_doc_configs_validate(name: str) -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(RAY_DOC_CONFIGS[name]))
    assert config.applications


def test_defaults_are_rays() -> None:
    config = ServeDeploySchema.model_validate({"applications": [{"import_path": "m:app"}]})
    assert config.proxy_location is ProxyLocation.EveryNode
    assert config.http_options.model_dump() == {
        "host": "0.0.0.0", "port": 8000, "root_path": "", "request_timeout_s": None,
        "keep_alive_timeout_s": 90, "ssl_keyfile": None, "ssl_certfile": None,
        "ssl_keyfile_password": None, "ssl_ca_certs": None}
    assert config.grpc_options.model_dump() == {
        "port": 9000, "grpc_servicer_functions": [], "request_timeout_s": None,
        "enable_reflection": True}
    assert (config.controller_options, config.logging_config, config.tracing_config,
            config.target_capacity) == (None, None, None, None)
    app = config.applications[0]
    assert (app.name, app.route_prefix, app.runtime_env, app.host, app.port, app.deployments,
            app.autoscaling_policy, app.args, app.logging_config,
            app.external_scaler_enabled) == (
        "default", "/", {}, "0.0.0.0", 8000, [], None, {}, None, False)
    assert LoggingConfig().model_dump() == {
        "encoding": "TEXT", "log_level": "INFO", "logs_dir": None, "enable_access_log": True,
        "additional_log_standard_attrs": []}
    # Only what the file says is set: the rest keeps what the code says.
    assert config.model_dump(exclude_unset=True) == {"applications": [{"import_path": "m:app"}]}


def test_field_names_are_rays() -> None:
    assert list(ServeDeploySchema.model_fields) == [
        "proxy_location", "http_options", "grpc_options", "controller_options",
        "logging_config", "tracing_config", "applications", "target_capacity"]
    assert list(ServeApplicationSchema.model_fields) == [
        "name", "route_prefix", "import_path", "runtime_env", "host", "port", "deployments",
        "autoscaling_policy", "args", "logging_config", "external_scaler_enabled"]
    assert list(DeploymentSchema.model_fields) == [
        "name", "num_replicas", "max_ongoing_requests", "max_queued_requests",
        "backpressure_config", "user_config", "autoscaling_config",
        "graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s",
        "health_check_period_s", "health_check_timeout_s", "ray_actor_options",
        "placement_group_bundles", "placement_group_strategy",
        "placement_group_bundle_label_selector", "max_replicas_per_node", "logging_config",
        "request_router_config", "gang_scheduling_config", "deployment_actors",
        "rolling_update_percentage", "max_surge_percent"]
    assert list(HTTPOptionsSchema.model_fields) == [
        "host", "port", "root_path", "request_timeout_s", "keep_alive_timeout_s",
        "ssl_keyfile", "ssl_certfile", "ssl_keyfile_password", "ssl_ca_certs"]
    assert list(gRPCOptionsSchema.model_fields) == [
        "port", "grpc_servicer_functions", "request_timeout_s", "enable_reflection"]


def test_deployment_overrides_are_what_the_file_says() -> None:
    dep = DeploymentSchema.model_validate(
        {"name": "Model", "num_replicas": 3, "user_config": {"threshold": 0.5},
         "ray_actor_options": {"num_cpus": 1}})
    assert dep.user_options() == {"num_replicas": 3, "user_config": {"threshold": 0.5},
                                  "ray_actor_options": {"num_cpus": 1.0}}
    assert DeploymentSchema(name="x").user_options() == {}
    assert DeploymentSchema(name="x", num_replicas="auto").is_autoscaling_configured()


def _error(data: object) -> list[dict[str, object]]:
    with pytest.raises(pydantic.ValidationError) as info:
        ServeDeploySchema.model_validate(data)
    return info.value.errors(include_url=False)  # type: ignore[return-value]


def _app(**fields: object) -> dict[str, object]:
    return {"applications": [{"import_path": "m:app", **fields}]}


def test_unknown_fields_are_refused_where_they_are() -> None:
    # Ray ignores unknown keys; ladle refuses them, so a typo never passes silently.
    assert _error({**_app(), "proxy_locaton": "HeadOnly"})[0]["loc"] == ("proxy_locaton",)
    assert _error(_app(routeprefix="/a"))[0]["loc"] == ("applications", 0, "routeprefix")
    errors = _error(_app(deployments=[{"name": "D", "num_replica": 2}]))
    assert errors[0]["loc"] == ("applications", 0, "deployments", 0, "num_replica")
    assert errors[0]["type"] == "extra_forbidden"


def test_wrong_types_are_refused_not_coerced() -> None:
    errors = _error(_app(deployments=[{"name": "D", "max_ongoing_requests": "5"}]))
    assert errors[0]["loc"] == ("applications", 0, "deployments", 0, "max_ongoing_requests")
    assert _error(_app(deployments=[{"name": "D", "num_replicas": True}]))
    assert _error(_app(route_prefix=5))[0]["loc"] == ("applications", 0, "route_prefix")
    assert _error({"applications": {"import_path": "m:app"}})[0]["loc"] == ("applications",)
    assert _error({**_app(), "proxy_location": "Nowhere"})[0]["loc"] == ("proxy_location",)


@pytest.mark.parametrize("data, message", [
    ({"applications": [{"import_path": "m:app"}, {"import_path": "n:app", "route_prefix": "/n"}]},
     "multiple configs for application(s) ['default']"),
    ({"applications": [{"name": "a", "import_path": "m:app"},
                       {"name": "b", "import_path": "n:app"}]},
     "duplicate applications for route prefix(es) ['/']"),
    ({"applications": [{"name": "", "import_path": "m:app"}]}, "names must be nonempty"),
    (_app(host="127.0.0.1"), "set host in the top level deploy config only"),
    (_app(port=8001), "set port in the top level deploy config only"),
    (_app(import_path="module"), "at least one dot or colon"),
    (_app(import_path="a:b:c"), "at most one colon"),
    (_app(route_prefix="api"), 'Route prefix must start with "/"'),
    (_app(route_prefix="/api/"), 'cannot end with "/"'),
    (_app(deployments=[{"name": "D", "num_replicas": 2, "autoscaling_config": {}}]),
     "num_replicas is not allowed when autoscaling_config is provided"),
    (_app(deployments=[{"name": "D"}, {"name": "D"}]), "multiple configs for deployment(s)"),
    (_app(deployments=[{"name": "D", "max_queued_requests": 0}]), "max_queued_requests"),
    ({**_app(), "logging_config": {"log_level": "LOUD"}}, "log_level must be one of"),
    ({**_app(), "logging_config": {"encoding": "XML"}}, "Encoding must be one of"),
    ({**_app(), "http_options": {"ssl_keyfile": "k.pem"}}, "ssl_keyfile and ssl_certfile"),
])
def test_bad_values_are_refused(data: object, message: str) -> None:
    assert any(message in str(e["msg"]) for e in _error(data))


def test_logging_config_normalises_levels() -> None:
    assert LoggingConfig(log_level=10).log_level == "DEBUG"
    assert LoggingConfig(additional_log_standard_attrs=["name", "name"]
                         ).additional_log_standard_attrs == ["name"]
    with pytest.raises(pydantic.ValidationError):
        LoggingConfig(additional_log_standard_attrs=["nope"])


def test_status_objects_are_reexported() -> None:
    assert SchemaApplicationStatus is ApplicationStatus
    assert ServeStatus().applications == {}


def test_details_round_trip_through_json() -> None:
    details = ServeInstanceDetails(
        proxy_location=ProxyLocation.HeadOnly, http_options=HTTPOptionsSchema(port=8001),
        proxies={}, applications={"app": ApplicationDetails(
            name="app", route_prefix="/", status=SchemaApplicationStatus.RUNNING, message="",
            last_deployed_time_s=1.5, source="declarative",
            deployed_app_config=ServeApplicationSchema(import_path="m:app"),
            deployments={"D": DeploymentDetails(
                name="D", status=DeploymentStatus.HEALTHY, message="",
                deployment_config=DeploymentSchema(name="D", num_replicas=1),
                target_num_replicas=1, replicas=[ReplicaDetails(
                    replica_id="D-1", state="RUNNING", pid=12, start_time_s=1.0)])})})
    again = ServeInstanceDetails.model_validate_json(details.model_dump_json())
    assert again == details
    assert again.applications["app"].deployments["D"].replicas[0].pid == 12

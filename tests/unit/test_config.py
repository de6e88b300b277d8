"""Validation rules of ladle._api.config: options, autoscaling, HTTP, route prefixes, settings."""

from __future__ import annotations

import pickle
from typing import Any

import pydantic
import pytest

from ladle._api.config import (
    DEFAULT_ROUTE_PREFIX_UNSET,
    AutoscalingConfig,
    DeploymentConfig,
    HTTPOptions,
    ProxyLocation,
    Settings,
    build_deployment_config,
    gRPCOptions,
    load_settings,
    normalize_proxy_location,
    parse_http_options,
    settings,
    validate_deployment_options,
    validate_route_prefix,
)


def _raises(exc_type: type[Exception], **options: Any) -> str:
    """Call validate_deployment_options expecting exactly exc_type (never pydantic's); return the message."""
    with pytest.raises(Exception) as info:
        validate_deployment_options(**options)
    assert type(info.value) is exc_type, repr(info.value)
    assert not isinstance(info.value, pydantic.ValidationError)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- validate_deployment_options: happy paths ---------------------------------


def test_valid_options_are_returned_as_given() -> None:
    options = validate_deployment_options(
        name="Model",
        num_replicas=2,
        max_ongoing_requests=16,
        max_queued_requests=10,
        user_config={"threshold": 0.5},
        health_check_period_s=1,
        health_check_timeout_s=2.5,
        graceful_shutdown_timeout_s=0,
        graceful_shutdown_wait_loop_s=0.5,
        ray_actor_options={"num_cpus": 1, "num_gpus": 0.5, "resources": {"tpu": 1}, "runtime_env": {}},
        version="v1",
        route_prefix="/api",
    )
    assert options["num_replicas"] == 2
    assert options["health_check_period_s"] == 1.0 and isinstance(options["health_check_period_s"], float)
    assert options["route_prefix"] == "/api"
    assert set(options) == {
        "name", "num_replicas", "max_ongoing_requests", "max_queued_requests", "user_config",
        "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s",
        "graceful_shutdown_wait_loop_s", "ray_actor_options", "version", "route_prefix",
    }  # fmt: skip


def test_no_options_is_empty() -> None:
    assert validate_deployment_options() == {}


def test_autoscaling_dict_becomes_config() -> None:
    options = validate_deployment_options(autoscaling_config={"min_replicas": 0, "max_replicas": 3})
    config = options["autoscaling_config"]
    assert isinstance(config, AutoscalingConfig)
    assert (config.min_replicas, config.max_replicas) == (0, 3)


def test_none_allowed_where_optional() -> None:
    options = validate_deployment_options(
        num_replicas=None, user_config=None, autoscaling_config=None,
        ray_actor_options=None, version=None, route_prefix=None, name=None,
    )
    assert all(value is None for value in options.values())


def test_max_ongoing_below_autoscaling_target_is_fine() -> None:
    validate_deployment_options(max_ongoing_requests=1, autoscaling_config={"target_ongoing_requests": 10})


def test_max_queued_requests_minus_one_means_unbounded() -> None:
    assert validate_deployment_options(max_queued_requests=-1) == {"max_queued_requests": -1}


# --- validate_deployment_options: errors ---------------------------------------


def test_unknown_option_is_type_error_listing_valid_ones() -> None:
    message = _raises(TypeError, num_replica=2)
    assert "num_replica" in message and "num_replicas" in message and "max_ongoing_requests" in message


def test_renamed_option_gets_a_hint() -> None:
    assert "max_ongoing_requests" in _raises(TypeError, max_concurrent_queries=5)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_ongoing_requests", "5"),
        ("max_ongoing_requests", 5.0),
        ("max_ongoing_requests", True),
        ("max_queued_requests", None),
        ("num_replicas", 2.0),
        ("num_replicas", True),
        ("health_check_period_s", "10"),
        ("health_check_timeout_s", False),
        ("graceful_shutdown_timeout_s", None),
        ("name", 3),
        ("version", 1),
        ("route_prefix", 1),
        ("autoscaling_config", [1]),
        ("ray_actor_options", "cpu=1"),
    ],
)
def test_wrong_type_is_type_error_naming_option_and_types(option: str, value: Any) -> None:
    message = _raises(TypeError, **{option: value})
    assert option in message
    assert type(value).__name__ in message


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("num_replicas", 0),
        ("num_replicas", -1),
        ("num_replicas", "five"),
        ("max_ongoing_requests", 0),
        ("max_queued_requests", 0),
        ("max_queued_requests", -2),
        ("health_check_period_s", 0),
        ("health_check_timeout_s", -1.0),
        ("health_check_period_s", float("nan")),
        ("graceful_shutdown_timeout_s", -0.5),
        ("graceful_shutdown_wait_loop_s", -1),
        ("name", ""),
        ("name", "a#b"),
        ("name", "a/b"),
    ],
)
def test_bad_value_is_value_error_naming_option_and_value(option: str, value: Any) -> None:
    message = _raises(ValueError, **{option: value})
    assert option in message
    assert repr(value) in message


def test_user_config_must_be_json_serializable() -> None:
    assert "user_config" in _raises(ValueError, user_config={"fn": object()})
    circular: list[Any] = []
    circular.append(circular)
    assert "user_config" in _raises(ValueError, user_config=circular)


def test_num_replicas_with_autoscaling_config_is_rejected() -> None:
    message = _raises(ValueError, num_replicas=2, autoscaling_config={"max_replicas": 3})
    assert message == "Manually setting num_replicas is not allowed when autoscaling_config is provided."


def test_misspelled_autoscaling_key_is_named() -> None:
    message = _raises(ValueError, autoscaling_config={"min_replica": 1})
    assert "autoscaling_config" in message and "'min_replica'" in message


def test_autoscaling_field_type_is_strict() -> None:
    message = _raises(TypeError, autoscaling_config={"max_replicas": "3"})
    assert "autoscaling_config.max_replicas" in message and "str" in message


@pytest.mark.parametrize(
    "autoscaling",
    [
        {"min_replicas": -1},
        {"max_replicas": 0},
        {"min_replicas": 3, "max_replicas": 2},
        {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 4},
        {"min_replicas": 2, "max_replicas": 3, "initial_replicas": 1},
        {"target_ongoing_requests": 0},
        {"upscale_delay_s": -1},
        {"downscale_smoothing_factor": 0},
    ],
)
def test_bad_autoscaling_values(autoscaling: dict[str, Any]) -> None:
    assert "autoscaling_config" in _raises(ValueError, autoscaling_config=autoscaling)


@pytest.mark.parametrize(
    ("actor_options", "error", "named"),
    [
        ({"num_cpu": 1}, ValueError, "num_cpu"),
        ({"num_cpus": -1}, ValueError, "num_cpus"),
        ({"num_gpus": "1"}, TypeError, "num_gpus"),
        ({"memory": True}, TypeError, "memory"),
        ({"resources": {"tpu": -1}}, ValueError, "tpu"),
        ({"resources": ["tpu"]}, TypeError, "resources"),
        ({"accelerator_type": 1}, TypeError, "accelerator_type"),
        ({"runtime_env": "env"}, TypeError, "runtime_env"),
    ],
)
def test_ray_actor_options(actor_options: dict[str, Any], error: type[Exception], named: str) -> None:
    message = _raises(error, ray_actor_options=actor_options)
    assert "ray_actor_options" in message and named in message


def test_bad_route_prefix_option_is_value_error() -> None:
    assert "'/api/'" in _raises(ValueError, route_prefix="/api/")


# --- DeploymentConfig -------------------------------------------------------------


def test_defaults() -> None:
    config = build_deployment_config({})
    assert config.num_replicas is None and config.max_ongoing_requests == 5 and config.max_queued_requests == -1
    assert config.route_prefix is DEFAULT_ROUTE_PREFIX_UNSET and not config.route_prefix_given
    assert config.resolved_autoscaling() is None
    assert config.initial_num_replicas() == 1


def test_route_prefix_none_is_given() -> None:
    config = build_deployment_config({"route_prefix": None})
    assert config.route_prefix is None and config.route_prefix_given


def test_fixed_replicas() -> None:
    assert build_deployment_config({"num_replicas": 3}).initial_num_replicas() == 3


def test_auto_uses_ray_defaults() -> None:
    config = build_deployment_config({"num_replicas": "auto"})
    autoscaling = config.resolved_autoscaling()
    assert autoscaling is not None
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 100, 2.0)
    assert autoscaling.initial_replicas is None
    assert config.initial_num_replicas() == 1


def test_auto_merges_given_autoscaling_over_defaults() -> None:
    options = validate_deployment_options(num_replicas="auto", autoscaling_config={"min_replicas": 2})
    autoscaling = build_deployment_config(options).resolved_autoscaling()
    assert autoscaling is not None and (autoscaling.min_replicas, autoscaling.max_replicas) == (2, 100)
    config = build_deployment_config({"num_replicas": "auto", "autoscaling_config": AutoscalingConfig(min_replicas=0)})
    autoscaling = config.resolved_autoscaling()
    assert autoscaling is not None and (autoscaling.min_replicas, autoscaling.max_replicas) == (0, 100)


def test_initial_num_replicas_with_autoscaling() -> None:
    def initial(**autoscaling: Any) -> int:
        return build_deployment_config({"autoscaling_config": autoscaling}).initial_num_replicas()

    assert initial(min_replicas=2, max_replicas=5) == 2
    assert initial(min_replicas=1, initial_replicas=3, max_replicas=5) == 3
    assert initial(min_replicas=0, max_replicas=5) == 0


def test_config_is_frozen_and_pickles() -> None:
    config = build_deployment_config({"num_replicas": "auto", "user_config": {"a": 1}})
    with pytest.raises(pydantic.ValidationError):
        config.max_ongoing_requests = 2
    restored = pickle.loads(pickle.dumps(config))
    assert restored == config and restored.route_prefix is DEFAULT_ROUTE_PREFIX_UNSET


def test_build_translates_errors() -> None:
    with pytest.raises(ValueError, match="num_replicas") as info:
        build_deployment_config({"num_replicas": 0})
    assert not isinstance(info.value, pydantic.ValidationError)
    with pytest.raises(TypeError, match="num_replicas"):
        build_deployment_config({"num_replicas": 1.5})


def test_option_names_match_config_fields() -> None:
    with pytest.raises(TypeError) as info:
        validate_deployment_options(bogus=1)
    listed = str(info.value).split("Valid options are: ")[1].split(", ")
    assert set(listed) == set(DeploymentConfig.model_fields)


# --- AutoscalingConfig -------------------------------------------------------------


def test_autoscaling_defaults_mirror_ray() -> None:
    config = AutoscalingConfig()
    assert (config.min_replicas, config.max_replicas, config.initial_replicas) == (1, 1, None)
    assert (config.target_ongoing_requests, config.upscale_delay_s, config.downscale_delay_s) == (2.0, 30.0, 600.0)
    assert (config.metrics_interval_s, config.look_back_period_s, config.smoothing_factor) == (10.0, 30.0, 1.0)
    assert config.get_upscaling_factor() == 1.0
    assert AutoscalingConfig(upscale_smoothing_factor=2.0).get_upscaling_factor() == 2.0
    assert AutoscalingConfig(downscaling_factor=0.5).get_downscaling_factor() == 0.5


def test_autoscaling_assignment_is_validated() -> None:
    config = AutoscalingConfig(max_replicas=3)
    with pytest.raises(ValueError, match="min_replicas"):
        config.min_replicas = 5


# --- route prefixes ------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [None, "/", "/api", "/a/b", "/a-b_c.d"])
def test_valid_route_prefixes(prefix: str | None) -> None:
    assert validate_route_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "api", "/api/", "//", "/a/{id}", "/a}", "/a b", "/a\tb"])
def test_invalid_route_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_route_prefix(prefix)
    assert repr(prefix) in str(info.value)


def test_route_prefix_must_be_str() -> None:
    with pytest.raises(TypeError, match="route_prefix"):
        validate_route_prefix(1)  # type: ignore[arg-type]


# --- proxy location and HTTP options -----------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ProxyLocation.Disabled),
        ("NoServer", ProxyLocation.Disabled),
        ("Disabled", ProxyLocation.Disabled),
        ("HeadOnly", ProxyLocation.HeadOnly),
        ("EveryNode", ProxyLocation.EveryNode),
        (ProxyLocation.EveryNode, ProxyLocation.EveryNode),
    ],
)
def test_normalize_proxy_location(value: Any, expected: ProxyLocation) -> None:
    assert normalize_proxy_location(value) is expected


@pytest.mark.parametrize("value", ["headonly", "Everywhere", 1, ""])
def test_bad_proxy_location_lists_allowed(value: Any) -> None:
    with pytest.raises(ValueError, match="HeadOnly.*EveryNode.*NoServer") as info:
        normalize_proxy_location(value)
    assert repr(value) in str(info.value)


def test_http_options_defaults() -> None:
    options = HTTPOptions()
    assert (options.host, options.port, options.location) == ("127.0.0.1", 8000, ProxyLocation.HeadOnly)
    assert options.middlewares == [] and options.request_timeout_s is None and options.root_path == ""
    assert (options.keep_alive_timeout_s, options.max_request_body_bytes) == (90.0, 100 * 1024 * 1024)
    assert options.debug is False
    assert HTTPOptions().middlewares is not options.middlewares


@pytest.mark.parametrize("location", ["NoServer", None])
def test_http_options_location_disabled(location: str | None) -> None:
    assert HTTPOptions(location=location).location is ProxyLocation.Disabled  # type: ignore[arg-type]
    assert parse_http_options({"location": location}).location is ProxyLocation.Disabled


def test_http_options_accepts_arbitrary_middlewares() -> None:
    class Middleware:
        pass

    middleware = Middleware()
    assert HTTPOptions(middlewares=[middleware]).middlewares == [middleware]


@pytest.mark.parametrize(
    ("options", "error", "named"),
    [
        ({"port": 70000}, ValueError, "port"),
        ({"port": -1}, ValueError, "port"),
        ({"port": "8000"}, TypeError, "port"),
        ({"location": "Nowhere"}, ValueError, "Nowhere"),
        ({"request_timeout_s": 0}, ValueError, "request_timeout_s"),
        ({"keep_alive_timeout_s": -1}, ValueError, "keep_alive_timeout_s"),
        ({"max_request_body_bytes": 0}, ValueError, "max_request_body_bytes"),
        ({"root_path": "api"}, ValueError, "root_path"),
        ({"root_path": "/api/"}, ValueError, "root_path"),
        ({"prot": 8000}, ValueError, "'prot'"),
    ],
)
def test_bad_http_options(options: dict[str, Any], error: type[Exception], named: str) -> None:
    with pytest.raises(Exception) as info:
        parse_http_options(options)
    assert type(info.value) is error and named in str(info.value)
    with pytest.raises(ValueError):  # direct construction raises pydantic's ValueError subclass
        HTTPOptions(**options)


def test_parse_http_options_passthrough() -> None:
    options = HTTPOptions(port=0, root_path="/root")
    assert parse_http_options(options) is options
    assert parse_http_options(None) == HTTPOptions()
    with pytest.raises(TypeError, match="http_options"):
        parse_http_options(8000)  # type: ignore[arg-type]


def test_grpc_options() -> None:
    assert (gRPCOptions().port, gRPCOptions().grpc_servicer_functions) == (9000, [])


# --- settings -------------------------------------------------------------------------


def test_settings_defaults() -> None:
    assert load_settings({}) == Settings(
        run_dir=None, log_level="INFO", http_access_log=False, debug=False, start_timeout_s=60.0
    )


def test_settings_from_environ() -> None:
    loaded = load_settings(
        {
            "LADLE_RUN_DIR": "/tmp/ladle",
            "LADLE_LOG_LEVEL": "debug",
            "LADLE_HTTP_ACCESS_LOG": "1",
            "LADLE_DEBUG": "true",
            "LADLE_START_TIMEOUT_S": "5.5",
            "UNRELATED": "x",
        }
    )
    expected = Settings(run_dir="/tmp/ladle", log_level="DEBUG", http_access_log=True, debug=True, start_timeout_s=5.5)
    assert loaded == expected


def test_empty_variables_count_as_unset() -> None:
    assert load_settings({"LADLE_DEBUG": "", "LADLE_RUN_DIR": "", "LADLE_START_TIMEOUT_S": ""}) == Settings()


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("LADLE_LOG_LEVEL", "LOUD"),
        ("LADLE_HTTP_ACCESS_LOG", "yes please"),
        ("LADLE_DEBUG", "2"),
        ("LADLE_START_TIMEOUT_S", "soon"),
        ("LADLE_START_TIMEOUT_S", "0"),
        ("LADLE_START_TIMEOUT_S", "nan"),
    ],
)
def test_bad_settings_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ValueError, match=name):
        load_settings({name: raw})


def test_settings_are_frozen_and_loaded_once() -> None:
    assert settings() is settings()
    with pytest.raises(AttributeError):
        settings().debug = True  # type: ignore[misc]


def test_log_level_names_are_normalized() -> None:
    assert load_settings({"LADLE_LOG_LEVEL": "warn"}).log_level == "WARNING"
    assert load_settings({"LADLE_LOG_LEVEL": " error "}).log_level == "ERROR"


def test_ray_actor_options_stay_a_plain_dict() -> None:
    given = {"num_cpus": 2, "resources": {"tpu": 1}}
    options = validate_deployment_options(ray_actor_options=given)
    assert type(options["ray_actor_options"]) is dict and options["ray_actor_options"] == given

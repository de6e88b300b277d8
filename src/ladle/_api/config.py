"""Validated options and settings: what a deployment, the proxy and ladle accept.

Here live the ``ray.serve.config`` mirrors (AutoscalingConfig, ProxyLocation,
HTTPOptions, gRPCOptions), DeploymentConfig with ``validate_deployment_options``
(the one entry point for ``@serve.deployment`` and ``.options()``), route prefix
rules, and ``Settings``, every environment variable ladle reads. Nothing here
starts a runtime or reads the environment at import. Errors reach users as
one-line TypeError (wrong type) or ValueError (bad value), never pydantic's.
"""

from __future__ import annotations

import enum
import functools
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import pydantic
from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs it before Python 3.12


class _Model(pydantic.BaseModel):
    """Strict base: no coercion (an int is a float, nothing else converts)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, validate_assignment=True)


class AutoscalingConfig(_Model):
    """How a deployment scales between ``min_replicas`` and ``max_replicas``.

    Mirrors ``ray.serve.config.AutoscalingConfig``. A dict with the same keys is
    accepted wherever an AutoscalingConfig is; a misspelled key is an error.

    Example:
        >>> AutoscalingConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=8)
    """

    min_replicas: int = Field(default=1, ge=0)
    initial_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    metrics_interval_s: float = Field(default=10.0, gt=0)
    look_back_period_s: float = Field(default=30.0, gt=0)
    smoothing_factor: float = Field(default=1.0, gt=0)
    upscale_smoothing_factor: float | None = Field(default=None, gt=0)
    downscale_smoothing_factor: float | None = Field(default=None, gt=0)
    upscaling_factor: float | None = Field(default=None, gt=0)
    downscaling_factor: float | None = Field(default=None, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({initial}) must be between min_replicas ({self.min_replicas}) "
                f"and max_replicas ({self.max_replicas})"
            )
        return self

    def get_upscaling_factor(self) -> float:
        """The smoothing factor applied when scaling up."""
        return self.upscaling_factor or self.upscale_smoothing_factor or self.smoothing_factor

    def get_downscaling_factor(self) -> float:
        """The smoothing factor applied when scaling down."""
        return self.downscaling_factor or self.downscale_smoothing_factor or self.smoothing_factor


class ProxyLocation(str, enum.Enum):
    """Where HTTP proxies run: nowhere, on the head node only, or on every node."""

    Disabled = "Disabled"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"


def normalize_proxy_location(value: ProxyLocation | str | None) -> ProxyLocation:
    """Map a user's proxy location to ProxyLocation; ``"NoServer"`` and None mean Disabled."""
    if value is None or value == "NoServer":
        return ProxyLocation.Disabled
    if isinstance(value, str):
        try:
            return ProxyLocation(value)
        except ValueError:
            pass
    allowed = ", ".join([*(repr(p.value) for p in ProxyLocation), "'NoServer'", "None"])
    raise ValueError(f"Invalid proxy location {value!r}; allowed values are: {allowed}")


class HTTPOptions(_Model):
    """Options of the HTTP proxy, as passed to ``serve.start(http_options=...)``.

    Mirrors ``ray.serve.config.HTTPOptions``. ``location`` takes a ProxyLocation
    or its name; ``"NoServer"`` and None turn HTTP off, and so does ``host=None``.
    ``root_path`` is where an upstream proxy that strips it mounts ladle:
    requests arrive without it and apps see it in their scope.
    ``ssl_keyfile`` with ``ssl_certfile`` serve HTTPS (``ssl_keyfile_password``
    unlocks the key; ``ssl_ca_certs`` is loaded as uvicorn, and so Ray, loads it).

    Example:
        >>> HTTPOptions(host="0.0.0.0", port=8080, request_timeout_s=30)
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    host: str | None = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    location: Annotated[ProxyLocation, BeforeValidator(normalize_proxy_location)] = ProxyLocation.HeadOnly
    middlewares: list[Any] = Field(default_factory=list)
    request_timeout_s: float | None = Field(default=None, gt=0)
    root_path: str = ""
    root_url: str = ""
    keep_alive_timeout_s: float = Field(default=90.0, gt=0)
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile_password: str | None = None
    ssl_ca_certs: str | None = None
    num_cpus: int = 0
    max_request_body_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    debug: bool = False

    @field_validator("root_path")
    @classmethod
    def _check_root_path(cls, value: str) -> str:
        if value and (not value.startswith("/") or value.endswith("/")):
            raise ValueError(f"root_path must be '' or start with '/' and not end with '/', got {value!r}")
        return value

    @field_validator("num_cpus")
    @classmethod
    def _check_num_cpus(cls, value: int) -> int:
        if value:
            raise ValueError(f"num_cpus must be 0: the proxy reserves no CPUs (as in Ray Serve), got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_tls_and_host(self) -> HTTPOptions:
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise ValueError("Both ssl_keyfile and ssl_certfile must be provided together to enable HTTPS.")
        if self.host is None and self.location != ProxyLocation.Disabled:
            # Ray Serve's rule: no host, no proxy.  Not validate_assignment's way, which would recurse.
            object.__setattr__(self, "location", ProxyLocation.Disabled)
        return self


class gRPCOptions(_Model):  # noqa: N801 - Ray's name
    """Options of the gRPC proxy (accepted for compatibility with ``ray.serve.config``)."""

    port: int = Field(default=9000, ge=0, le=65535)
    grpc_servicer_functions: list[str] = Field(default_factory=list)


def parse_http_options(value: HTTPOptions | Mapping[str, Any] | None) -> HTTPOptions:
    """HTTPOptions from what ``serve.start`` was given; errors as TypeError/ValueError."""
    if value is None or isinstance(value, HTTPOptions):
        return value or HTTPOptions()
    if not isinstance(value, Mapping):
        raise TypeError(f"http_options must be a dict or HTTPOptions, got {type(value).__name__}")
    try:
        return HTTPOptions.model_validate(dict(value))
    except pydantic.ValidationError as exc:
        raise _translate(exc, "http_options") from None


def validate_route_prefix(route_prefix: str | None) -> str | None:
    """Check a route prefix: None (not exposed over HTTP) or "/" or "/a/b" without path params."""
    if route_prefix is None:
        return None
    if not isinstance(route_prefix, str):
        raise TypeError(f"route_prefix must be a str or None, got {type(route_prefix).__name__}")
    if not route_prefix.startswith("/"):
        problem = "must start with '/'"
    elif route_prefix != "/" and route_prefix.endswith("/"):
        problem = "must not end with '/' (unless it is exactly '/')"
    elif "{" in route_prefix or "}" in route_prefix:
        problem = "must not contain path parameters ('{' or '}')"
    elif any(ch.isspace() for ch in route_prefix):
        problem = "must not contain whitespace"
    else:
        return route_prefix
    raise ValueError(f"route_prefix {problem}, got {route_prefix!r}")


class _Unset(enum.Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "DEFAULT_ROUTE_PREFIX_UNSET"


DEFAULT_ROUTE_PREFIX_UNSET: Final = _Unset.UNSET
"""``DeploymentConfig.route_prefix`` when not given: callers pick the default
(``/{name}`` for the legacy ``Deployment.deploy()``); None means "not exposed"."""

_AUTO_DEFAULTS: Final[dict[str, Any]] = {"min_replicas": 1, "max_replicas": 100, "target_ongoing_requests": 2.0}

_Amount = Annotated[float, Field(ge=0)]


@pydantic.with_config(ConfigDict(strict=True, extra="forbid", allow_inf_nan=False))
class RayActorOptions(TypedDict, total=False):
    """The keys of Ray's ``ray_actor_options`` a deployment may set (a plain dict)."""

    num_cpus: _Amount
    num_gpus: _Amount
    memory: _Amount
    object_store_memory: _Amount
    resources: dict[str, _Amount]
    accelerator_type: str
    runtime_env: dict[str, Any]


def _type_error(what: str, expected: str, value: object) -> PydanticCustomError:
    context = {"what": what, "expected": expected, "got": type(value).__name__}
    return PydanticCustomError("option_type", "{what} must be {expected}, got {got}", context)


class DeploymentConfig(_Model):
    """The validated options of one deployment (immutable).

    Build it with ``build_deployment_config``. ``num_replicas`` None means one
    replica unless ``autoscaling_config`` is set; ``"auto"`` means autoscaling
    with Ray's defaults for auto (see ``resolved_autoscaling``).
    ``route_prefix`` is ``DEFAULT_ROUTE_PREFIX_UNSET`` when not given; check
    ``route_prefix_given`` before using it.
    """

    model_config = ConfigDict(frozen=True, validate_assignment=False)

    name: str | None = None
    num_replicas: int | Literal["auto"] | None = None
    max_ongoing_requests: int = Field(default=5, ge=1)
    max_queued_requests: int = -1
    user_config: Any = None
    autoscaling_config: Annotated[AutoscalingConfig | None, Field(strict=False)] = None
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0)
    graceful_shutdown_wait_loop_s: float = Field(default=2.0, ge=0)
    ray_actor_options: RayActorOptions | None = None
    version: str | None = None
    route_prefix: str | None | _Unset = DEFAULT_ROUTE_PREFIX_UNSET

    @model_validator(mode="before")
    @classmethod
    def _merge_auto_defaults(cls, data: Any) -> Any:
        # With "auto", the keys given are read on top of auto's defaults (as Ray does),
        # so {"min_replicas": 2} is valid even though max_replicas defaults to 1.
        if not isinstance(data, Mapping) or data.get("num_replicas") != "auto":
            return data
        given = data.get("autoscaling_config")
        if isinstance(given, AutoscalingConfig):
            given = {key: getattr(given, key) for key in given.model_fields_set}
        return {**data, "autoscaling_config": {**_AUTO_DEFAULTS, **given}} if isinstance(given, Mapping) else data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "#" in value or "/" in value):
            raise ValueError(f"name must be non-empty and contain no '#' or '/', got {value!r}")
        return value

    @field_validator("num_replicas", mode="before")
    @classmethod
    def _check_num_replicas(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        if isinstance(value, str):
            raise ValueError(f"num_replicas must be a positive int or 'auto', got {value!r}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error("num_replicas", "int, 'auto' or None", value)
        if value < 1:
            raise ValueError(f"num_replicas must be >= 1 (or 'auto'), got {value!r}")
        return value

    @field_validator("max_queued_requests")
    @classmethod
    def _check_max_queued(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"max_queued_requests must be -1 (unbounded) or >= 1, got {value!r}")
        return value

    @field_validator("user_config")
    @classmethod
    def _check_user_config(cls, value: Any) -> Any:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"user_config must be JSON-serializable: {exc}") from exc
        return value

    @field_validator("route_prefix", mode="before")
    @classmethod
    def _check_route_prefix(cls, value: Any) -> Any:
        if value is DEFAULT_ROUTE_PREFIX_UNSET:
            return value
        if value is not None and not isinstance(value, str):
            raise _type_error("route_prefix", "a str or None", value)
        return validate_route_prefix(value)

    @model_validator(mode="after")
    def _check_replicas(self) -> DeploymentConfig:
        if isinstance(self.num_replicas, int) and self.autoscaling_config is not None:
            raise ValueError("Manually setting num_replicas is not allowed when autoscaling_config is provided.")
        return self

    @property
    def route_prefix_given(self) -> bool:
        """Whether ``route_prefix`` was given (None included) rather than left unset."""
        return self.route_prefix is not DEFAULT_ROUTE_PREFIX_UNSET

    def resolved_autoscaling(self) -> AutoscalingConfig | None:
        """The effective autoscaling config, or None for a fixed number of replicas.

        ``num_replicas="auto"`` starts from min 1, max 100, target 2 ongoing
        requests; keys set explicitly in ``autoscaling_config`` override those.
        """
        if self.num_replicas == "auto" and self.autoscaling_config is None:
            return AutoscalingConfig.model_validate(_AUTO_DEFAULTS)
        return self.autoscaling_config

    def initial_num_replicas(self) -> int:
        """Replicas to start with: num_replicas, else initial_replicas, else min_replicas.

        With autoscaling and ``min_replicas=0`` this may be 0 (scale from zero).
        """
        if isinstance(self.num_replicas, int):
            return self.num_replicas
        autoscaling = self.resolved_autoscaling()
        if autoscaling is None:
            return 1
        initial = autoscaling.initial_replicas
        return autoscaling.min_replicas if initial is None else initial


_RENAMED: Final = {"max_concurrent_queries": "max_ongoing_requests"}


def validate_deployment_options(**options: Any) -> dict[str, Any]:
    """Validate options of ``@serve.deployment(...)`` or ``Deployment.options(...)``.

    Returns the given options with validated values (an autoscaling dict becomes
    an AutoscalingConfig, ints given for float options become floats). Raises
    TypeError for an unknown option or a wrong type (no coercion: ``"5"`` is not
    an int, nor is True) and ValueError for a bad value; both name the option.

    Example:
        >>> validate_deployment_options(num_replicas=2, autoscaling_config=None)
        {'num_replicas': 2, 'autoscaling_config': None}
    """
    for name in options:
        if name not in DeploymentConfig.model_fields:
            hint = f" (renamed to {_RENAMED[name]!r})" if name in _RENAMED else ""
            valid = ", ".join(DeploymentConfig.model_fields)
            raise TypeError(f"Unknown deployment option {name!r}{hint}. Valid options are: {valid}")
    # DeploymentConfig is strict, so a wrong type fails there (as a TypeError) rather than being coerced.
    config = build_deployment_config(options)
    return {name: getattr(config, name) for name in options}


def build_deployment_config(options: Mapping[str, Any]) -> DeploymentConfig:
    """The full DeploymentConfig from validated options, with defaults for the rest."""
    try:
        return DeploymentConfig.model_validate(dict(options))
    except pydantic.ValidationError as exc:
        raise _translate(exc) from None


def _translate(exc: pydantic.ValidationError, prefix: str = "") -> TypeError | ValueError:
    """One pydantic ValidationError -> one TypeError/ValueError with a one-line message."""
    # Raised `from None` by callers: the message carries everything, and
    # pydantic's multi-line dump in the traceback would only add noise.
    error = exc.errors(include_url=False)[0]
    where = ".".join([prefix, *map(str, error["loc"])] if prefix else map(str, error["loc"]))
    kind, value, message = error["type"], error.get("input"), error["msg"]
    if kind == "value_error":
        reason = str(error.get("ctx", {}).get("error", message))
        last = where.rpartition(".")[2]
        return ValueError(reason if not where or reason.startswith(last) else f"{where}: {reason}")
    if kind == "extra_forbidden":
        parent, _, key = where.rpartition(".")
        return ValueError(f"{parent or 'options'}: unknown key {key!r} (misspelled?)")
    if kind.endswith("_type") or kind in ("is_instance_of", "model_type"):
        if message.startswith("Input should be "):  # pydantic's wording, else ours (_type_error)
            message = f"{where} must be {message[16:]}, got {type(value).__name__} {value!r}"
        return TypeError(message)
    reason = message.replace("Input should be", "must be")
    return ValueError(f"Invalid {where}={value!r}: {reason}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every environment variable ladle reads, read once (see ``settings()``).

    LADLE_RUN_DIR          run_dir          None: computed by the caller
    LADLE_ADDRESS          address          None: the long-lived instance of run_dir, if any
    LADLE_LOG_LEVEL        log_level        "INFO"
    LADLE_HTTP_ACCESS_LOG  http_access_log  False ("0"/"1", "false"/"true")
    LADLE_DEBUG            debug            False; True sends tracebacks to HTTP clients
    LADLE_START_TIMEOUT_S  start_timeout_s  60.0
    An empty variable counts as unset.
    """

    run_dir: str | None = None
    address: str | None = None
    log_level: str = "INFO"
    http_access_log: bool = False
    debug: bool = False
    start_timeout_s: float = 60.0


_LOG_LEVELS: Final = {name: name for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")} | {"WARN": "WARNING"}
_BOOLS: Final = {"0": False, "false": False, "1": True, "true": True}


def _positive_float(raw: str) -> float:
    if not 0 < (value := float(raw)) < float("inf"):  # also false for nan
        raise ValueError(raw)
    return value


# variable -> (Settings field, what it must be, parser raising KeyError/ValueError)
_VARIABLES: Final[dict[str, tuple[str, str, Callable[[str], Any]]]] = {
    "LADLE_RUN_DIR": ("run_dir", "a path", str),
    "LADLE_ADDRESS": ("address", "unix:/path/to/controller.sock or a run directory", str),
    "LADLE_LOG_LEVEL": ("log_level", "a log level name (DEBUG, INFO, ...)", lambda raw: _LOG_LEVELS[raw.upper()]),
    "LADLE_HTTP_ACCESS_LOG": ("http_access_log", "'0' or '1'", lambda raw: _BOOLS[raw.lower()]),
    "LADLE_DEBUG": ("debug", "'0' or '1'", lambda raw: _BOOLS[raw.lower()]),
    "LADLE_START_TIMEOUT_S": ("start_timeout_s", "a positive number of seconds", _positive_float),
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read ladle's settings from ``environ`` (default ``os.environ``); bad values raise ValueError."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for variable, (field, expected, parse) in _VARIABLES.items():
        if raw := env.get(variable, "").strip():
            try:
                values[field] = parse(raw)
            except (KeyError, ValueError):
                raise ValueError(f"{variable} must be {expected}, got {raw!r}") from None
    return Settings(**values)


@functools.cache
def settings() -> Settings:
    """ladle's settings, loaded from the environment on the first call only."""
    return load_settings()

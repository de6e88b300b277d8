"""HTTPOptions as Ray Serve's (tests/unit/test_http_options.py there, ported by meaning):
TLS files come as a pair, Ray's other fields are accepted, ``host=None`` means no HTTP."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from ladle.serve.config import HTTPOptions, ProxyLocation


@pytest.mark.parametrize("tls_options", [
    {"ssl_keyfile": "key.pem"},
    {"ssl_keyfile": "key.pem", "ssl_certfile": None},
    {"ssl_certfile": "cert.pem"},
    {"ssl_certfile": "cert.pem", "ssl_keyfile": None},
])
def test_incomplete_tls_is_refused(tls_options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="Both ssl_keyfile and ssl_certfile"):
        HTTPOptions(**tls_options)


@pytest.mark.parametrize("tls_options", [
    {},
    {"ssl_keyfile": None},
    {"ssl_keyfile": None, "ssl_certfile": None},
    {"ssl_keyfile": "key.pem", "ssl_certfile": "cert.pem"},
])
def test_complete_or_no_tls_is_accepted(tls_options: dict[str, Any]) -> None:
    options = HTTPOptions(**tls_options)
    assert options.ssl_keyfile == tls_options.get("ssl_keyfile")
    assert options.ssl_certfile == tls_options.get("ssl_certfile")
    assert options.model_fields_set == set(tls_options)


def test_ray_fields_and_defaults() -> None:
    options = HTTPOptions()
    assert (options.ssl_keyfile_password, options.ssl_ca_certs, options.root_url,
            options.num_cpus) == (None, None, "", 0)
    assert options.keep_alive_timeout_s == 90
    assert HTTPOptions(root_url="http://example.com", num_cpus=0).root_url == "http://example.com"
    with pytest.raises(ValidationError, match="num_cpus"):
        HTTPOptions(num_cpus=1)


def test_no_host_means_no_http() -> None:
    assert HTTPOptions(host=None).location is ProxyLocation.Disabled
    options = HTTPOptions()
    options.host = None
    assert options.location is ProxyLocation.Disabled

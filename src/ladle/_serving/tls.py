"""HTTPS for the proxy: the TLS files from ``http_options`` and the server context they make.

The context is made the way uvicorn makes it from the same four options,
which is what Ray Serve's proxy gets: the certificate chain and key (with
an optional password), the CA file loaded for verification, client
certificates not requested.  Both of the proxy's servers (its own and, with
middlewares, uvicorn) serve TLS from the same listening socket.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from .._core.errors import LadleError


@dataclass(frozen=True)
class TlsFiles:
    certfile: str
    keyfile: str
    keyfile_password: str | None = None
    ca_certs: str | None = None

    def __repr__(self) -> str:  # the password stays out of logs and tracebacks
        return (f"TlsFiles(certfile={self.certfile!r}, keyfile={self.keyfile!r}, "
                f"ca_certs={self.ca_certs!r})")

    def uvicorn_options(self) -> dict[str, Any]:
        return {"ssl_certfile": self.certfile, "ssl_keyfile": self.keyfile,
                "ssl_keyfile_password": self.keyfile_password, "ssl_ca_certs": self.ca_certs}


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The proxy's TLS context, or an error that names the files and what is wrong."""
    from uvicorn.config import SSL_PROTOCOL_VERSION, create_ssl_context

    try:
        return create_ssl_context(files.certfile, files.keyfile, files.keyfile_password,
                                  SSL_PROTOCOL_VERSION, ssl.CERT_NONE, files.ca_certs, None)
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LadleError(
            f"The HTTP proxy could not load its TLS files (ssl_certfile={files.certfile!r}, "
            f"ssl_keyfile={files.keyfile!r}"
            + (f", ssl_ca_certs={files.ca_certs!r}" if files.ca_certs else "")
            + f"): {reason}. Check the paths, that the key matches the certificate, and "
            "ssl_keyfile_password for an encrypted key.") from None

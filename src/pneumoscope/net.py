"""One network probe for the package: fail in seconds where a client library would retry for
minutes (the Hugging Face hub offline, an MLflow server that is down)."""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def reachable(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Whether a TCP connection to ``url``'s host and port opens within ``timeout`` seconds,
    and the error when it does not (a URL without a host counts as unreachable)."""
    parts = urlparse(url)
    if not parts.hostname:
        return False, f"no host in {url!r}"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, str(exc)

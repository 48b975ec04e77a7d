"""What slow, abandoned or numerous clients may hold of the web service, and which ``Host``
names it answers. Plain values (no FastAPI import): the command line reads its defaults here."""

from __future__ import annotations

import math
from dataclasses import dataclass

LOOPBACK_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]")
"""``Host`` header values accepted by default (plus the address ``serve`` listens on)."""


@dataclass(frozen=True)
class ServeLimits:
    """How much slow, abandoned or numerous clients can hold of the service."""

    max_uploads: int = 16
    """Requests read or worked on at once; the next get 503 + ``Retry-After`` before their body
    is read. Bounds the upload bytes held in memory to about ``max_uploads x max_upload_bytes``."""
    body_timeout_s: float = 30.0
    """A request body (the upload) must arrive within this; else 408 and the connection closed."""
    header_timeout_s: float = 10.0
    """A new connection must send its request line and headers within this; else it is closed."""
    keep_alive_s: float = 5.0
    """An idle keep-alive connection is closed after this (uvicorn ``timeout_keep_alive``)."""
    max_connections: int = 64
    """Open connections plus running requests before uvicorn answers 503 (``limit_concurrency``)."""
    max_header_bytes: int = 16 * 1024
    """Largest request line + headers (h11 ``max_incomplete_event_size``); larger gets 400."""

    def __post_init__(self) -> None:
        for name in ("max_uploads", "max_connections", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("body_timeout_s", "header_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_connections <= self.max_uploads:
            raise ValueError(f"max_connections ({self.max_connections}) must be above max_uploads "
                             f"({self.max_uploads}): a busy answer needs a connection too")


def default_allowed_hosts(host: str) -> list[str]:
    """The ``Host`` values a server listening on ``host`` accepts by default: the loopback names
    and ``host`` itself (an IPv6 address in brackets, as a ``Host`` header writes it); not a
    wildcard address (0.0.0.0, ::), which no client names: pass the server's names instead."""
    hosts = list(LOOPBACK_HOSTS)
    named = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if host not in ("0.0.0.0", "::", "") and named.lower() not in hosts:
        hosts.append(named.lower())
    return hosts


__all__ = ["LOOPBACK_HOSTS", "ServeLimits", "default_allowed_hosts"]

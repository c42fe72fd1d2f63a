"""Whether two registry addresses name the same registry.

An archive's ``nbank.json`` names the registry its resources are recorded in; a
daemon must never register deposits into that archive in another registry. The
addresses are compared normalised: scheme and host in lower case, the default
port (80 for http, 443 for https) dropped, a trailing slash ignored. Other names
of the same registry (a second host name, a proxy) are listed in the
configuration's ``registry_aliases``.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise(url: str) -> str:
    """The comparable form of a registry URL (see the module docstring)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def same_registry(a: str, b: str, aliases: Iterable[str] = ()) -> bool:
    """True when ``a`` and ``b`` name one registry, directly or through ``aliases``
    (which count as names of ``b``)."""
    names = {normalise(b), *(normalise(x) for x in aliases)}
    return normalise(a) in names

"""The versions of nbankd and of the libraries it runs on, for ``--version`` and logs.

A lab that reports a problem (or a release of a dependency that changes behaviour)
needs to know exactly what ran; these are read from the installed distributions.
"""

from __future__ import annotations

from importlib import metadata

from nbankd import __version__

# distribution names, in the order shown; systemd-python is an optional extra
DEPENDENCIES = ("watchdog", "structlog", "requests", "PyYAML", "systemd-python")
OPTIONAL = frozenset({"systemd-python"})


def dependency_versions() -> dict[str, str]:
    """Distribution name -> installed version; optional ones absent are left out."""
    found = {}
    for name in DEPENDENCIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "" if name in OPTIONAL else "not installed"
    return {name: version for name, version in found.items() if version}


def version_text() -> str:
    """``nbankd X.Y (watchdog A, structlog B, ...)``: one line for ``--version``."""
    deps = ", ".join(f"{n} {v}" for n, v in dependency_versions().items())
    return f"nbankd {__version__} ({deps})"

"""What every scenario is given: a work folder, repetition count, and the servers."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import NBANK
from bench.server import DEFAULT_HASHER, FAST_HASHER, Server, start_server


@dataclass
class Context:
    work: Path  # scratch folder on the disk being measured
    repeats: int = 3
    quick: bool = False
    server_workers: int = 2
    keep: bool = False  # keep scratch folders (for debugging)
    profile: bool = False  # run nbankd under cProfile where a scenario supports it
    log: Any = print
    dtypes: dict[str, str] = field(default_factory=dict)  # server URL -> datatype made there
    _servers: dict[str, Server] = field(default_factory=dict)

    def server(self, hasher: str = "fast") -> Server:
        """The django-neurobank server with the given hasher ("fast" or "default"), started once."""
        if hasher not in self._servers:
            path = FAST_HASHER if hasher == "fast" else DEFAULT_HASHER
            self.log(f"  starting django-neurobank (gunicorn, {hasher} password hasher)")
            self._servers[hasher] = start_server(
                self.work / f"django-{hasher}", hasher=path, workers=self.server_workers
            )
        return self._servers[hasher]

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()

    def scratch(self, name: str) -> Path:
        """A fresh folder under the work folder."""
        path = self.work / f"{name}-{secrets.token_hex(3)}"
        path.mkdir(parents=True)
        return path

    def discard(self, path: Path) -> None:
        if not self.keep:
            shutil.rmtree(path, ignore_errors=True)

    def nbank_env(self, server: Server, home: Path) -> dict[str, str]:
        """Environment for the `nbank` client: a HOME with a netrc for ``server``."""
        home.mkdir(parents=True, exist_ok=True)
        server.write_netrc(home)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
        env.update({"HOME": str(home), "NBANK_REGISTRY": server.url})
        return env

    def nbank_init(self, server: Server, directory: Path, home: Path) -> str:
        """``nbank init DIR`` (registers the archive under the folder's name)."""
        proc = subprocess.run(
            [NBANK, "-r", server.url, "init", str(directory)],
            env=self.nbank_env(server, home),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"nbank init {directory} failed:\n{proc.stderr[-2000:]}")
        return directory.name


def unique(prefix: str) -> str:
    """A registry-safe unique name (slug, at most 32 characters)."""
    return f"{prefix}-{secrets.token_hex(5)}"[:32]

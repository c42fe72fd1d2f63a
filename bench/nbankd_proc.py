"""Runs the real ``nbankd`` daemon for a scenario and watches what it writes.

:class:`Nbankd` writes a configuration, starts ``nbankd -c FILE`` with a real
``$NOTIFY_SOCKET`` and returns once READY=1 arrives (as systemd would see it).
:class:`ReceiptTail` follows the receipt logs from a thread and stamps each new
receipt with the wall-clock time it appeared, so scenarios can time deposits to
about 10 ms without trusting the receipts' one-second ``time`` field.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import pyspy
from bench.common import NBANKCTL, NBANKD


@dataclass
class InboxSpec:
    path: Path
    archive: str
    dtype: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Nbankd:
    """One daemon: its folders, configuration and process."""

    root: Path
    registry: str = "embedded"  # or a django-neurobank URL
    auth: tuple[str, str] | None = None
    archives: list[dict[str, Any]] = field(default_factory=list)
    inboxes: list[InboxSpec] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.root / "state"
        self.config_path = self.root / "nbankd.yaml"
        # sockets in a short folder: AF_UNIX paths are limited to 107 bytes
        self.run_dir = Path(tempfile.mkdtemp(prefix="nbb-", dir="/tmp"))
        self.socket_path = self.run_dir / "control.sock"
        self.log_path = self.root / "nbankd.log"
        self.receipts_dir = self.state_dir / "receipts"

    def write_config(self) -> None:
        cfg: dict[str, Any] = {
            "registry": self.registry,
            "state_dir": str(self.state_dir),
            "control_socket": str(self.socket_path),
            "archives": self.archives,
            "inboxes": [
                {"path": str(i.path), "archive": i.archive, "dtype": i.dtype, **i.options}
                for i in self.inboxes
            ],
            "log": {"format": "json", "level": "info"},
            **self.extra,
        }
        if self.auth is not None:
            auth_file = self.root / "registry-auth"
            auth_file.write_text(f"{self.auth[0]}:{self.auth[1]}\n")
            auth_file.chmod(0o600)
            cfg["registry_auth"] = str(auth_file)
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def start(self, *, timeout: float = 120.0, env: dict[str, str] | None = None) -> float:
        """Starts the daemon; returns the seconds until it sent READY=1."""
        self.write_config()
        notify_path = self.run_dir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify_path))
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
        full_env.update({"NOTIFY_SOCKET": str(notify_path), **(env or {})})
        t0 = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [NBANKD, "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
            )
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(
                        f"nbankd did not send READY=1 (exit {self.proc.poll()}); "
                        f"log tail:\n{self.log_tail()}"
                    )
                sock.settimeout(min(remaining, 0.5))
                try:
                    msg = sock.recv(4096).decode(errors="replace")
                except TimeoutError:
                    continue
                if "READY=1" in msg:
                    ready = time.perf_counter() - t0
                    if pyspy.PROFILER is not None:
                        pyspy.PROFILER.attach(self.proc.pid, self.root.name)
                    return ready
        finally:
            sock.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ctl(self, *args: str) -> Any:
        """Runs ``nbankctl --json ARGS`` against this daemon; returns the parsed answer."""
        env = {**os.environ, "NBANKD_CONFIG": str(self.config_path)}
        proc = subprocess.run(
            [NBANKCTL, "-c", str(self.config_path), *args, "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=3600,
        )
        try:
            return json.loads(proc.stdout) if proc.stdout.strip() else {"exit": proc.returncode}
        except ValueError:
            return {"exit": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}

    def stop(self, *, final: bool = True) -> None:
        """Stops the daemon (SIGTERM, then SIGKILL after 60 s); ``final`` removes its sockets."""
        if self.proc is not None and pyspy.PROFILER is not None:
            pyspy.PROFILER.detach(self.proc.pid)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if final:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def log_errors(self) -> list[str]:
        """Log lines at warning level or above (for the notes of a run)."""
        out = []
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("level") in ("warning", "error", "critical"):
                out.append(f"{rec.get('level')}: {rec.get('event')} {rec.get('error', '')}")
        return out


class ReceiptTail:
    """Follows ``receipts/*.jsonl`` from a thread; stamps each receipt with time.time()."""

    def __init__(self, receipts_dir: Path, interval: float = 0.01) -> None:
        self.dir = receipts_dir
        self.interval = interval
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="receipt-tail", daemon=True)

    def __enter__(self) -> ReceiptTail:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def stamps(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return list(self.seen)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> None:
        if not self.dir.is_dir():
            return
        now = time.time()
        for path in self.dir.glob("*.jsonl"):
            offset = self._offsets.get(path, 0)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size <= offset:
                continue
            with path.open("rb") as f:
                f.seek(offset)
                data = self._partial.pop(path, b"") + f.read(size - offset)
            self._offsets[path] = size
            *lines, rest = data.split(b"\n")
            if rest:
                self._partial[path] = rest
            new = [(now, json.loads(line)) for line in lines if line.strip()]
            with self._lock:
                self.seen.extend(new)

"""Prometheus metrics: the daemon's status and running totals, for dashboards and alert
rules (``metrics: {listen, textfile}``; both off by default).

Every scrape (and every write of the textfile) reads the same status document
``nbankctl status`` shows (:func:`nbankd.control.status_handler.status`) and the totals the
daemon keeps as items finish (:class:`nbankd.daemon.tally.Tally`), and turns them
into metric families (:func:`families`, pure). The official ``prometheus_client``
serves them (``start_http_server``); the node_exporter textfile is the same text
(``generate_latest``) written by :func:`nbankd.archive.fsops.write_atomic`: a new
temporary file of an unpredictable name, created exclusively (a link planted in the
folder is never followed), renamed over the old textfile.

Names follow Prometheus' conventions: ``nbankd_..._total`` counters, ``_seconds`` and
``_bytes`` units, labels ``inbox`` (the inbox's path), ``archive``, ``code``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from nbankd.archive.fsops import write_atomic
from nbankd.daemon.tally import LATENCY_BUCKETS, Tally
from nbankd.timefmt import from_iso

if TYPE_CHECKING:
    from nbankd.daemon.view import DaemonView as Daemon

log = structlog.get_logger("nbankd.metrics")

WATCH_MODES = ("inotify", "poll")


def families(status: Mapping[str, Any], tally: Tally) -> list[Metric]:
    """The metric families of one status document and the running totals."""
    out: list[Metric] = []
    counted: list[tuple[str, str, list[str], Mapping[Any, float]]] = [
        ("nbankd_deposits", "Inputs deposited", ["inbox", "archive", "outcome"], tally.deposits),
        (
            "nbankd_deposited_bytes",
            "Bytes of the inputs deposited",
            ["inbox", "archive"],
            tally.deposited_bytes,
        ),
        (
            "nbankd_rejections",
            "Inputs moved to the rejected folder",
            ["inbox", "code"],
            tally.rejections,
        ),
        (
            "nbankd_step_failures",
            "Deposit steps that failed and are retried, by error code",
            ["code"],
            tally.failures,
        ),
        (
            "nbankd_registry_errors",
            "Deposit steps that failed on a registry error (retried)",
            [],
            {(): tally.registry_errors},
        ),
        (
            "nbankd_archive_errors",
            "Deposit steps that failed on an archive error (retried), by archive",
            ["archive"],
            tally.archive_errors,
        ),
    ]
    for name, doc, labels, values in counted:
        out.append(_filled(CounterMetricFamily(name, doc, labels=labels), values))
    latency = HistogramMetricFamily(
        "nbankd_deposit_latency_seconds",
        "From an input's claim being journaled to its deposit",
        labels=["inbox"],
    )
    for inbox, hist in sorted(tally.latency.items()):
        cumulative, buckets = 0, []
        for bound, n in zip(LATENCY_BUCKETS, hist.buckets, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        latency.add_metric([inbox], buckets, hist.total)
    out.append(latency)
    out.append(
        _filled(
            GaugeMetricFamily(
                "nbankd_last_deposit_timestamp_seconds",
                "When the inbox's last deposit finished (read back from its receipts at start)",
                labels=["inbox"],
            ),
            tally.last_deposit,
        )
    )
    out += _inbox_families(status)
    out += _health_families(status)
    return out


def _filled(family: CounterMetricFamily | GaugeMetricFamily, values: Mapping[Any, float]) -> Metric:
    """``family`` with one sample per key of ``values``, in key order; a key is one
    label's value or a tuple of them (``()`` for a family without labels)."""
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


def _inbox_families(status: Mapping[str, Any]) -> list[Metric]:
    waiting = GaugeMetricFamily(
        "nbankd_inbox_in_flight", "Inputs claimed and not yet finished", labels=["inbox"]
    )
    oldest = GaugeMetricFamily(
        "nbankd_inbox_oldest_waiting_timestamp_seconds",
        "When the oldest input not yet finished (queued, running or waiting to retry) was claimed",
        labels=["inbox"],
    )
    on_errors = GaugeMetricFamily(
        "nbankd_inbox_waiting_on_errors",
        "Inputs waiting to retry a step that failed",
        labels=["inbox"],
    )
    paused = GaugeMetricFamily(
        "nbankd_inbox_paused", "1 while the inbox is paused", labels=["inbox"]
    )
    stalled = GaugeMetricFamily(
        "nbankd_inbox_stalled_files", "Files still changing after stall_after", labels=["inbox"]
    )
    held_open = GaugeMetricFamily(
        "nbankd_inbox_open_for_writing_files",
        "Finished-looking inputs held back: a program still has them open for writing",
        labels=["inbox"],
    )
    rejected = GaugeMetricFamily(
        "nbankd_inbox_rejected_waiting",
        "Rejected inputs waiting in the inbox's rejected folder",
        labels=["inbox"],
    )
    archive_up = GaugeMetricFamily(
        "nbankd_archive_usable", "1 while the inbox's archive can take deposits", labels=["inbox"]
    )
    watch = GaugeMetricFamily(
        "nbankd_watch_mode",
        "How the inbox is watched (1 for its current mode)",
        labels=["inbox", "mode"],
    )
    for entry in status.get("inboxes", []):
        key = str(entry.get("path"))
        waiting.add_metric([key], entry.get("in_flight", 0))
        if entry.get("oldest_waiting") is not None:
            oldest.add_metric([key], entry["oldest_waiting"])
        on_errors.add_metric([key], entry.get("waiting_on_errors", 0))
        paused.add_metric([key], 1 if entry.get("paused") else 0)
        stalled.add_metric([key], len(entry.get("stalled") or []))
        held_open.add_metric([key], len(entry.get("open_for_writing") or []))
        rejected.add_metric([key], entry.get("in_rejected_folder", 0))
        archive_up.add_metric([key], 0 if entry.get("archive_problem") else 1)
        mode = entry.get("watch_mode") or "poll"
        for m in sorted({*WATCH_MODES, mode}):
            watch.add_metric([key, m], 1 if m == mode else 0)
    return [waiting, oldest, on_errors, paused, stalled, held_open, rejected, archive_up, watch]


def _health_families(status: Mapping[str, Any]) -> list[Metric]:
    out: list[Metric] = []
    queue = GaugeMetricFamily("nbankd_queue_items", "Items in flight in every inbox")
    queue.add_metric([], status.get("queue", 0))
    out.append(queue)
    degraded = GaugeMetricFamily(
        "nbankd_degraded", "1 while nbankctl status reports the daemon degraded"
    )
    degraded.add_metric([], 1 if status.get("degraded") else 0)
    out.append(degraded)
    problems = GaugeMetricFamily("nbankd_problems", "Lines of nbankctl status's degraded list")
    problems.add_metric([], len(status.get("degraded") or []))
    out.append(problems)
    for section, name, help_text in (
        ("alerts", "nbankd_alerts_failing", "1 while alerts cannot be sent"),
        ("metrics", "nbankd_metrics_textfile_failing", "1 while the textfile cannot be written"),
    ):
        failing = GaugeMetricFamily(name, help_text)
        service = status.get(section)
        failing.add_metric([], 1 if isinstance(service, dict) and service.get("problem") else 0)
        out.append(failing)
    dropped = CounterMetricFamily(
        "nbankd_log_lines_dropped",
        "Log lines dropped: the log output full, stuck or failing (deposits go on)",
    )
    dropped.add_metric([], (status.get("log") or {}).get("dropped", 0))
    out.append(dropped)
    registry = status.get("registry") or {}
    up = GaugeMetricFamily("nbankd_registry_usable", "1 while the registry answers as expected")
    up.add_metric([], 0 if registry.get("problem") else 1)
    out.append(up)
    last = status.get("last_audit")
    if isinstance(last, dict):
        finished = GaugeMetricFamily(
            "nbankd_audit_last_finished_timestamp_seconds", "When the last audit finished"
        )
        when = from_iso(last.get("finished"))
        if when is not None:
            finished.add_metric([], when)
        out.append(finished)
        ok = GaugeMetricFamily("nbankd_audit_last_ok", "1 when the last audit found nothing")
        ok.add_metric([], 1 if last.get("ok") else 0)
        out.append(ok)
        findings = GaugeMetricFamily(
            "nbankd_audit_findings", "Findings of the last audit, by category", labels=["category"]
        )
        for category, n in sorted((last.get("counts") or {}).items()):
            findings.add_metric([str(category)], n)
        out.append(findings)
    return out


class _StatusCollector:
    """Reads the daemon at each collection (a prometheus_client collector)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterable[Metric]:
        from nbankd.control import status_handler

        status = status_handler.status(self.daemon, {})
        return families(status, self.daemon.snapshot().tally)


class MetricsService:
    """The HTTP endpoint and the textfile writer of ``metrics:``; :meth:`stop` ends both."""

    def __init__(self, daemon: Daemon) -> None:
        cfg = daemon.config.metrics
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatusCollector(daemon))
        self._stopping = threading.Event()
        self._server: Any = None
        self._writer: threading.Thread | None = None
        self.problem: str | None = None  # why the last textfile write failed
        if cfg.listen is not None:
            host, port = cfg.listen
            self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
            log.info("metrics served", address=f"{host}:{port}")
        if cfg.textfile is not None:
            self._textfile, self._every = str(cfg.textfile), cfg.textfile_every
            self._writer = threading.Thread(target=self._write_loop, name="metrics", daemon=True)
            self._writer.start()

    def write_textfile(self) -> None:
        """Writes the textfile now (atomically); a failure is logged once, not raised.

        Never :func:`prometheus_client.write_to_textfile`: its temporary name
        (``PATH.PID.THREAD``) is predictable and opened following a link, so whoever
        can write the folder could make the daemon overwrite any file it can write."""
        try:
            write_atomic(self._textfile, generate_latest(self.registry), mode=0o644)
        except OSError as err:
            problem = (
                f"cannot write the metrics textfile {self._textfile}: {err.strerror or err}; "
                "deposits go on. Let the daemon's user write its folder (under the shipped "
                "unit: ReadWritePaths= in a drop-in), or change metrics.textfile"
            )
            if problem != self.problem:
                log.warning("metrics textfile not written", error=problem)
            self.problem = problem
        else:
            self.problem = None

    def _write_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.write_textfile()
            except Exception:  # a bug here must never end the writes for good
                log.exception("metrics textfile not written")
            self._stopping.wait(self._every)

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._writer is not None:
            self._writer.join(timeout=10)


def start_metrics(daemon: Daemon) -> MetricsService | None:
    """The metrics service ``daemon.config.metrics`` asks for, or None when off."""
    cfg = daemon.config.metrics
    if cfg.listen is None and cfg.textfile is None:
        return None
    return MetricsService(daemon)


__all__ = ["MetricsService", "families", "start_metrics"]

"""Prometheus metrics: the families of a status document and the running totals, and a
real daemon serving them over HTTP and writing them as a node_exporter textfile."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from fixtures.daemon import nbankctl, status_json, wait_for
from nbankd.control.metrics import families
from nbankd.daemon.tally import Tally
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State

INBOX = "/srv/inbox/rig3"
STATUS: dict[str, Any] = {
    "inboxes": [
        {
            "path": INBOX,
            "in_flight": 3,
            "oldest_waiting": 1000.0,
            "waiting_on_errors": 1,
            "paused": True,
            "stalled": ["slow.wav"],
            "open_for_writing": ["rec1.wav", "rec2.wav"],
            "in_rejected_folder": 2,
            "archive_problem": "not mounted",
            "watch_mode": "poll",
        }
    ],
    "queue": 3,
    "registry": {"problem": None},
    "degraded": ["archive for /srv/inbox/rig3: not mounted", "1 stalled file(s)"],
    "alerts": {"problem": None},
    "metrics": {"problem": "cannot write the metrics textfile /x/nbankd.prom: denied"},
    "last_audit": {
        "finished": "2026-12-05T04:00:00+00:00",
        "ok": False,
        "counts": {"hash mismatch": 1, "missing from archive": 0},
    },
}


def _samples(status: dict[str, Any], tally: Tally) -> dict[tuple[str, tuple[Any, ...]], float]:
    """{(sample name, sorted labels): value} of every sample of :func:`families`."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families(status, tally)
        for s in family.samples
    }


def test_status_becomes_gauges() -> None:
    """Each inbox's state, the queue, health and the last audit appear as gauges."""
    got = _samples(STATUS, Tally())
    inbox = (("inbox", INBOX),)
    assert got[("nbankd_inbox_in_flight", inbox)] == 3
    assert got[("nbankd_inbox_paused", inbox)] == 1
    assert got[("nbankd_inbox_stalled_files", inbox)] == 1
    assert got[("nbankd_inbox_open_for_writing_files", inbox)] == 2
    assert got[("nbankd_inbox_rejected_waiting", inbox)] == 2
    assert got[("nbankd_archive_usable", inbox)] == 0
    assert got[("nbankd_watch_mode", (("inbox", INBOX), ("mode", "poll")))] == 1
    assert got[("nbankd_watch_mode", (("inbox", INBOX), ("mode", "inotify")))] == 0
    assert got[("nbankd_queue_items", ())] == 3
    assert got[("nbankd_degraded", ())] == 1 and got[("nbankd_problems", ())] == 2
    assert got[("nbankd_registry_usable", ())] == 1
    assert got[("nbankd_audit_last_ok", ())] == 0
    assert got[("nbankd_audit_findings", (("category", "hash mismatch"),))] == 1
    assert got[("nbankd_inbox_oldest_waiting_timestamp_seconds", inbox)] == 1000.0
    assert got[("nbankd_inbox_waiting_on_errors", inbox)] == 1
    assert got[("nbankd_alerts_failing", ())] == 0
    assert got[("nbankd_metrics_textfile_failing", ())] == 1


def test_registry_and_archive_errors_become_counters() -> None:
    """Registry and per-archive step errors become _total counters."""
    tally = Tally()
    tally.registry_errors = 2
    tally.archive_errors["birdsong"] = 3
    got = _samples(STATUS, tally)
    assert got[("nbankd_registry_errors_total", ())] == 2
    assert got[("nbankd_archive_errors_total", (("archive", "birdsong"),))] == 3


def test_log_lines_dropped_become_a_counter() -> None:
    """status's log.dropped is the nbankd_log_lines_dropped_total counter."""
    status = {**STATUS, "log": {"dropped": 7, "problem": None}}
    assert _samples(status, Tally())[("nbankd_log_lines_dropped_total", ())] == 7


def test_totals_become_counters_and_a_histogram() -> None:
    """Deposits, bytes and rejections are _total counters; latency a histogram."""
    tally = Tally()
    item = Item(
        id=1, token="t", inbox=INBOX, relpath=b"a.wav", kind="file", state=State.DONE,
        archive="birdsong", archive_path="/a", placement="copy", verify=True,
        created=0.0, updated=0.0, size=10, finished=7.0,
    )  # fmt: skip
    tally.record(item, attempts_before=0)
    rejected = replace(item, state=State.REJECTED, reason_json='{"code": "duplicate"}')
    tally.record(rejected, attempts_before=0)
    got = _samples(STATUS, tally)
    labels = (("archive", "birdsong"), ("inbox", INBOX), ("outcome", "deposited"))
    assert got[("nbankd_deposits_total", labels)] == 1
    assert got[("nbankd_deposited_bytes_total", (("archive", "birdsong"), ("inbox", INBOX)))] == 10
    assert got[("nbankd_rejections_total", (("code", "duplicate"), ("inbox", INBOX)))] == 1
    assert got[("nbankd_deposit_latency_seconds_bucket", (("inbox", INBOX), ("le", "5.0")))] == 0
    assert got[("nbankd_deposit_latency_seconds_bucket", (("inbox", INBOX), ("le", "10.0")))] == 1
    assert got[("nbankd_deposit_latency_seconds_count", (("inbox", INBOX),))] == 1
    assert got[("nbankd_last_deposit_timestamp_seconds", (("inbox", INBOX),))] == 7.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deposits(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nbankd_deposits_total":
                return float(sample.value)
    return 0.0


def test_daemon_serves_metrics_and_writes_the_textfile(daemon_factory: Any, tmp_path: Path) -> None:
    """A daemon with metrics.listen and metrics.textfile counts a deposit in both."""
    port = _free_port()
    textfile = tmp_path / "textfile" / "nbankd.prom"
    textfile.parent.mkdir()
    h = daemon_factory(
        extra_config={
            "metrics": {
                "listen": f"127.0.0.1:{port}",
                "textfile": str(textfile),
                "textfile_every": "0.2s",
            }
        }
    )
    h.start()
    h.drop("counted.wav", b"one deposit")
    h.wait_settled(1)

    def scraped() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return _deposits(resp.read().decode())

    assert wait_for(lambda: scraped() == 1.0, 30, "the deposit in /metrics")
    assert wait_for(
        lambda: textfile.exists() and _deposits(textfile.read_text()) == 1.0,
        30,
        "the deposit in the textfile",
    )
    h.stop()


CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


def _exported_names() -> set[str]:
    """Every sample name :func:`families` can produce (with a deposit and an audit)."""
    tally = Tally()
    item = Item(
        id=1, token="t", inbox=INBOX, relpath=b"a.wav", kind="file", state=State.DONE,
        archive="birdsong", archive_path="/a", placement="copy", verify=True,
        created=0.0, updated=0.0, size=10, finished=7.0,
    )  # fmt: skip
    tally.record(item, attempts_before=0)
    tally.record(replace(item, state=State.REJECTED), attempts_before=0)
    for code in ("x", "registry-unavailable", "archive-unavailable"):
        failed = replace(item, state=State.CHECKED, attempts=1, error_code=code)
        tally.record(failed, attempts_before=0)
    return {name for name, _labels in _samples(STATUS, tally)}


def _named_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bnbankd_[a-z_]+", text))


def test_alert_rules_name_only_exported_metrics() -> None:
    """Every metric the shipped Prometheus rules use is one nbankd exports."""
    rules = yaml.safe_load((CONTRIB / "prometheus" / "nbankd-rules.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    assert _named_metrics(exprs) and _named_metrics(exprs) <= _exported_names()


def test_dashboard_names_only_exported_metrics() -> None:
    """Every metric the shipped Grafana dashboard queries is one nbankd exports."""
    dashboard = json.loads((CONTRIB / "grafana" / "nbankd-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert _named_metrics(exprs) and _named_metrics(exprs) <= _exported_names()


def test_status_and_metrics_agree(daemon_factory: Any) -> None:
    """nbankctl status and /metrics say the same of a paused daemon with a rejection."""
    port = _free_port()
    h = daemon_factory(extra_config={"metrics": {"listen": f"127.0.0.1:{port}"}})
    h.start()
    h.drop("bad name.wav", b"rejected: there is something to show")
    h.wait_settled(1)
    assert nbankctl(h, "pause").returncode == 0
    _code, status = status_json(h)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        scraped = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.read().decode())
            for s in family.samples
        }
    [inbox] = status["inboxes"]
    key = (("inbox", inbox["path"]),)
    assert scraped[("nbankd_degraded", ())] == (1 if status["degraded"] else 0) == 1
    assert scraped[("nbankd_problems", ())] == len(status["degraded"])
    assert scraped[("nbankd_queue_items", ())] == status["queue"]
    assert scraped[("nbankd_inbox_paused", key)] == 1 and inbox["paused"] is True
    assert scraped[("nbankd_inbox_rejected_waiting", key)] == inbox["in_rejected_folder"] == 1
    assert scraped[("nbankd_inbox_in_flight", key)] == inbox["in_flight"]
    assert scraped[("nbankd_inbox_waiting_on_errors", key)] == inbox["waiting_on_errors"]
    assert (
        ("nbankd_inbox_oldest_waiting_timestamp_seconds", key) in scraped
    ) == (inbox["oldest_waiting"] is not None)  # fmt: skip
    mode = (("inbox", inbox["path"]), ("mode", inbox["watch_mode"]))
    assert scraped[("nbankd_watch_mode", mode)] == 1
    assert scraped[("nbankd_archive_usable", key)] == (0 if inbox["archive_problem"] else 1)
    assert scraped[("nbankd_registry_usable", ())] == (0 if status["registry"]["problem"] else 1)
    assert scraped[("nbankd_inbox_stalled_files", key)] == len(inbox["stalled"])
    assert scraped[("nbankd_inbox_open_for_writing_files", key)] == len(inbox["open_for_writing"])
    assert scraped[("nbankd_metrics_textfile_failing", ())] == 0 and status["metrics"] == {
        "problem": None
    }
    assert scraped[("nbankd_alerts_failing", ())] == 0 and status["alerts"] is None
    h.stop()


def test_a_textfile_that_cannot_be_written_shows_in_status(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """An unwritable textfile degrades status, naming the file and fix, and sets a gauge."""
    port = _free_port()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the textfile's folder should be")
    textfile = blocker / "nbankd.prom"
    metrics = {"listen": f"127.0.0.1:{port}", "textfile": str(textfile), "textfile_every": "0.2s"}
    h = daemon_factory(extra_config={"metrics": metrics})
    h.start()
    wait_for(lambda: status_json(h)[1]["metrics"]["problem"], 30, "the textfile problem")
    code, status = status_json(h)
    [line] = [d for d in status["degraded"] if "metrics textfile" in d]
    assert code == 1 and str(textfile) in line and "ReadWritePaths=" in line
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert "nbankd_metrics_textfile_failing 1.0" in resp.read().decode()
    h.drop("still.wav", b"deposited all the same")
    wait_for(lambda: any(r["id"] == "still" for r in h.receipts()), 60, "the deposit")
    h.stop()


def test_the_last_deposits_are_read_back_from_the_receipts_logs(tmp_path: Path) -> None:
    """At start, each inbox's last deposit comes from the end of its receipts log (a
    torn last line ignored); an inbox without a log has none."""
    from nbankd.daemon.tally import RECEIPTS_TAIL, last_deposits
    from nbankd.deposit.receipts import receipts_path

    log_path = receipts_path(tmp_path, INBOX)
    filler = json.dumps({"inbox": INBOX, "time": "2024-05-01T10:00:00+00:00", "pad": "x" * 200})
    lines = [filler] * (2 * RECEIPTS_TAIL // len(filler))
    lines.append(json.dumps({"inbox": INBOX, "time": "2024-05-02T10:00:00+00:00"}))
    log_path.write_text("\n".join(lines) + '\n{"inbox": "' + INBOX + '", "time": "2030-0')
    got = last_deposits(tmp_path, [INBOX, "/srv/inbox/none"])
    assert got == {INBOX: 1714644000.0}

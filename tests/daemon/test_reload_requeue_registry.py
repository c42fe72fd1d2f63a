"""Hostile review: a reload whose new registry cannot be opened fails, keeping the
whole running configuration, and the next reload tries again. Real daemon
subprocesses; no sleeps for synchronisation (polling with a deadline)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from fixtures.daemon import DaemonHarness, nbankctl, status_json


def _edit(h: DaemonHarness, change: Callable[[dict[str, Any]], Any]) -> None:
    cfg = yaml.safe_load(h.config_path.read_text())
    change(cfg)
    h.config_path.write_text(yaml.safe_dump(cfg))


def test_a_reload_whose_new_registry_cannot_be_opened_says_so_and_is_tried_again(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """A reload whose new registry cannot be opened (credentials file without an entry
    for its host) is not answered "done" (exit 2, naming why); once the file is fixed,
    the next reload opens the registry the configuration names."""
    h = daemon_factory()
    h.start()
    auth = h.root / "registry-auth"
    auth.write_text("machine elsewhere.example login lab password secret\n")
    auth.chmod(0o600)
    url = "http://127.0.0.1:9/neurobank/"
    _edit(h, lambda cfg: cfg.update(registry=url, registry_auth=str(auth)))
    first = nbankctl(h, "reload", "--json")
    kept = status_json(h)[1]["registry"]["url"]
    auth.write_text("machine 127.0.0.1 login lab password secret\n")
    second = nbankctl(h, "reload", "--json")
    used = status_json(h)[1]["registry"]["url"]
    h.stop()
    # before the fix: answered done, the old registry kept
    assert first.returncode == 2, first.stdout
    assert "127.0.0.1" in first.stdout + first.stderr
    assert kept != url  # the running configuration stayed whole
    assert second.returncode == 0, second.stdout + second.stderr
    assert used == url  # before the fix: never tried again, the old registry until a restart

"""The control socket's reload answers with its own reload's outcome."""

from __future__ import annotations

from pathlib import Path

from nbankd.config import load_config
from nbankd.config.model import Config
from nbankd.control import handlers


class _Daemon:
    """A daemon whose reload applies, while another reload's failure is the last kept."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.reload_problem = "another reload's failure"

    def reload(self) -> str | None:
        return None


def test_a_reload_that_applied_is_done_whatever_another_reload_kept(tmp_path: Path) -> None:
    """Two reloads at once: the one that applied answers done, never with the failure
    another (later) reload left in ``reload_problem``."""
    source = tmp_path / "config.yaml"
    source.write_text(f"registry: embedded\nstate_dir: {tmp_path / 'state'}\n")
    answer = handlers.reload(_Daemon(load_config(source)), {})  # type: ignore[arg-type]
    assert answer["done"] is True and answer["source"] == str(source)

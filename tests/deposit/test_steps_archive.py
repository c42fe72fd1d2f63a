"""The archive as the steps see it: nbank.json read again whenever it changes."""

from __future__ import annotations

import json

from fixtures.steps_env import Env
from nbankd.deposit.lifecycle import State


def test_an_edited_policy_applies_to_the_next_input(env: Env) -> None:
    """The steps keep the archive they opened only while nbank.json is the same file:
    after keep_extensions is switched off, the next input is stored without it."""
    env.until(env.drop("first.dat", b"one"), State.DONE)
    config_path = env.archive.path / "nbank.json"
    config = json.loads(config_path.read_text())
    config["policy"]["keep_extensions"] = False
    config_path.write_text(json.dumps(config, indent=4))
    env.until(env.drop("second.dat", b"two"), State.DONE)
    assert env.stored() == ["fi/first.dat", "se/second"]

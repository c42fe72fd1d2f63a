"""Hostile review of session 25's changes (append_durable's lock and torn-tail cut,
process limits, strict registry records, RECHECKS_TOLD_AFTER).

Each test failed on the code as reviewed and names, in its docstring, what happens
instead since its fix. Real files, the real steps, the embedded registry and a
django-neurobank server; no mocks.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fixtures.django_server import DjangoServer, unique_name
from fixtures.fileflags import chattr, unflag
from fixtures.steps_env import Env, env  # noqa: F401 - the fixture
from nbankd.archive.fsops import append_durable
from nbankd.daemon.status import RECHECKS_TOLD_AFTER, waiting_problems
from nbankd.deposit.lifecycle import FINAL, next_step
from nbankd.registry.http import HttpRegistry


def test_an_input_stuck_identifier_busy_for_ever_is_told_in_status(env: Env) -> None:  # noqa: F811
    """An input whose identifier is registered with its bytes as another datatype (a
    record no input of this daemon will ever store) waits identifier-busy for ever:
    status tells it once it has waited RECHECKS_TOLD_AFTER attempts in a row."""
    data = os.urandom(2000)
    sha1 = hashlib.sha1(data).hexdigest()
    elsewhere = env.root / "elsewhere"
    elsewhere.mkdir()
    env.registry.add_datatype("other-type")
    env.registry.add_archive("elsewhere", "neurobank", str(elsewhere))
    env.registry.add_resource(dtype="other-type", archive="elsewhere", name="b", sha1=sha1)

    item = env.drop("b.wav", data)
    codes: list[str | None] = []
    attempts: list[int] = []
    told: list[str] = []
    for _ in range(8 * RECHECKS_TOLD_AFTER):  # each round: lookup, then register
        step = next_step(item.progress, float("inf"))
        assert step is not None and item.state not in FINAL, item
        item = env.step(item, step)
        codes.append(item.error_code)
        attempts.append(item.attempts)
        told += waiting_problems([item])
    assert "identifier-busy" in codes, codes  # the wait this test is about
    assert item.state not in FINAL, item
    assert told, (
        f"never told in {len(codes)} steps: attempts went {attempts} (reset by each "
        "lookup, which does not ask the registry again)"
    )


def test_a_torn_tail_of_an_append_only_log_does_not_stop_every_append(tmp_path: Path) -> None:
    """A receipts log kept append-only (chattr +a, as audit logs are) whose last line a
    crash tore is still appended to (the torn line ended, as before), never refused
    with EPERM on every append from then on."""
    log = tmp_path / "receipts.jsonl"
    log.write_bytes(b'{"token": "t1"}\n{"token": "t2", "na')
    chattr("+a", log)
    try:
        append_durable(log, b'{"token": "t3"}\n')
        lines = log.read_bytes().split(b"\n")
    finally:
        unflag(tmp_path)
    assert lines[0] == b'{"token": "t1"}'
    assert lines[-2] == b'{"token": "t3"}' and lines[-1] == b""


def test_a_record_whose_metadata_an_admin_made_a_list_is_read(
    django_registry: DjangoServer, tmp_path: Path
) -> None:
    """A record django-neurobank serves with metadata that is not an object (its admin
    form's JSONField takes any JSON: a list typed there) is read by get_resource and
    search, not refused as registry-unavailable (which blocks every listing holding
    it: archive check, audit, search)."""
    dtype = django_registry.add_datatype()
    arch = django_registry.add_archive(str(tmp_path / "arch"))
    name = unique_name("r")
    sha1 = os.urandom(20).hex()
    django_registry.post(
        "resources/", {"name": name, "dtype": dtype, "sha1": sha1, "locations": [arch]}
    )
    django_registry.shell(
        "from nbank_registry.models import Resource; "
        f"Resource.objects.filter(name={name!r}).update(metadata=['rig 2', 'bad take'])"
    )
    try:
        with HttpRegistry(django_registry.url, django_registry.auth) as reg:
            record = reg.get_resource(name)
            listed = [r.name for r in reg.search(archive=arch)]
    finally:  # a whole export of the session's server warns of it (and exits 1)
        django_registry.shell(
            f"from nbank_registry.models import Resource; Resource.objects.filter(name={name!r})"
            ".delete()"
        )
    assert record is not None and record.name == name and record.sha1 == sha1
    assert listed == [name]

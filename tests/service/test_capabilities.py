"""CAP_LEASE, the daemon's one capability, is never handed to the programs it starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fixtures.users import TestUser

REPO = Path(__file__).resolve().parents[2]
CAP_LEASE = 28

_CHILD = r"""
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from nbankd.service.capabilities import keep_capabilities_to_self

def caps(text):
    rows = (line.split(":\t") for line in text.splitlines() if line.startswith("Cap"))
    return {k: int(v, 16) for k, v in rows}

before = caps(subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True).stdout)
cleared = keep_capabilities_to_self()
own = caps(open("/proc/self/status").read())
child = caps(subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True).stdout)
print(json.dumps({"cleared": cleared, "before": before, "own": own, "child": child}))
"""


def test_programs_started_after_the_clear_have_no_capabilities(other_user: TestUser) -> None:
    """Started with CAP_LEASE as an ambient capability (as the unit starts it), the daemon
    keeps it once the ambient set is cleared, and a program it starts has none."""
    argv = [
        "setpriv",
        f"--reuid={other_user.uid}",
        f"--regid={other_user.gid}",
        "--init-groups",
        "--inh-caps=+lease",
        "--ambient-caps=+lease",
        "--",
        sys.executable,
        "-c",
        _CHILD,
        str(REPO),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=other_user.env())
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    lease = 1 << CAP_LEASE
    assert seen["before"]["CapEff"] & lease  # without the clear, a child inherits it
    assert seen["cleared"] is True
    assert seen["own"]["CapEff"] & lease and seen["own"]["CapAmb"] == 0
    assert (seen["child"]["CapEff"], seen["child"]["CapAmb"]) == (0, 0)

"""Shared pytest set-up: fixtures live in tests/fixtures/, one module per concern.

``NBANKD_HYPOTHESIS=ci`` (set by ``.ci/run``) makes the property tests draw the same
examples on every run (hypothesis's ``derandomize``), so CI's verdict on a commit
does not depend on luck; a plain ``pytest`` keeps exploring new examples.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("NBANKD_HYPOTHESIS", "default"))

pytest_plugins = [
    "fixtures.postgres",
    "fixtures.django_server",
    "fixtures.users",
    "fixtures.daemon",
    "fixtures.cli_backends",
    "fixtures.fault_proxy",
    "fixtures.sshfs",
    "fixtures.mountns",
    "fixtures.webhooks",
]

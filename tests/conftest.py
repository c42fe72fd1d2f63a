"""Shared pytest set-up: fixtures live in tests/fixtures/, one module per concern."""

pytest_plugins = [
    "fixtures.postgres",
    "fixtures.django_server",
    "fixtures.users",
    "fixtures.daemon",
    "fixtures.cli_backends",
    "fixtures.fault_proxy",
    "fixtures.sshfs",
    "fixtures.mountns",
]

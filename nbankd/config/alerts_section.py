"""The ``alerts`` section: who is told when something is wrong (a webhook, email), and
when (an outage worth telling, how often a problem still there is told again)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nbankd.config.model import AlertsConfig, EmailConfig, WebhookConfig
from nbankd.config.parsing import ParserBase
from nbankd.config.values import (
    KeyPath,
    bad,
    check_bool,
    check_names,
    describe,
    duration,
    listen_address,
    path_in,
)


def _address(value: object) -> str:
    if not isinstance(value, str) or "@" not in value or any(c.isspace() for c in value):
        bad(f"must be an email address, not {describe(value)}", "e.g. lab@example.org")
    return value


def _addresses(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    names = check_names(value)
    for name in names:
        _address(name)
    if not names:
        bad("must name at least one address", "e.g. [lab@example.org]")
    return names


def _url(value: object) -> str:
    """An http(s) URL, kept exactly as written (a webhook's path is its own)."""
    if not isinstance(value, str):
        bad(f"must be an http(s) URL, not {describe(value)}")
    parts = urlsplit(value)
    # never the whole URL in a message: chat services put their secret in its path
    shown = f"{parts.scheme}://{parts.hostname or ''}/..." if parts.scheme else "this value"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        bad(f"{shown!r} is not an http(s) URL", "e.g. https://chat.example.org/hooks/x")
    if parts.username or parts.password:
        bad("must not hold a user name or password", "put a token in token_file instead")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
    except ValueError:
        bad(f"{shown!r} has a port that is not a number from 0 to 65535", "e.g. :8443")
    return value


class AlertsSection(ParserBase):
    """Parses ``alerts:`` into :class:`AlertsConfig`."""

    def _alerts(self, top: dict[str, Any], base: Path) -> AlertsConfig:
        default = AlertsConfig()
        if "alerts" not in top:
            return default
        path: KeyPath = ("alerts",)
        section = self.mapping(top["alerts"], path, "alert settings (webhook, email, ...)")
        if section is None:
            return default
        self.check_keys(section, path, "alerts")
        return AlertsConfig(
            webhook=self._webhook(section, base),
            email=self._email(section, base),
            unavailable_after=self.get(
                section, path, "unavailable_after", duration(positive=True), 600.0
            ),
            group_wait=self.get(
                section, path, "group_wait", duration(positive=False), default.group_wait
            ),
            repeat_every=self.get(
                section, path, "repeat_every", duration(positive=True), default.repeat_every
            ),
            check_every=self.get(
                section, path, "check_every", duration(positive=True), default.check_every
            ),
        )

    def _webhook(self, alerts: dict[str, Any], base: Path) -> WebhookConfig | None:
        if alerts.get("webhook") is None:
            return None
        path: KeyPath = ("alerts", "webhook")
        section = self.mapping(alerts["webhook"], path, "url and token_file")
        if section is None:
            return None
        self.check_keys(section, path, "alerts.webhook")
        if "url" not in section:
            self.error((*path, "url"), "is required: where alerts are POSTed")
            return None
        return WebhookConfig(
            url=self.get(section, path, "url", _url, ""),
            token_file=self.get(section, path, "token_file", path_in(base), None),
        )

    def _email(self, alerts: dict[str, Any], base: Path) -> EmailConfig | None:
        if alerts.get("email") is None:
            return None
        path: KeyPath = ("alerts", "email")
        section = self.mapping(alerts["email"], path, "to, from, smtp, ...")
        if section is None:
            return None
        self.check_keys(section, path, "alerts.email")
        for key in ("to", "from"):
            if key not in section:
                self.error((*path, key), "is required for alert emails")
        if "to" not in section or "from" not in section:
            return None
        return EmailConfig(
            to=self.get(section, path, "to", _addresses, ()),
            from_=self.get(section, path, "from", _address, ""),
            smtp=self.get(section, path, "smtp", listen_address, ("localhost", 25)),
            starttls=self.get(section, path, "starttls", check_bool, True),
            auth_file=self.get(section, path, "auth_file", path_in(base), None),
            cafile=self.get(section, path, "cafile", path_in(base), None),
        )


__all__ = ["AlertsSection"]

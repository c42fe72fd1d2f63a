"""nbankd's configuration file (SPEC section 4), parsed once into frozen records.

Typical use::

    path = find_config_path(args.config)        # -c FILE > $NBANKD_CONFIG > /etc/...
    config = load_config(path)                  # raises errors.ConfigError listing all
    problems = prepare_inboxes(config)          # world-touching steps return problems
    problems += check_paths(config)
    problems += check_against_registry(config, registry)
    print(describe_config(config))              # effective configuration, for check-config

``parse_config(path)`` gives ``(config or None, every problem)`` for
``check-config``, which reports warnings too.
"""

import os

from nbankd.config.checks import check_against_registry, check_paths, prepare_inboxes
from nbankd.config.describe import describe_config, effective_settings
from nbankd.config.durations import ACCEPTED_FORMS, format_duration, parse_duration
from nbankd.config.loader import (
    ACCEPTED_KEYS,
    find_config_path,
    load_config,
    parse_config,
    parse_config_text,
)
from nbankd.config.model import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_CONTENT_TYPE,
    ArchiveConfig,
    AuditConfig,
    Config,
    ControlConfig,
    InboxConfig,
    InvalidConfig,
    LogConfig,
    Problem,
)


def config_problems(path: str | os.PathLike[str]) -> list[Problem]:
    """Every problem (errors and warnings) of the configuration file at ``path``."""
    return parse_config(path)[1]


__all__ = [
    "ACCEPTED_FORMS",
    "ACCEPTED_KEYS",
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_CONTENT_TYPE",
    "ArchiveConfig",
    "AuditConfig",
    "Config",
    "ControlConfig",
    "InboxConfig",
    "InvalidConfig",
    "LogConfig",
    "Problem",
    "check_against_registry",
    "check_paths",
    "config_problems",
    "describe_config",
    "effective_settings",
    "find_config_path",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_config_text",
    "parse_duration",
    "prepare_inboxes",
]

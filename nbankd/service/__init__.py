"""Running under a service manager: sd_notify readiness and watchdog, and logging setup."""

from nbankd.service.logs import configure_logging, get_logger
from nbankd.service.notify import Heartbeat, Notifier

__all__ = ["Heartbeat", "Notifier", "configure_logging", "get_logger"]

"""The daemon's control socket: protocol, server, command handlers and client.

:func:`start_control_server` is what :class:`~nbankd.daemon.service.Daemon`
calls at the end of its start-up; nbankctl uses :mod:`.client`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbankd.control.server import ControlServer
    from nbankd.daemon.view import DaemonView as Daemon


def start_control_server(daemon: Daemon) -> ControlServer:
    """Binds ``config.control_socket`` and serves the commands of :mod:`.handlers`.

    Raises :class:`~nbankd.control.server.ControlSocketInUse` (a ConfigError) when
    another daemon answers on the socket.
    """
    from nbankd.control.handlers import dispatcher
    from nbankd.control.peers import Access
    from nbankd.control.server import ControlServer

    server = ControlServer(
        daemon.config.control_socket,
        dispatcher(daemon),
        Access(lambda: daemon.config.control),
    )
    server.start()
    return server


__all__ = ["start_control_server"]

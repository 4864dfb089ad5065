"""Serving the console: `vtuber-letta console` (and the stack's console part) run this."""

from __future__ import annotations

import logging

from console.app import Console, build_app
from console.auth import Sessions

log = logging.getLogger("vtuber_letta.console")


def console_app(settings):
    """The real console: Redis of the settings, Letta and the memory gate through LettaMemory."""
    from console.memory import LettaMemory
    from vtuber_letta.redis_api import async_redis_client, redis_client

    redis_sync = redis_client(settings)
    memory = LettaMemory(settings, redis_conn=redis_sync)
    return build_app(Console(settings, redis_sync, async_redis_client(settings), memory,
                             Sessions(settings.console_password)))


def run_console(settings) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn handles both)."""
    import uvicorn

    _ = settings.console_password  # generated now (not at the first login) so the file is there to read
    log.info("console: http://%s:%s/ (password: %s)", settings.console_host, settings.console_port,
             settings.console_password_hint)
    uvicorn.run(console_app(settings), host=settings.console_host, port=settings.console_port,
                log_level="warning", access_log=False, proxy_headers=False, server_header=False)
    return 0

"""What every part of one bridge replica shares: its settings, its queues, its metrics, its clock,
its name, the stop signal, how many turns are in flight, and its writer of recent outcomes. The service (bridge/service.py)
makes one; its workers and its Letta turn read it."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

from bridge.metrics import BridgeMetrics
from bridge.outcome_log import OutcomeLog
from bridge.queue import ViewerQueues
from bridge.wire import TaskRequest
from vtuber_letta.settings import Settings

MEMORY_PYTHON = "memory-python"
DEFAULT_ROUTING = {"permanent": "letta", "temporary": MEMORY_PYTHON}


@dataclass
class Replica:
    settings: Settings
    queues: ViewerQueues
    metrics: BridgeMetrics
    replica_id: str
    clock: Callable[[], float] = time.time
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0  # tasks being handled right now (the heartbeat reports it)
    outcome_log: OutcomeLog = field(default_factory=OutcomeLog)  # the console's recent outcomes

    def __post_init__(self) -> None:
        self._routing = {**DEFAULT_ROUTING, **self.settings.letta_memory_type_routing}

    async def pause(self, seconds: float) -> bool:
        """Sleep, waking early on stop; True if stop was requested."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
            return True
        except asyncio.TimeoutError:
            return False

    def route_of(self, request: TaskRequest) -> str:
        """"letta" or "memory-python": Letta off sends everything to memory-python; otherwise by
        meta.memory_type (LETTA_MEMORY_TYPE_ROUTING, VTL_BRIDGE_DEFAULT_MEMORY_TYPE)."""
        if not self.settings.letta_enabled:
            return MEMORY_PYTHON
        return self._routing[request.meta.memory_type or self.settings.bridge_default_memory_type]


def loggable(text: str, limit: int = 300) -> str:
    """Text safe for one log line: invisible, control and line-breaking characters escaped."""
    out = "".join(
        c if c == " " or unicodedata.category(c)[0] not in "CZ" else c.encode("unicode_escape").decode("ascii")
        for c in text[:limit]
    )
    return out + ("…" if len(text) > limit else "")


def default_replica_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"

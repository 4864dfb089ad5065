"""CPU time used by each part of the local stack, the bridge and this process, read from /proc.

A part is the process the stack started and all its descendants: Letta behind its log redactor,
Postgres with its backends (which call setsid, so sessions would not do). A live process's own
time plus the time of the children it has reaped counts each CPU second once.
On a machine where Letta is the bottleneck, these numbers tell whose work a throughput gap is:
Letta doing more per turn, or something of ours competing with it for the cores.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from stack.manager import Stack
from vtuber_letta.settings import Settings

TICKS = os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """`snapshot()` -> CPU seconds so far per part name: the stack's parts that run on this machine,
    any extra session given (e.g. the bridge), and `client` (this process)."""

    def __init__(self, settings: Settings, **roots: int | None):
        stack = Stack(settings, log=lambda _msg: None)
        parts = {"letta": stack.letta.process, "postgres": stack.postgres.process, "redis": stack.redis.process}
        if stack.model is not None:
            parts["model"] = stack.model.process
        self.roots = {pid: name for name, pid in {**{n: p.pid() for n, p in parts.items()}, **roots}.items() if pid}

    def snapshot(self) -> dict[str, float]:
        parent: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            parent[int(entry.name)] = int(fields[1])
            ticks[int(entry.name)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        seconds = dict.fromkeys(self.roots.values(), 0.0)
        for pid, own in ticks.items():
            ancestor = pid
            while ancestor > 1 and ancestor not in self.roots:
                ancestor = parent.get(ancestor, 0)
            if ancestor in self.roots:
                seconds[self.roots[ancestor]] += own / TICKS
        own = resource.getrusage(resource.RUSAGE_SELF)
        seconds["client"] = own.ru_utime + own.ru_stime
        return seconds

    @staticmethod
    def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before.get(name, 0.0) for name in after}

"""Prometheus metrics of one bridge replica (own registry, so several bridges can share a process)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("vtuber_letta.bridge")

# First-audio target of the host is p95 < 800 ms: keep buckets dense below a second.
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


class BridgeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.letta_latency = Histogram(
            "vtl_bridge_letta_seconds", "Duration of Letta calls, by operation", ["op"], registry=r, buckets=LATENCY_BUCKETS
        )
        self.outcomes = Counter("vtl_bridge_tasks", "Tasks finished, by outcome", ["outcome"], registry=r)
        self.retries = Counter("vtl_bridge_retries", "Failed Letta attempts that will be retried, by kind", ["kind"], registry=r)
        self.queue_depth = Gauge("vtl_bridge_queue_depth", "Items waiting in a bridge list", ["queue"], registry=r)
        self.pending_viewers = Gauge("vtl_bridge_pending_viewers", "Viewers with queued tasks", registry=r)
        self.dead_letters = Gauge("vtl_bridge_dead_letter_depth", "Entries in the dead-letter list", registry=r)
        self.dead_letter_bytes = Gauge("vtl_bridge_dead_letter_bytes", "Bytes held by the dead-letter list", registry=r)
        self.in_flight = Gauge("vtl_bridge_in_flight_turns", "Tasks being handled by this replica", registry=r)
        self.known_viewers = Gauge("vtl_bridge_known_viewers", "Viewers with a Letta agent", registry=r)
        self._server: Any = None

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics on host:port (loopback by default; port 0 = no endpoint)."""
        if not port:
            return
        try:
            self._server = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # e.g. a second replica on this host with the same port
            log.error("bridge metrics endpoint not started: %s:%d: %s (set VTL_BRIDGE_METRICS_PORT)", host, port, exc)
            return
        log.info("bridge metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        server = self._server[0] if isinstance(self._server, tuple) else self._server
        if server is not None:
            server.shutdown()
            server.server_close()
        self._server = None

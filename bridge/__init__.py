"""bridge/: Redis in, Letta, Redis out.

    run_bridge(settings, gateway, *, stop_event=None)   one replica until SIGTERM / stop_event
    check_bridge(settings, replica_id=None) -> bool     is a replica heartbeating?

Modules: wire (the JSON contract), queue (Redis keys and Lua scripts), service (the loop),
gateway (what the bridge needs from Letta), letta_turns + replies (the real message API),
errors (retry / wait / give up), turn_text (what the agent reads), metrics. The unit tests' in-memory
Letta is tests/unit/fake_gateway.py.
"""

from bridge.service import BridgeService, check_bridge, run_bridge

__all__ = ["BridgeService", "check_bridge", "run_bridge"]

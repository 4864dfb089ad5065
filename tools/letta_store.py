"""How the memory gate's stores ask Letta: `StoreUnavailable` when Letta cannot be asked (nothing
changed, try later) and `letta_call`, which turns a connection failure or timeout into it. Its own
leaf, so the gate (tools/memory_gate.py) and its second tier (tools/fact_tier.py) both use it
without importing each other."""

from __future__ import annotations


class StoreUnavailable(Exception):
    """The store (Letta) could not be asked; nothing was changed."""


class letta_call:
    """`with letta_call():` turns Letta being unreachable into StoreUnavailable (nothing changed, try later)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from letta_client import APIConnectionError, APITimeoutError

        if kind is not None and issubclass(kind, (APIConnectionError, APITimeoutError)):
            raise StoreUnavailable(kind.__name__) from exc
        return False

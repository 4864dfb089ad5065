"""Filling a viewer's memory through the stack's real memory gate (tools/gate_client.py), from a test."""

from __future__ import annotations

from tools.gate_client import GateClient


def fill_until_moved(gate: GateClient, agent_id: str, facts: list[tuple[str, str]]) -> list[str]:
    """Remember facts in order; every answer must say Remembered. Returns the answers."""
    answers = []
    for fact, category in facts:
        answer = gate.remember(agent_id, fact, category)
        assert answer.startswith("Remembered"), (fact, answer)
        answers.append(answer)
    return answers

"""Talking to the stack's real memory gate as a viewer's tools do (tools/memory_client.py), from a test.

The gate is the process the stack started (tools/memory_gate.py over Letta); each call carries the
agent's own token, exactly what the tool sandbox sends. Driving the gate directly stands in for
hundreds of model turns that would each end in the same gate call.
"""

from __future__ import annotations

import json
import urllib.request

from tools.memory_gate import memory_token


class Gate:
    def __init__(self, settings):
        self.base = settings.memory_gate_url.rstrip("/")
        self.secret = settings.memory_gate_secret
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, operation: str, agent_id: str, **fields: str) -> str:
        """The tool's answer: the gate's message, or "Error: ..." (as ask_memory_gate returns it)."""
        body = json.dumps({"agent_id": agent_id, "token": memory_token(self.secret, agent_id), **fields}).encode()
        request = urllib.request.Request(f"{self.base}/v1/{operation}", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with self.opener.open(request, timeout=60) as response:
            answer = json.loads(response.read())
        return answer["message"] if "message" in answer else "Error: " + answer["error"]

    def remember(self, agent_id: str, fact: str, category: str) -> str:
        return self.call("remember", agent_id, fact=fact, category=category)

    def recall(self, agent_id: str, query: str) -> str:
        return self.call("recall", agent_id, query=query)


def recalled_facts(answer: str) -> list[str]:
    """The fact texts of a recall answer ("- (category) text (stored YYYY-MM-DD)" lines)."""
    facts = []
    for line in answer.splitlines():
        if line.startswith("- (") and ") " in line:
            text = line.split(") ", 1)[1]
            facts.append(text.rsplit(" (stored ", 1)[0])
    return facts


def fill_until_moved(gate: Gate, agent_id: str, facts: list[tuple[str, str]]) -> list[str]:
    """Remember facts in order; every answer must say Remembered. Returns the answers."""
    answers = []
    for fact, category in facts:
        answer = gate.remember(agent_id, fact, category)
        assert answer.startswith("Remembered"), (fact, answer)
        answers.append(answer)
    return answers

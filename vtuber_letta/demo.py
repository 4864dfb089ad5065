"""`vtuber-letta demo`: the main job, end to end, in a way a person can watch.

Brings the local stack up (installing what is missing), then has one scripted
agent turn and prints it. With the scripted stand-in model the words are
canned, but everything else — Postgres, Letta's agent loop, memory, history —
is the real program.
"""

from __future__ import annotations

import time

from stack.manager import Stack, format_status
from vtuber_letta.letta_api import letta_client
from vtuber_letta.settings import Settings

DEMO_AGENT = "vtuber-letta-demo"


def run_demo(settings: Settings) -> int:
    stack = Stack(settings, log=lambda msg: print(f"  {msg}", flush=True))
    print("== stack up")
    print(format_status(stack.up()))

    client = letta_client(settings)
    existing = client.agents.list(name=DEMO_AGENT, limit=1)
    agent = existing[0] if existing else client.agents.create(
        name=DEMO_AGENT,
        model=settings.resolved_model_handle(),
        embedding=settings.resolved_embedding_handle(),
        memory_blocks=[{"label": "persona", "value": "I am a cheerful VTuber."},
                       {"label": "human", "value": "A viewer trying the demo."}],
        tags=["vtuber-letta", "demo"],
    )
    text = "Hi! Is anyone there?"
    print(f"\n== one agent turn (agent {agent.id})\nviewer> {text}")
    started = time.perf_counter()
    response = letta_client(settings, for_messages=True).agents.messages.create(
        agent_id=agent.id, messages=[{"role": "user", "content": text}]
    )
    elapsed = time.perf_counter() - started
    for message in response.messages:
        if message.message_type == "assistant_message":
            content = message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)
            print(f"vtuber> {content}")
    print(f"({elapsed * 1000:.0f} ms; stop the stack with `vtuber-letta stack down`)")
    return 0

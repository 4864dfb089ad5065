"""`vtuber-letta say USER_ID "text"`: try the product the way the host uses it.

Pushes one task in the host's user-turn format onto the request queue, then
waits on the bridge's outputs (letta_responses, the avatar channel, the task's
own task_response channel) and reports what came back and how long it took.
Needs a running bridge (`vtuber-letta bridge`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from vtuber_letta.redis_api import async_redis_client
from vtuber_letta.settings import Settings


@dataclass
class SayResult:
    task_id: str
    response: dict | None = None
    avatar_events: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def render(self) -> str:
        if self.response is None:
            return f"no reply to task {self.task_id} within the timeout (is `vtuber-letta bridge` running?)"
        lines = []
        for event in self.avatar_events:
            lines.append(f"  [avatar] {event.get('kind') or event.get('tool')}: "
                         f"{json.dumps(event.get('args') or {k: v for k, v in event.items() if k not in ('task_id', 'user_id')}, ensure_ascii=False)}")
        text = self.response.get("response_text", "")
        lines.append("vtuber> (stays silent)" if self.response.get("silent") else f"vtuber> {text}")
        lines.append(f"({self.seconds * 1000:.0f} ms, task {self.task_id}, memory_updated={self.response.get('memory_updated')})")
        return "\n".join(lines)


def build_task(user_id: str, text: str, *, display_name: str | None = None, platform: str | None = None,
               task_type: str = "text", meta: dict | None = None) -> dict:
    """A task exactly as the host's input handler writes it, plus the plan's memory_type."""
    return {
        "task_id": str(uuid.uuid4()),
        "type": task_type,
        "user_id": user_id,
        "content": text,
        "source": "user",
        "timestamp": time.monotonic(),  # the host stamps its own loop clock: never epoch
        "meta": {"memory_type": "permanent", "trace_id": None, "from_channel": "vtuber-letta say",
                 "display_name": display_name, "platform": platform, **(meta or {})},
    }


async def say(settings: Settings, user_id: str, text: str, *, timeout: float = 120.0, **task_options) -> SayResult:
    task = build_task(user_id, text, **task_options)
    result = SayResult(task_id=task["task_id"])
    redis = async_redis_client(settings)
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(settings.bridge_response_channel, settings.bridge_avatar_channel)
        started = time.perf_counter()
        await redis.lpush(settings.bridge_request_queue, json.dumps(task, ensure_ascii=False))
        deadline = started + timeout
        while time.perf_counter() < deadline:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is None:
                continue
            try:
                body = json.loads(message["data"])
            except (TypeError, ValueError):
                continue
            if body.get("task_id") != task["task_id"]:
                continue
            if message["channel"] == settings.bridge_avatar_channel:
                result.avatar_events.append(body)
            else:
                result.response = body
                result.seconds = time.perf_counter() - started
                break
    finally:
        await pubsub.aclose()
        await redis.aclose()
    return result


"""`vtuber-letta stream end`: one short, dated summary per viewer who spoke during the stream.

Never on the speech path: the bridge does not call this; an operator (or the host's stream-end
hook) runs it after the stream. For each viewer whose agent had a turn in the last `since_hours`,
it reads that stream's messages from Letta, asks the model for one sentence ("last stream we
talked about ...") — one model call per active viewer, VTL_EPISODES=false turns it off — and hands
the sentence to the memory gate (POST /v1/episode, tools/memory_gate.py), which hides contact
details, stores it in the viewer's long-term tier and shows it in their block as `last_stream`
(tools/memory_tiers.py decides what moves out if the block gets full).

The model is called directly on the OpenAI-compatible endpoint the agents use (your
OPENAI_BASE_URL / OLLAMA_BASE_URL, or the scripted model), not through the viewer's agent, so the
summary is not a turn: it leaves no message in the viewer's history and says nothing on stream.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

from provisioning.viewers import ViewerAgents
from tools.gate_client import GateClient
from vtuber_letta.settings import Settings

MAX_TRANSCRIPT_CHARS = 6000
MAX_SUMMARY_TOKENS = 80
SUMMARY_TIMEOUT_S = 120
EPISODE_PROMPT = (
    "You write one-sentence episode notes for an AI VTuber's long-term memory. Read the chat between one "
    "viewer and the VTuber during today's stream and write ONE short sentence, starting with "
    "'We talked about', saying what they talked about. Only topics: no phone numbers, addresses, links "
    "or other contact details, no amounts of money, nothing the viewer did not say."
)


@dataclass
class EpisodeReport:
    summarised: list[tuple[str, float]] = field(default_factory=list)  # (viewer id, seconds of the model call)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (viewer id, why)
    enabled: bool = True

    def render(self) -> str:
        if not self.enabled:
            return "episodes are off (VTL_EPISODES=false): nobody was summarised"
        lines = [f"episode  {viewer}: stored ({seconds * 1000:.0f} ms model call)"
                 for viewer, seconds in self.summarised]
        lines += [f"skipped  {viewer}: {why}" for viewer, why in self.skipped]
        total = sum(seconds for _, seconds in self.summarised)
        lines.append(f"{len(self.summarised)} episode(s) stored, {len(self.skipped)} skipped; "
                     f"{len(self.summarised)} model call(s), {total:.1f} s in total")
        return "\n".join(lines)


def end_stream(settings: Settings, *, since_hours: float = 6.0, now: datetime | None = None,
               log: Callable[[str], None] = lambda _msg: None) -> EpisodeReport:
    """Summarise the stream for every viewer who spoke in the last since_hours."""
    report = EpisodeReport(enabled=settings.episodes_enabled)
    if not settings.episodes_enabled:
        return report
    now = now or datetime.now(timezone.utc)
    since = now - timedelta(hours=since_hours)
    viewers = ViewerAgents(settings)
    gate = GateClient.from_settings(settings)
    for row in viewers.list():
        transcript = stream_transcript(viewers.client, row["agent_id"], since)
        if not transcript:
            continue  # did not speak this stream
        started = time.perf_counter()
        summary = summarise(settings, transcript)
        seconds = time.perf_counter() - started
        if not summary:
            report.skipped.append((row["viewer_id"], "the model gave no summary"))
            continue
        answer = gate.call("episode", row["agent_id"], date=now.date().isoformat(), summary=summary)
        if answer.startswith("Error"):
            report.skipped.append((row["viewer_id"], answer))
            continue
        log(f"episode for {row['viewer_id']}: {summary}")
        report.summarised.append((row["viewer_id"], seconds))
    return report


def stream_transcript(client, agent_id: str, since: datetime) -> str:
    """The viewer's and the VTuber's words since `since`, oldest first, at most MAX_TRANSCRIPT_CHARS."""
    lines: list[str] = []
    for message in client.agents.messages.list(agent_id, limit=200, order="desc"):
        if message.date and message.date < since:
            break
        if message.message_type not in ("user_message", "assistant_message"):
            continue
        content = message.content
        text = content if isinstance(content, str) else "".join(getattr(p, "text", "") or "" for p in content or [])
        speaker = "viewer" if message.message_type == "user_message" else "VTuber"
        lines.append(f"{speaker}: {' '.join(text.split())}")
    transcript = "\n".join(reversed(lines))
    return transcript[-MAX_TRANSCRIPT_CHARS:]


def model_endpoint(settings: Settings) -> tuple[str, str, str | None]:
    """(base URL, model id, API key) of the OpenAI-compatible endpoint the agents' model is on."""
    model = settings.resolved_model_handle().split("/", 1)[-1]
    if settings.ollama_base_url:
        return settings.ollama_base_url.rstrip("/") + "/v1", model, None
    if settings.uses_real_model:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return (settings.openai_base_url or "https://api.openai.com/v1").rstrip("/"), model, key
    return settings.scripted_model_base_url, model, None


def summarise(settings: Settings, transcript: str) -> str:
    """One model call: the episode sentence for this transcript ('' when the model says nothing)."""
    base, model, key = model_endpoint(settings)
    body = {"model": model, "max_tokens": MAX_SUMMARY_TOKENS, "stream": False,
            "messages": [{"role": "system", "content": EPISODE_PROMPT}, {"role": "user", "content": transcript}]}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{base}/chat/completions", data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=SUMMARY_TIMEOUT_S) as response:
        answer = json.loads(response.read())
    choices = answer.get("choices") or [{}]
    return " ".join(str((choices[0].get("message") or {}).get("content") or "").split())

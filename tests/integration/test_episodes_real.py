"""Stream-end episodes on the real stack (provisioning/episodes.py through the real memory gate).

A viewer who spoke gets one dated summary: in their long-term tier (found by recall) and in their
block as last_stream, contact details hidden; one model call each, none for a viewer who did not
speak; no message is added to the viewer's history; VTL_EPISODES=false summarises nobody.
The silence sweep, fed by the stats a real bridge counts: a viewer silent for
VTL_EPISODE_AFTER_SILENCE_HOURS gets one episode, a viewer still talking none, and neither a second
sweep nor a stream end after it summarises the same conversation again.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from provisioning.episodes import end_stream, sweep_silent
from provisioning.viewers import ViewerAgents
from tests.integration.bridge_helpers import push, task, wait_for_replies
from tools.gate_client import GateClient
from tools.human_block import parse_fields
from tools.memory_tiers import EPISODE_TAG
from vtuber_letta import redis_keys as keys
from vtuber_letta.letta_api import letta_client

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fresh_rules")]

RUN = uuid.uuid4().hex[:6]
SUMMARY = "We talked about kites and jasmine tea, and they said to call 555-123-4567."


def test_stream_end_stores_one_episode_per_viewer_who_spoke(provisioned, client, scripted):
    settings = provisioned
    viewers = ViewerAgents(settings)
    talker = viewers.ensure(f"twitch:talker-{RUN}", "Talker", "twitch").agent_id
    quiet = viewers.ensure(f"twitch:quiet-{RUN}", "Quiet", "twitch").agent_id
    messages = letta_client(settings, for_messages=True).with_options(timeout=180)
    for text in ("I love flying kites!", "and jasmine tea after that"):
        messages.agents.messages.create(agent_id=talker, messages=[{"role": "user", "content": text}])
    history = sum(1 for _ in client.agents.messages.list(talker, limit=200))
    scripted.add_rules({"name": "episode", "when": {"system_contains": "episode notes"}, "then": {"reply": SUMMARY}})

    off = end_stream(settings.model_copy(update={"episodes_enabled": False}))
    assert off.render().startswith("episodes are off") and scripted.chat_requests("episode") == 0

    report = end_stream(settings)
    done = [viewer for viewer, _ in report.summarised]
    print(report.render())
    assert f"twitch:talker-{RUN}" in done and f"twitch:quiet-{RUN}" not in done
    assert scripted.chat_requests("episode") == len(done)  # one model call per viewer who spoke
    assert end_stream(settings).summarised == []  # run twice: the same stream is not summarised again
    assert scripted.chat_requests("episode") == len(done)

    today = datetime.now(timezone.utc).date().isoformat()
    block = client.agents.blocks.retrieve("human", agent_id=talker).value
    shown = parse_fields(block, "viewer")["last_stream"]
    assert shown.startswith(f"{today}: We talked about kites and jasmine tea") and "555" not in block
    episodes = [p for p in client.agents.passages.list(talker, limit=100) if EPISODE_TAG in (p.tags or [])]
    assert len(episodes) == 1 and "555-123-4567" not in episodes[0].text and "[hidden]" in episodes[0].text
    recalled = GateClient.from_settings(settings).recall(talker, "kites")
    assert f"- (last stream) {today}: We talked about kites" in recalled
    assert "last_stream" not in client.agents.blocks.retrieve("human", agent_id=quiet).value
    assert sum(1 for _ in client.agents.messages.list(talker, limit=200)) == history  # not a turn


def _episodes_of(client, agent_id: str) -> list:
    return [p for p in client.agents.passages.list(agent_id, limit=100) if EPISODE_TAG in (p.tags or [])]


def test_silence_sweep_summarises_each_conversation_once(provisioned, client, scripted, r, bridges, clean_bridge):
    settings = provisioned
    silent, talking = f"twitch:silent-{RUN}", f"twitch:talking-{RUN}"
    bridge = bridges()

    def say(viewer: str, text: str) -> None:
        sent = json.loads(push(r, [task(viewer, text, display_name=viewer.split(":")[1])])[0])["task_id"]
        wait_for_replies(r, [sent], 90, bridge)

    say(silent, "I built a treehouse this weekend!")
    between = time.time()  # the silent viewer's last turn was counted before this, the other's after
    say(talking, "Still here, watching the speedrun")
    bridge.stop()
    scripted.add_rules({"name": "episode", "when": {"system_contains": "episode notes"},
                        "then": {"reply": "We talked about the treehouse they built."}})
    # The sweep runs as if VTL_EPISODE_AFTER_SILENCE_HOURS had passed since `between`, not hours later.
    later = datetime.fromtimestamp(between, timezone.utc) + timedelta(hours=settings.episode_after_silence_hours)

    first = sweep_silent(settings, now=later)
    print(first.render())
    done = [viewer for viewer, _ in first.summarised]
    assert silent in done and talking not in done
    assert scripted.chat_requests("episode") == len(done)  # one model call per due viewer
    silent_agent = r.hget(keys.VIEWER_AGENTS, silent).decode()  # the agent the bridge made for them
    assert len(_episodes_of(client, silent_agent)) == 1

    assert sweep_silent(settings, now=later).summarised == []  # a second sweep: nothing new
    assert scripted.chat_requests("episode") == len(done)

    ended = end_stream(settings, now=later)  # the stream ends: only the viewer still talking is left
    print(ended.render())
    ended_done = [viewer for viewer, _ in ended.summarised]
    assert talking in ended_done and silent not in ended_done
    assert (silent, "nothing new since their last episode") in ended.skipped
    assert len(_episodes_of(client, silent_agent)) == 1
    assert scripted.chat_requests("episode") == len(done) + len(ended_done)
    assert sweep_silent(settings, now=later + timedelta(days=1)).summarised == []  # both are done
    assert scripted.chat_requests("episode") == len(done) + len(ended_done)

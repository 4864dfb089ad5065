"""Issue: scaling out. Two bridge replicas against one Redis and one Letta 0.16.8.

10 viewers x 20 messages, pushed at once and interleaved across viewers: every task is answered
exactly once (one `tts_requests` item, one user message in the agent's history), each viewer's
replies come out in send order and their turns reach the agent in send order, every viewer has
exactly one agent, and both replicas served turns (each replica logs the tasks it handled).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict

import pytest

from bridge.letta_turns import otid_for
from tests.integration.bridge_helpers import (
    BridgeProcess,
    agents_of,
    bridge_leftovers,
    clear_bridge_state,
    dead_letters,
    push,
    redis_conn,
    run_id,
    tts_replies,
    wait_for,
    wait_for_replies,
)
from tests.integration.scripted import ScriptedModel
from vtuber_letta.letta_api import letta_client

pytestmark = pytest.mark.integration

VIEWERS = 10
MESSAGES = 20
ANSWER_TIMEOUT = 300.0
_LOG_LINE = re.compile(r"task=(\S+) viewer=(\S+) .*outcome=(\w+)")


def handled_by(bridge: BridgeProcess) -> dict[str, list[str]]:
    """task id -> outcomes this replica logged for it (one log line per task it handled)."""
    out: dict[str, list[str]] = defaultdict(list)
    for line in bridge.log_text().splitlines():
        match = _LOG_LINE.search(line)
        if match:
            out[match.group(1)].append(match.group(3))
    return out


def user_otids_in_order(client, agent_id: str) -> list[str]:
    """The otids of the agent's user messages, oldest first (its whole history)."""
    otids = []
    for message in client.agents.messages.list(agent_id, order="asc", limit=1000):
        if getattr(message, "message_type", None) == "user_message" and getattr(message, "otid", None):
            otids.append(message.otid)
    return otids


def test_two_replicas_answer_every_task_once_and_each_viewer_in_order(provisioned, tmp_path):
    settings = provisioned
    r = redis_conn(settings)
    model = ScriptedModel(settings.scripted_model_port)
    clear_bridge_state(r)
    model.reset()
    rid = run_id()
    # The default LETTA_TIMEOUT: a turn that outlives it under load is waited out, not sent twice.
    replicas = [BridgeProcess(settings, tmp_path / "logs", replica_id=f"rep-{name}-{rid}") for name in ("a", "b")]
    try:
        for bridge in replicas:
            bridge.start()
        viewers = [f"rp:viewer{i:02d}-{rid}" for i in range(VIEWERS)]
        sent: dict[str, list[str]] = {v: [] for v in viewers}
        tasks = []
        for j in range(MESSAGES):  # interleaved: message j of every viewer before message j+1 of any
            for i, viewer in enumerate(viewers):
                task_id = f"rp-{rid}-v{i:02d}-m{j:02d}"
                sent[viewer].append(task_id)
                tasks.append({"task_id": task_id, "type": "text", "user_id": viewer,
                              "content": f"viewer {i} message {j:02d} {rid}", "source": "user",
                              "meta": {"memory_type": "permanent", "platform": "rp"}})
        started = time.monotonic()
        push(r, tasks)  # one LPUSH of all 200, oldest first
        replies = wait_for_replies(r, [t["task_id"] for t in tasks], ANSWER_TIMEOUT, replicas[0])
        seconds = time.monotonic() - started
        wait_for(lambda: not any(bridge_leftovers(r).values()), 30, what="the bridge to be idle")
        time.sleep(1.0)  # a duplicate would have landed by now
        replies = tts_replies(r)
        letters = dead_letters(r)
        for bridge in replicas:
            assert bridge.alive, bridge.log_tail()
    finally:
        codes = [bridge.stop(timeout=60) for bridge in replicas if bridge.proc is not None]
        clear_bridge_state(r)
        r.close()
    assert codes == [0, 0], [b.log_tail() for b in replicas]

    # Exactly one answer per task, and nothing else.
    per_task = Counter(reply["task_id"] for reply in replies)
    assert len(replies) == VIEWERS * MESSAGES
    assert set(per_task) == {t["task_id"] for t in tasks}
    assert [t for t, n in per_task.items() if n != 1] == []
    text_of = {t["task_id"]: t["content"] for t in tasks}
    for reply in replies:
        assert reply["text"] == f"(scripted) I heard: {text_of[reply['task_id']]}"
    assert letters == []

    # Each viewer in order: replies were handed over in send order.
    viewer_of = {t["task_id"]: t["user_id"] for t in tasks}
    handed: dict[str, list[str]] = defaultdict(list)
    for reply in replies:  # tts_replies: in hand-over order
        handed[viewer_of[reply["task_id"]]].append(reply["task_id"])
    for viewer in viewers:
        assert handed[viewer] == sent[viewer], f"{viewer}: replies out of order"

    # One agent per viewer; each task reached it once, in send order (no duplicate turn).
    client = letta_client(settings)
    for viewer in viewers:
        agents = agents_of(client, viewer)
        assert len(agents) == 1, f"{viewer} has {len(agents)} agents"
        assert user_otids_in_order(client, agents[0].id) == [otid_for(t) for t in sent[viewer]], viewer

    # Both replicas served turns, and no task was handled (answered) by both.
    logs = [handled_by(bridge) for bridge in replicas]
    answered = [{t for t, outcomes in log.items() if t.startswith(f"rp-{rid}") and "answered" in outcomes} for log in logs]
    assert all(answered), f"turns per replica: {[len(a) for a in answered]}"
    assert not answered[0] & answered[1]
    assert len(answered[0]) + len(answered[1]) == VIEWERS * MESSAGES
    print(json.dumps({"replicas": 2, "tasks": VIEWERS * MESSAGES, "seconds": round(seconds, 1),
                      "tasks_per_second": round(VIEWERS * MESSAGES / seconds, 2),
                      "turns_per_replica": [len(a) for a in answered]}))

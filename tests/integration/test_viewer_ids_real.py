"""Issue 15, one viewer-id rule, on the real stack: a `vtuber-letta bridge` subprocess, real Redis
(the route script's Lua check), Letta 0.16.8 and the scripted model. Ids with `/`, spaces and emoji
are answered by their own agent (which the CLI then finds by the same id); an id with a control or
format character is dead-lettered with the rule's reason, and nothing else happens to it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stack.private import child_env
from tests.integration.bridge_helpers import agents_of, bridge_leftovers, clear_bridge_state, dead_letters, push, redis_conn, run_id, wait_for, wait_for_replies
from vtuber_letta import redis_keys as keys
from vtuber_letta.commands.say import build_task

pytestmark = pytest.mark.integration

DEFAULT_REPLY = "(scripted) I heard: {}"


@pytest.fixture
def r(stack, stack_settings):
    conn = redis_conn(stack_settings)
    clear_bridge_state(conn)
    yield conn
    clear_bridge_state(conn)
    conn.close()


def test_ids_with_slashes_spaces_and_emoji_are_answered_and_control_characters_dead_lettered(
    provisioned, scripted, r, bridges, client
):
    scripted.reset()
    rid = run_id()
    slashed = f"youtube:UC123/x.y-{rid}"
    spaced = f"观众 小明🌟 {rid}"
    bidi = f"youtube:UC123/\u202ex.y-{rid}"
    good = [build_task(slashed, f"{rid} from a channel id with a slash"),
            build_task(spaced, f"{rid} from an id with a space and an emoji")]
    bad = build_task(bidi, f"{rid} from an id with a bidi override")
    bridge = bridges()
    # The emoji task as a producer with json.dumps' defaults sends it: \u escapes, a surrogate pair.
    push(r, [good[0], json.dumps(good[1]), bad])

    replies = wait_for_replies(r, [t["task_id"] for t in good], 120, bridge)
    assert {x["task_id"]: x["text"] for x in replies} == {t["task_id"]: DEFAULT_REPLY.format(t["content"]) for t in good}
    for viewer in (slashed, spaced):
        [agent] = agents_of(client, viewer)
        assert agent.metadata["viewer_id"] == viewer  # byte for byte, nothing trimmed or folded
        assert r.hget(keys.VIEWER_AGENTS, viewer).decode() == agent.id
    assert agents_of(client, slashed)[0].metadata["platform"] == "youtube"
    assert agents_of(client, spaced)[0].metadata["platform"] == "unknown"

    wait_for(lambda: dead_letters(r), 30, what="the dead letter of the bidi id")
    [letter] = dead_letters(r)
    assert letter["reason"] == "invalid user_id: contains a control or format character (U+202E)"
    assert (letter["task_id"], letter.get("user_id"), letter["stage"]) == (bad["task_id"], None, "intake")
    assert not agents_of(client, bidi)
    assert bridge_leftovers(r) == {"requests": 0, "staging": 0, "triage": 0, "viewer_queues": 0}

    # The CLI takes the same ids: it finds the agent the bridge made, and refuses the bidi id
    # with the dead letter's reason.
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vtuber_letta.commands.cli", *args], env=child_env(provisioned, VTL_LOG_LEVEL="WARNING"),
                              cwd=provisioned.data_dir.resolve(), capture_output=True, text=True, timeout=120)

    shown = cli("agent", "ensure", spaced)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["agent_id"] == agents_of(client, spaced)[0].id
    refused = cli("agent", "ensure", bidi)
    assert refused.returncode == 1 and refused.stderr == f"error: {letter['reason']}\n", refused.stderr

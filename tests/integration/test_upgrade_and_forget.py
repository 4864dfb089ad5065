"""Template upgrades and "forget me" against the real stack (Letta 0.16.8, Redis, scripted model).

Upgrades: agents made from an older template (another system prompt, a tool missing, other tool
rules) are brought to the current one by `vtuber-letta provision`, and what the model receives on
their next turn shows it; their memory and history are untouched; a second run changes nothing;
a viewer whose turn is in flight is waited for, never changed under the turn.

Forget: after `agent forget`, nothing of the viewer is left in any Redis key or list (read type by
type) nor in Letta (API and a data-only dump of its database); the running bridge drops its cached
agent and the viewer's next message gets a fresh agent and an answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from agent_templates.render import render_system
from provisioning.blueprint import load_blueprint
from provisioning.naming import viewer_hash
from provisioning.provision import provision
from provisioning.upgrade import FINGERPRINT_KEY
from provisioning.viewers import ViewerAgents
from stack.letta_database import LettaDatabase
from stack.private import REPO_ROOT
from tests.integration.bridge_helpers import agents_of, clear_bridge_state, dead_letters, push, redis_conn, wait_for, wait_for_replies
from tests.integration.test_provisioning import cli_env
from vtuber_letta import redis_keys as keys
from vtuber_letta.commands.say import build_task
from vtuber_letta.letta_api import letta_client

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fresh_rules")]

CLI = REPO_ROOT / ".venv" / "bin" / "vtuber-letta"
RUN = uuid.uuid4().hex[:6]
OLD_SYSTEM = f"You are an old VTuber prompt, version 0 ({RUN}). OLD-PROMPT-MARKER."
OLD_RULES = [{"tool_name": "stay_silent", "type": "exit_loop"}]
DROPPED_TOOL = "play_motion"


def run_cli(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], env=cli_env(settings), cwd="/tmp", capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def messages_client(provisioned):
    return letta_client(provisioned, for_messages=True).with_options(timeout=120)


def make_older(client, agent_id: str) -> None:
    """What an agent made by an older template looks like (and in context, as it would be)."""
    agent = client.agents.retrieve(agent_id, include=["agent.tools"])
    meta = {k: v for k, v in (agent.metadata or {}).items() if k != FINGERPRINT_KEY}
    client.agents.update(agent_id, system=OLD_SYSTEM, tool_rules=OLD_RULES, metadata=meta,
                         tool_ids=[t.id for t in agent.tools if t.name != DROPPED_TOOL])
    client.agents.recompile(agent_id)


def all_messages(client, agent_id: str) -> list[tuple[str, str]]:
    return [(m.id, m.message_type) for m in client.agents.messages.list(agent_id, order="asc", limit=500)]


def human_of(client, agent_id: str) -> str:
    return client.agents.blocks.retrieve("human", agent_id=agent_id).value


def passages_of(client, agent_id: str) -> list[str]:
    return sorted(p.text for p in client.agents.passages.list(agent_id, limit=100))


def next_request(scripted, messages_client, agent_id: str, text: str) -> dict:
    messages_client.agents.messages.create(agent_id=agent_id, messages=[{"role": "user", "content": text}])
    return scripted.requests(1)[0]


# ================================================================================ template upgrades

def test_provision_upgrades_older_agents_and_keeps_their_memory(provisioned, client, messages_client, scripted):
    settings = provisioned
    viewers = ViewerAgents(settings)
    blueprint = load_blueprint(settings)
    wanted_system = render_system(blueprint.template, blueprint.config)
    wanted_tools = sorted(blueprint.template.tools)
    a = viewers.ensure(f"twitch:old-a-{RUN}", "Old A")
    b = viewers.ensure(f"bilibili:old-b-{RUN}", "Old B")
    fresh = viewers.ensure(f"youtube:current-{RUN}", "Current")  # made now: already current

    # A's memory and history: facts in the human block, a passage, a conversation.
    human_a = human_of(client, a.agent_id) + f"\n- has a cat called Mochi-{RUN}"
    block = client.agents.blocks.retrieve("human", agent_id=a.agent_id)
    client.blocks.update(block.id, value=human_a)
    client.agents.passages.create(a.agent_id, text=f"Old A once streamed a comet hunt {RUN}")
    messages_client.agents.messages.create(agent_id=a.agent_id, messages=[{"role": "user", "content": "hello from the old days"}])
    for viewer in (a, b):
        make_older(client, viewer.agent_id)
    before = {v.agent_id: (human_of(client, v.agent_id), passages_of(client, v.agent_id),
                           all_messages(client, v.agent_id)) for v in (a, b)}
    old = next_request(scripted, messages_client, b.agent_id, "are you old?")
    assert "OLD-PROMPT-MARKER" in old["messages"][0]["content"] and DROPPED_TOOL not in old["tools"]
    before[b.agent_id] = before[b.agent_id][:2] + (all_messages(client, b.agent_id),)

    # The plan: both older agents, nothing sent.
    dry = run_cli(settings, "provision", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "Traceback" not in dry.stderr
    for viewer in (a, b):
        assert f"{viewer.viewer_id}" in dry.stdout and "would upgrade" in dry.stdout, dry.stdout
    assert "system; tools +play_motion; tool_rules" in dry.stdout, dry.stdout
    assert "2 agents to upgrade" in dry.stdout, dry.stdout
    assert client.agents.retrieve(a.agent_id).system == OLD_SYSTEM, "--dry-run changed an agent"

    # B's turn is "in flight" (its bridge worker lock is held) for 2 s: B is waited for, then upgraded.
    r = redis_conn(settings)
    r.set(keys.viewer_active(b.viewer_id), "a-bridge-worker", px=2000)
    started = time.monotonic()
    summary = provision(settings, out=lambda _: None)
    took = time.monotonic() - started
    assert summary.ok, summary.render()
    assert (summary.agent_counts["upgraded"], summary.agent_counts["failed"]) == (2, 0), summary.render()
    assert summary.agent_counts["current"] >= 1  # the fresh agent (and any other module's)
    assert took >= 1.5, "B was changed while its turn was in flight"
    assert r.get(keys.viewer_active(b.viewer_id)) is None  # the upgrade's hold was let go

    for viewer in (a, b):
        agent = client.agents.retrieve(viewer.agent_id, include=["agent.tools"])
        assert agent.metadata[FINGERPRINT_KEY] == client.agents.retrieve(fresh.agent_id).metadata[FINGERPRINT_KEY]
        assert agent.metadata["viewer_id"] == viewer.viewer_id  # the rest of the metadata kept
        human, passages, history = before[viewer.agent_id]
        assert human_of(client, viewer.agent_id) == human
        assert passages_of(client, viewer.agent_id) == passages
        assert all_messages(client, viewer.agent_id) == history, "the upgrade changed the history"
        # What the model sees on the next turn: the new system prompt and the whole tool set.
        seen = next_request(scripted, messages_client, viewer.agent_id, f"new template? {RUN}")
        system = seen["messages"][0]["content"]
        assert wanted_system in system and "OLD-PROMPT-MARKER" not in system, system[:300]
        assert sorted(seen["tools"]) == wanted_tools
        assert f"Mochi-{RUN}" in system if viewer is a else True  # the human block is still in context
        # Older history is still what the model is shown after the upgrade.
        if viewer is a:
            assert "hello from the old days" in json.dumps(seen["messages"], ensure_ascii=False)
    rules = sorted(json.dumps(rule.model_dump(exclude_none=True), sort_keys=True)
                   for rule in client.agents.retrieve(a.agent_id).tool_rules)
    assert rules == sorted(json.dumps(rule, sort_keys=True) for rule in blueprint.template.letta_tool_rules())

    again = run_cli(settings, "provision")
    assert again.returncode == 0, again.stderr
    assert "0 agents upgraded" in again.stdout and "0 failed" in again.stdout, again.stdout


# ================================================================================ forget me

def redis_dump(r) -> list[tuple[bytes, bytes]]:
    """Every key and every value in Redis, read by type: (key, one value or member or field)."""
    out = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        out.append((key, key))
        if kind == "string":
            out.append((key, r.get(key) or b""))
        elif kind == "list":
            out += [(key, v) for v in r.lrange(key, 0, -1)]
        elif kind == "hash":
            for f, v in r.hgetall(key).items():
                out += [(key, f), (key, v)]
        elif kind == "set":
            out += [(key, m) for m in r.smembers(key)]
        elif kind == "zset":
            out += [(key, m) for m in r.zrange(key, 0, -1)]
        elif kind == "stream":
            out += [(key, json.dumps(entry, default=repr).encode()) for entry in r.xrange(key)]
    return out


def database_text(stack, tmp_path: Path) -> str:
    """Every row of the Letta database as text (a data-only plain pg_dump)."""
    db = LettaDatabase(stack)
    path = tmp_path / "letta-data.sql"
    subprocess.run([str(db.bin / "pg_dump"), *db._conn(), "-d", "letta", "--data-only", "-f", str(path)],
                   env=db._env(), check=True, capture_output=True, timeout=300)
    return path.read_text(encoding="utf-8", errors="replace")


def test_forget_removes_every_trace_and_the_running_bridge_makes_a_fresh_agent(
        stack, provisioned, client, bridges, tmp_path):
    settings = provisioned
    r = redis_conn(settings)
    clear_bridge_state(r)
    viewer = f"twitch:forget-all-{RUN}"
    secret = f"Zorblax-{RUN}"  # what the viewer said (the scripted model echoes it back)
    fact = f"allergic to kiwis {RUN}-fact"
    passage = f"viewer's archived secret {RUN}-passage"
    bridge = bridges()

    # Answered tasks (done markers, replies waiting on tts_requests), stats, a dead letter,
    # a task forwarded to memory-python (still in its list: no consumer here).
    tasks = [build_task(viewer, f"my hamster is {secret} number {i}", display_name="Forget Me") for i in range(2)]
    event = build_task(viewer, f"super chat {secret}", display_name="Forget Me", task_type="super_chat",
                       meta={"amount": 30, "currency": "CNY"})
    tasks.append(event)
    push(r, tasks)
    wait_for_replies(r, [t["task_id"] for t in tasks[:2]], 120, bridge)
    wait_for(lambda: r.exists(keys.task_done(event["task_id"])), 120, what="the super chat")
    bad = build_task(viewer, "\x01\x02\x03")
    temporary = build_task(viewer, f"short-term {secret}")
    temporary["meta"]["memory_type"] = "temporary"
    push(r, [bad, temporary])
    wait_for(lambda: any(d.get("task_id") == bad["task_id"] for d in dead_letters(r)), 60, what="the dead letter")
    wait_for(lambda: r.exists(keys.task_done(temporary["task_id"])), 60, what="the forwarded task")
    (old_agent,) = [a.id for a in agents_of(client, viewer)]
    human = client.agents.blocks.retrieve("human", agent_id=old_agent)
    client.blocks.update(human.id, value=human.value + f"\n- {fact}")
    client.agents.passages.create(old_agent, text=passage)
    assert r.exists(keys.viewer_stats(viewer)) and r.scard(keys.viewer_tasks(viewer)) >= 3

    # Queued tasks: the bridge is paused (SIGSTOP) while two more arrive, one on the request list
    # and one already in the viewer's queue, so forget finds them queued (3 with the one waiting
    # for memory-python).
    os.kill(bridge.pid, signal.SIGSTOP)
    try:
        queued = [build_task(viewer, f"queued {secret} {i}") for i in range(2)]
        push(r, [queued[0]])
        r.rpush(keys.viewer_queue(viewer), json.dumps(queued[1]))
        r.sadd(keys.BRIDGE_PENDING, viewer)
        done = subprocess.run([str(CLI), "agent", "forget", viewer], env=cli_env(settings), cwd="/tmp",
                              capture_output=True, text=True, timeout=300)
    finally:
        os.kill(bridge.pid, signal.SIGCONT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for part in ("1 agent", "1 own block", "1 archive", "1 archival passage", "1 map entry", "1 stats hash",
                 "3 queued tasks", "1 dead letter", "replies waiting for speech", "done markers", "messages"):
        assert part in out, out

    # Redis: no key, member, field or value holds the viewer's id or their words.
    needles = [viewer.encode(), secret.encode(), fact.encode(), passage.encode(),
               json.dumps(viewer)[1:-1].encode(), json.dumps(secret)[1:-1].encode()]
    left = [(k, v[:120]) for k, v in redis_dump(r) if any(n in v for n in needles)]
    assert not left, f"Redis still holds the forgotten viewer: {left[:5]}"
    assert r.hexists(keys.FORGOTTEN, viewer_hash(viewer))  # the tombstone (a hash, not the id)

    # Letta: the agent, its block, its archive and passages, its messages.
    assert agents_of(client, viewer) == []
    assert all(fact not in (b.value or "") for b in client.blocks.list(limit=1000))
    assert all(old_agent not in (a.name or "") and passage not in (a.name or "") for a in client.archives.list(limit=1000))
    hits = client.passages.search(query=passage, limit=50)
    assert all(passage not in item.passage.text for item in hits)
    rows = database_text(stack, tmp_path)
    for needle in (secret, fact, passage, old_agent, viewer):
        assert needle not in rows, f"the Letta database still holds {needle!r}"

    # The running bridge dropped its cached agent: the viewer's next message gets a fresh one.
    wait_for(lambda: "cached agent dropped" in bridge.log_text(), 30, what="the bridge to drop the cached agent")
    again = build_task(viewer, "hello, I am new here")
    push(r, [again])
    replies = wait_for_replies(r, [again["task_id"]], 120, bridge)
    assert [x["text"] for x in replies if x["task_id"] == again["task_id"]] == ["(scripted) I heard: hello, I am new here"]
    (new_agent,) = [a.id for a in agents_of(client, viewer)]
    assert new_agent != old_agent
    assert not any(d.get("task_id") == again["task_id"] for d in dead_letters(r))
    assert fact not in client.agents.blocks.retrieve("human", agent_id=new_agent).value


def test_a_404_on_a_turn_re_resolves_the_agent_instead_of_dead_lettering(provisioned, client, bridges):
    """A bridge that never heard of the deletion (no forget, no invalidation): the 404 path."""
    r = redis_conn(provisioned)
    clear_bridge_state(r)
    viewer = f"twitch:deleted-under-{RUN}"
    bridge = bridges()
    first = build_task(viewer, "first")
    push(r, [first])
    wait_for_replies(r, [first["task_id"]], 120, bridge)
    (old_agent,) = [a.id for a in agents_of(client, viewer)]
    client.agents.delete(old_agent)  # behind the bridge's back: its cache and the map are stale
    second = build_task(viewer, "second")
    push(r, [second])
    replies = wait_for_replies(r, [second["task_id"]], 120, bridge)
    assert [x["text"] for x in replies if x["task_id"] == second["task_id"]] == ["(scripted) I heard: second"]
    assert not dead_letters(r), dead_letters(r)
    (new_agent,) = [a.id for a in agents_of(client, viewer)]
    assert new_agent != old_agent
    assert r.hget(keys.VIEWER_AGENTS, viewer) == new_agent.encode()

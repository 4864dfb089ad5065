"""Provisioning and the viewer agents against the real local stack (Letta 0.16.8, Redis).

Idempotent provisioning, one shared persona/stream for every viewer (people's edits win
until --reset-persona), `stream set`, race-free agent creation across processes, awkward
and invalid viewer ids, a lost Redis map, export and forget — through the Python API and
through the real `vtuber-letta` command, as an operator would run it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from letta_client import NotFoundError

from provisioning.blueprint import find_shared_block, load_blueprint
from provisioning.naming import agent_name, viewer_tag
from provisioning.provision import provision
from provisioning.viewers import ViewerAgents
from stack.private import REPO_ROOT
from vtuber_letta import redis_keys
from vtuber_letta.letta_api import letta_client
from vtuber_letta.redis_api import redis_client

# Every test starts with no rule on the scripted model (conftest.fresh_rules).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fresh_rules")]

CLI = REPO_ROOT / ".venv" / "bin" / "vtuber-letta"
LETTA_NAME = re.compile(r"^[\w '\-]+$")  # what Letta 0.16.8 accepts as an agent name
RUN = uuid.uuid4().hex[:6]  # keeps this module's viewers apart from other modules' ones
TEMPLATE = "vtuber"


# ---------------------------------------------------------------- helpers and fixtures

def cli_env(settings) -> dict[str, str]:
    """The environment an operator would set to point the CLI at this stack (nothing inherited that configures us)."""
    ours = ("LETTA_", "VTL_", "REDIS_", "OPENAI_", "OLLAMA_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(
        LETTA_API_URL=settings.letta_api_url,
        LETTA_API_KEY=settings.letta_password,
        REDIS_HOST=settings.redis_host,
        REDIS_PORT=str(settings.redis_port),
        VTL_DATA_DIR=str(settings.data_dir),
        VTL_PERSONA_CONFIG=str(Path(settings.persona_config).resolve()),
        VTL_LOG_LEVEL="WARNING",
        VTL_MEMORY_GATE_URL=settings.memory_gate_url,
    )
    if settings.redis_password:
        env["REDIS_PASSWORD"] = settings.redis_password.get_secret_value()
    return env


def run_cli(settings, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # cwd outside the repo: no stray .env can configure the command.
    return subprocess.run([str(CLI), *args], env=cli_env(settings), cwd=cwd or Path("/tmp"),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def client(stack):
    return letta_client(stack.settings)


@pytest.fixture(scope="module")
def rds(stack):
    return redis_client(stack.settings)


@pytest.fixture(scope="module")
def provisioned(stack, client):
    summary = provision(stack.settings, out=lambda _: None)
    assert summary.ok, summary.render()
    return summary


@pytest.fixture(scope="module")
def viewers(stack, provisioned):
    return ViewerAgents(stack.settings)


@pytest.fixture(scope="module")
def model(scripted):
    return scripted


@pytest.fixture(scope="module")
def two_viewers(viewers):
    return [viewers.ensure(f"twitch:share-{RUN}-a", "Share A", "twitch"),
            viewers.ensure(f"bilibili:share-{RUN}-b", "Share B", "bilibili")]


def shared(client, label: str):
    block = find_shared_block(client, TEMPLATE, label)
    assert block is not None, f"no shared {label} block on the server"
    return block


def blocks_of(client, agent_id: str) -> dict:
    agent = client.agents.retrieve(agent_id, include=["agent.blocks"])
    return {b.label: b for b in agent.blocks or []}


def server_snapshot(client) -> dict:
    """Every tool, block and agent on the server, with what provisioning could change about them."""
    return {
        "tools": sorted((t.id, t.name, t.source_code or "", tuple(sorted(t.tags or [])), t.return_char_limit,
                         bool(t.enable_parallel_execution))
                        for t in client.tools.list(limit=1000)),
        "blocks": sorted((b.id, b.label, b.value, b.limit, b.description, bool(b.read_only))
                         for b in client.blocks.list(limit=1000)),
        "agents": sorted(a.id for a in client.agents.list(limit=1000)),
    }


def rows_by_name(summary) -> dict[str, tuple[str, str]]:
    return {name: (outcome, detail) for _, name, outcome, detail in summary.rows}


# ---------------------------------------------------------------- 1. idempotence, dry run

def test_second_provision_changes_nothing_and_dry_run_sends_nothing(stack, client, provisioned):
    settings = stack.settings
    before = server_snapshot(client)
    assert len(provisioned.rows) == 8  # six tools, persona, stream

    again = provision(settings, out=lambda _: None)
    assert again.ok
    assert {outcome for _, _, outcome, _ in again.rows} == {"unchanged"}, again.render()
    assert again.counts["unchanged"] == len(provisioned.rows)
    assert server_snapshot(client) == before, "a second provision changed objects on the server"

    # Drift that a real run would repair: a dry run must report it and still send nothing.
    tool = next(iter(client.tools.list(name="stay_silent", limit=1)))
    stream = shared(client, "stream")
    client.tools.update(tool.id, tags=["drifted-by-test"])
    client.blocks.update(stream.id, description="drifted by the test")
    try:
        drifted = server_snapshot(client)
        done = run_cli(settings, "provision", "--dry-run")
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        out = done.stdout
        assert re.search(r"tool\s+stay_silent\s+would update", out), out
        assert re.search(r"block\s+stream\s+would update", out), out
        assert re.search(r"tool\s+remember_viewer_fact\s+unchanged", out), out
        assert "dry run, nothing sent" in out
        assert server_snapshot(client) == drifted, "--dry-run changed the server"
    finally:
        repaired = provision(settings, out=lambda _: None)
    rows = rows_by_name(repaired)
    assert rows["stay_silent"][0] == "updated" and rows["stream"][0] == "updated", repaired.render()
    assert server_snapshot(client) == before, "the real run did not restore the drifted objects in place"


# ---------------------------------------------------------------- 2. one shared persona / stream

def test_viewers_share_one_read_only_persona_and_stream_and_edits_win(stack, client, two_viewers):
    settings = stack.settings
    persona, stream = shared(client, "persona"), shared(client, "stream")
    seen = [blocks_of(client, v.agent_id) for v in two_viewers]
    for blocks in seen:
        assert blocks["persona"].id == persona.id and blocks["stream"].id == stream.id
        assert blocks["persona"].read_only is True and blocks["stream"].read_only is True
        assert blocks["human"].read_only is not True
    assert seen[0]["human"].id != seen[1]["human"].id, "two viewers share a human block"
    # Exactly one shared block per label on the whole server.
    assert len([b for b in client.blocks.list(label="persona", limit=1000) if "vtl:shared" in (b.tags or [])]) == 1
    assert len([b for b in client.blocks.list(label="stream", limit=1000) if "vtl:shared" in (b.tags or [])]) == 1

    original = persona.value
    rendered = load_blueprint(settings).shared_values["persona"]
    assert original == rendered  # nobody edited it yet
    edited = original + "\nEdited live by the streamer: loves comets."
    try:
        client.blocks.update(persona.id, value=edited)
        for viewer in two_viewers:
            assert blocks_of(client, viewer.agent_id)["persona"].value == edited

        kept = provision(settings, out=lambda _: None)
        outcome, detail = rows_by_name(kept)["persona"]
        assert outcome == "unchanged" and "kept" in detail, kept.render()
        assert client.blocks.retrieve(persona.id).value == edited, "provisioning overwrote a person's edit"

        printed: list[str] = []
        reset = provision(settings, reset_persona=True, out=printed.append)
        assert rows_by_name(reset)["persona"][0] == "updated", reset.render()
        diff = "\n".join(printed)
        assert "-Edited live by the streamer: loves comets." in diff, diff
        assert client.blocks.retrieve(persona.id).value == rendered
        for viewer in two_viewers:
            assert blocks_of(client, viewer.agent_id)["persona"].value == rendered
        assert shared(client, "persona").id == persona.id, "--reset-persona replaced the block instead of updating it"
    finally:
        client.blocks.update(persona.id, value=original)


# ---------------------------------------------------------------- 3. stream set

def test_stream_set_through_the_cli_reaches_every_agent(stack, client, model, two_viewers):
    settings = stack.settings
    stream = shared(client, "stream")
    title = f"Comet night {RUN} 彗星"
    try:
        done = run_cli(settings, "stream", "set", "--title", title)
        assert done.returncode == 0, done.stderr
        assert f"Title: {title}" in done.stdout
        for viewer in two_viewers:
            value = blocks_of(client, viewer.agent_id)["stream"].value
            assert f"Title: {title}" in value, value
            assert "Topic: " in value  # the other fields are kept
        # What the model is shown on the next turn carries the new title.
        letta_client(settings, for_messages=True).with_options(timeout=120).agents.messages.create(
            agent_id=two_viewers[1].agent_id, messages=[{"role": "user", "content": "what are we doing today?"}])
        system = model.requests(1)[0]["messages"][0]["content"]
        assert f"Title: {title}" in system
        assert shared(client, "stream").id == stream.id
    finally:
        client.blocks.update(stream.id, value=stream.value, metadata=stream.metadata or {})


# ---------------------------------------------------------------- 4. concurrent ensure

ENSURE_WORKER = r"""
import json, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from vtuber_letta.settings import load_settings
from provisioning.viewers import ViewerAgents

viewer, start_at, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
settings = load_settings()

def one(_):
    viewers = ViewerAgents(settings)
    viewers.blueprint  # load the template before the start line, not inside the race
    time.sleep(max(0.0, start_at - time.time()))
    agent = viewers.ensure(viewer)
    return [agent.agent_id, agent.created]

with ThreadPoolExecutor(threads) as pool:
    print(json.dumps(list(pool.map(one, range(threads)))))
"""


def test_concurrent_ensure_from_two_processes_creates_one_agent(stack, client, viewers):
    settings = stack.settings
    viewer = f"youtube:racer-{RUN}"
    start_at = time.time() + 6  # both processes are up and warm by then
    procs = [subprocess.Popen([sys.executable, "-c", ENSURE_WORKER, viewer, str(start_at), "10"],
                              env=cli_env(settings), cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.extend(json.loads(out.strip().splitlines()[-1]))
    assert len(results) == 20
    ids = {agent_id for agent_id, _ in results}
    assert len(ids) == 1, f"concurrent ensure returned several agents: {ids}"
    assert sum(created for _, created in results) == 1, results
    on_server = list(client.agents.list(tags=[viewer_tag(viewer)], limit=100))
    assert [a.id for a in on_server] == list(ids), f"{len(on_server)} agents carry the viewer's tag"
    assert viewers.find(viewer).agent_id in ids


# ---------------------------------------------------------------- 5. viewer ids

AWKWARD_IDS = [
    f"bilibili:{RUN}12345",
    f"观众小明🌟{RUN}",
    f"youtube:UC/{RUN}.channel",
    f"a.b-{RUN}",
    f"a/b-{RUN}",  # slugs like the one above: the names must still differ
    f"twitch:Zoë/星星.fan v2 {RUN}",
    (f"{RUN}:é/星." * 30)[:200],
]


def test_awkward_viewer_ids_get_valid_distinct_agents(stack, client, viewers):
    assert len(AWKWARD_IDS[-1]) == 200
    made = {}
    for viewer_id in AWKWARD_IDS:
        agent = viewers.ensure(viewer_id)
        assert agent.created, viewer_id
        assert LETTA_NAME.match(agent.name) and agent.name == agent_name(viewer_id), agent.name
        made[viewer_id] = agent
    assert len({a.name for a in made.values()}) == len(AWKWARD_IDS), "two viewer ids got the same agent name"
    assert len({a.agent_id for a in made.values()}) == len(AWKWARD_IDS)
    for viewer_id, agent in made.items():
        on_server = client.agents.retrieve(agent.agent_id, include=["agent.tags"])
        assert on_server.name == agent.name
        assert on_server.metadata["viewer_id"] == viewer_id  # the raw id, byte for byte
        again = ViewerAgents(stack.settings).ensure(viewer_id, verify=True)
        assert (again.agent_id, again.created) == (agent.agent_id, False)
    # The CLI prints the id as given (no \u escapes) and finds the same agent.
    done = run_cli(stack.settings, "agent", "ensure", AWKWARD_IDS[5])
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown == {"viewer_id": AWKWARD_IDS[5], "agent_id": made[AWKWARD_IDS[5]].agent_id,
                     "name": made[AWKWARD_IDS[5]].name, "created": False}
    assert AWKWARD_IDS[5] in done.stdout


@pytest.mark.parametrize("bad_id, problem", [  # the rule of vtuber_letta/viewer_ids.py, as the bridge words it
    ("", "is empty"),
    ("   ", "is only spaces"),
    ("evil\x01id", "contains a control or format character (U+0001)"),
    ("line\nbreak", "contains a control or format character (U+000A)"),
    ("it:\u202egood", "contains a control or format character (U+202E)"),
    ("x" * 300, "is 300 characters; at most 256 allowed"),
])
def test_invalid_viewer_id_is_a_clear_cli_error(stack, client, provisioned, bad_id, problem):
    agents_before = sorted(a.id for a in client.agents.list(limit=1000))
    done = run_cli(stack.settings, "agent", "ensure", bad_id)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr == f"error: invalid user_id: {problem}\n", done.stderr
    assert sorted(a.id for a in client.agents.list(limit=1000)) == agents_before


# ---------------------------------------------------------------- 6. the Redis map is lost

def test_lost_redis_map_finds_the_same_agent(stack, viewers, rds):
    viewer = f"twitch:mapless-{RUN}"
    first = viewers.ensure(viewer, "Mapless")
    assert first.created
    assert rds.hget(redis_keys.VIEWER_AGENTS, viewer) == first.agent_id
    rds.delete(redis_keys.VIEWER_AGENTS)
    fresh = ViewerAgents(stack.settings)  # nothing cached in the process either
    again = fresh.ensure(viewer, "Mapless")
    assert (again.agent_id, again.created) == (first.agent_id, False)
    assert rds.hget(redis_keys.VIEWER_AGENTS, viewer) == first.agent_id, "the map entry was not rebuilt"


# ---------------------------------------------------------------- 7. export

def test_export_holds_the_human_block_and_the_conversation(stack, client, viewers, tmp_path):
    viewer = f"bilibili:export-{RUN}"
    agent = viewers.ensure(viewer, "导出测试")
    said = f"my telescope is called Halley-{RUN}"
    letta_client(stack.settings, for_messages=True).with_options(timeout=120).agents.messages.create(
        agent_id=agent.agent_id, messages=[{"role": "user", "content": said}])
    human = blocks_of(client, agent.agent_id)["human"].value
    target = tmp_path / "viewer.af"
    done = run_cli(stack.settings, "agent", "export", viewer, "-o", str(target))
    assert done.returncode == 0, done.stderr
    exported = json.loads(target.read_text(encoding="utf-8"))
    humans = [b for b in exported["blocks"] if b.get("label") == "human"]
    assert [b["value"] for b in humans] == [human]
    assert f"viewer_id: {viewer}" in human
    assert said in json.dumps(exported["agents"], ensure_ascii=False)
    assert f"(scripted) I heard: {said}" in json.dumps(exported["agents"], ensure_ascii=False)


# ---------------------------------------------------------------- 8. forget

def test_forget_deletes_agent_human_block_and_map_entry_only(stack, client, viewers, rds, two_viewers):
    viewer = f"twitch:forget-me-{RUN}"
    agent = viewers.ensure(viewer)
    blocks = blocks_of(client, agent.agent_id)
    persona_id, stream_id, human_id = blocks["persona"].id, blocks["stream"].id, blocks["human"].id

    done = run_cli(stack.settings, "agent", "forget", viewer)
    assert done.returncode == 0, done.stderr
    assert "forgot" in done.stdout
    with pytest.raises(NotFoundError):
        client.agents.retrieve(agent.agent_id)
    with pytest.raises(NotFoundError):
        client.blocks.retrieve(human_id)
    assert rds.hget(redis_keys.VIEWER_AGENTS, viewer) is None
    assert not list(client.agents.list(tags=[viewer_tag(viewer)], limit=10))
    # The shared blocks stay, still attached to everyone else.
    assert client.blocks.retrieve(persona_id).id == persona_id
    assert client.blocks.retrieve(stream_id).id == stream_id
    for other in two_viewers:
        others = blocks_of(client, other.agent_id)
        assert (others["persona"].id, others["stream"].id) == (persona_id, stream_id)

    again = run_cli(stack.settings, "agent", "forget", viewer)
    assert again.returncode == 0 and "had no agent" in again.stdout, again.stderr

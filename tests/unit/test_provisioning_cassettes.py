"""Provisioning client code against cassettes recorded from a real Letta 0.16.8 server.

The cassettes (tests/cassettes/provisioning/*.yaml) were recorded by
tests/cassettes/record.py from a dedicated local stack; nothing in them is written by
hand. Here they are replayed with record mode "none": no server is contacted, and a
request the cassette does not hold (other method, path, query or JSON body) fails the
test. After each test every recorded request must have been sent, so the client sends
exactly the recorded requests, no more and no fewer.

The tests build on each other's *server* state while recording (one fresh server, this
module run top to bottom: dry run and provision on the empty server, then the viewer
agents and the stream on the provisioned one). Replayed, each test only needs its own
cassette and runs alone as well as in any order.

Time: a new viewer's human block holds its first_seen timestamp, which is part of the
`agents.create` body; `provisioning.viewers.datetime` is frozen (recording and replay
alike) so that body is the same every run.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import redis

import provisioning.viewers as viewers_module
from agent_templates.template import load_template
from provisioning.blueprint import ProvisioningError, load_blueprint, shared_block_tags
from provisioning.naming import VIEWER_TAG, agent_name, viewer_tag
from provisioning.provision import provision
from provisioning.stream import set_stream
from provisioning.viewers import ViewerAgents
from stack.scripted_model import SCRIPTED_MODEL_ID
from tools import upsert_kwargs
from tools.memory_gate import memory_token
from vtuber_letta import redis_keys
from vtuber_letta.settings import Settings

CASSETTES = Path(__file__).resolve().parents[1] / "cassettes"
CASSETTE_DIR = CASSETTES / "provisioning"
PERSONA_CONFIG = CASSETTES / "persona.yaml"

# The server the cassettes were recorded from (tests/cassettes/record.py starts it). Replay
# matches on these host/port values, so the defaults must stay what the cassettes hold.
RECORDING_URL = os.environ.get("VTL_CASSETTE_LETTA_URL", "http://127.0.0.1:18283")
RECORDING_PASSWORD = os.environ.get("VTL_CASSETTE_LETTA_PASSWORD", "cassette-recording-password")

FROZEN_NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
AWKWARD_VIEWER = "twitch:Zoë/星星.fan v2"  # unicode, ':', '/', '.', a space
LETTA_NAME = re.compile(r"^[\w '\-]+$")  # what Letta 0.16.8 accepts as an agent name
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}

pytestmark = pytest.mark.vcr


@pytest.fixture(scope="module")
def vcr_config(request) -> dict:
    return {
        # pytest-recording's default is "none" too; spelled out so a CI run can never
        # reach for a server. tests/cassettes/record.py passes --record-mode=rewrite.
        "record_mode": request.config.getoption("--record-mode") or "none",
        "filter_headers": ["authorization"],
        "match_on": ["method", "scheme", "host", "port", "path", "query", "body"],
        "decode_compressed_response": True,
    }


@pytest.fixture(scope="module")
def vcr_cassette_dir() -> str:
    return str(CASSETTE_DIR)


@pytest.fixture(autouse=True)
def _frozen_clock(monkeypatch):
    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return FROZEN_NOW if tz is None else FROZEN_NOW.astimezone(tz)

    monkeypatch.setattr(viewers_module, "datetime", FrozenDatetime)


@pytest.fixture(autouse=True)
def _every_recorded_request_sent(vcr):
    """Replaying, the client must send every recorded request (matching already forbids others)."""
    yield
    if vcr is not None and vcr.write_protected:
        unsent = [f"{r.method} {r.path}" for i, r in enumerate(vcr.requests) if not vcr.play_counts[i]]
        assert not unsent, f"recorded requests the client no longer sends: {unsent}"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        _env_file=None,
        letta_api_url=RECORDING_URL,
        letta_api_key=RECORDING_PASSWORD,
        # Fixed, like the password: each agent's memory token (in its secrets) is derived from it.
        memory_gate_secret_value="cassette-recording-gate-secret",
        letta_model=None,
        letta_embedding=None,
        letta_retry_attempts=0,  # a request missing from the cassette fails at once, not after back-off
        letta_timeout=30,
        openai_api_key=None,
        openai_base_url=None,
        ollama_base_url=None,
        template_name="vtuber",
        persona_config=PERSONA_CONFIG,
        data_dir=tmp_path / "data",
    )


@pytest.fixture
def redis_conn(redis_url):
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    yield conn
    conn.close()


def sent(cassette) -> list:
    """The requests the client sent in this test, in order (recording: all; replaying: those played)."""
    if cassette.write_protected:
        return [cassette.requests[i] for i in sorted(cassette.play_counts)]
    return list(cassette.requests)


def calls(requests, method: str, path: str | re.Pattern) -> list:
    def path_ok(p: str) -> bool:
        return bool(path.fullmatch(p)) if isinstance(path, re.Pattern) else p == path

    return [r for r in requests if r.method == method and path_ok(r.path)]


def body(request) -> dict:
    raw = request.body
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


def mutating(requests) -> list[str]:
    return [f"{r.method} {r.path}" for r in requests if r.method in MUTATING]


TEMPLATE = load_template("vtuber")
TOOL_NAMES = TEMPLATE.custom_tools


# ---------------------------------------------------------------- provision
def test_dry_run_on_an_empty_server_reports_would_create_and_sends_nothing(settings, vcr):
    summary = provision(settings, dry_run=True, out=lambda _: None)

    assert summary.ok and summary.dry_run
    assert [(k, n, o) for k, n, o, _ in summary.rows] == (
        [("tool", name, "created") for name in TOOL_NAMES] + [("block", "persona", "created"), ("block", "stream", "created")]
    )
    report = summary.render()
    assert report.count("would create") == len(TOOL_NAMES) + 2
    assert report.splitlines()[-1] == (f"dry run, nothing sent: {len(TOOL_NAMES) + 2} created, 0 updated, 0 unchanged, 0 failed; "
                                       "0 agents to upgrade / 0 already current / 0 failed")

    requests = sent(vcr)
    assert mutating(requests) == []
    assert [r.path for r in requests[:2]] == ["/v1/models/", "/v1/models/embedding"]
    assert sorted(dict(r.query)["name"] for r in calls(requests, "GET", "/v1/tools/")) == sorted(TOOL_NAMES)
    assert sorted(dict(r.query)["label"] for r in calls(requests, "GET", "/v1/blocks/")) == ["persona", "stream"]
    assert [r.path for r in calls(requests, "GET", "/v1/agents/")] == ["/v1/agents/"]  # no agent to upgrade
    assert len(requests) == 2 + len(TOOL_NAMES) + 2 + 1


def test_provision_on_an_empty_server_creates_tools_and_shared_blocks(settings, vcr):
    summary = provision(settings, out=lambda _: None)

    assert summary.ok and not summary.dry_run
    assert summary.counts["created"] == len(TOOL_NAMES) + 2 and summary.counts["unchanged"] == 0
    assert [(k, n, o) for k, n, o, _ in summary.rows] == (
        [("tool", name, "created") for name in TOOL_NAMES] + [("block", "persona", "created"), ("block", "stream", "created")]
    )

    requests = sent(vcr)
    upserts = calls(requests, "PUT", "/v1/tools/")
    assert len(upserts) == len(TOOL_NAMES)
    # What went over the wire is exactly our tools' source, tags and return limit.
    sent_tools = {body(r)["source_code"]: body(r) for r in upserts}
    for name in TOOL_NAMES:
        wanted = upsert_kwargs(name)
        assert wanted["source_code"] in sent_tools, f"upsert of {name} not sent with our source"
        got = sent_tools[wanted["source_code"]]
        assert f"def {name}(" in got["source_code"]
        assert got["tags"] == wanted["tags"] and got["return_char_limit"] == wanted["return_char_limit"]

    creates = calls(requests, "POST", "/v1/blocks/")
    assert len(creates) == 2
    blueprint = load_blueprint(settings)
    by_label = {body(r)["label"]: body(r) for r in creates}
    assert set(by_label) == {"persona", "stream"}
    for label, sent_block in by_label.items():
        assert sent_block["value"] == blueprint.shared_values[label]
        assert sent_block["read_only"] is True
        assert sent_block["tags"] == shared_block_tags("vtuber", label)
    assert "Luna" in by_label["persona"]["value"]
    assert by_label["stream"]["metadata"]["stream"]["title"] == "观星闲聊 | Stargazing & Chill"
    assert sorted(mutating(requests)) == sorted(["PUT /v1/tools/"] * len(TOOL_NAMES) + ["POST /v1/blocks/"] * 2)


def test_second_provision_changes_nothing(settings, vcr):
    summary = provision(settings, out=lambda _: None)

    assert summary.ok
    assert summary.counts["unchanged"] == len(TOOL_NAMES) + 2 and sum(summary.counts.values()) == len(TOOL_NAMES) + 2
    block_details = {n: d for k, n, _, d in summary.rows if k == "block"}
    assert set(block_details) == {"persona", "stream"}
    assert all(d.startswith("block-") for d in block_details.values()), block_details  # the server's ids
    assert mutating(sent(vcr)) == []


def test_wrong_model_handle_lists_the_available_handles(settings, vcr):
    wrong = settings.model_copy(update={"letta_model": "openai-proxy/no-such-model"})

    with pytest.raises(ProvisioningError) as err:
        provision(wrong, out=lambda _: None)

    message = str(err.value)
    assert message.startswith("model handle 'openai-proxy/no-such-model' is not on the server; available: ")
    assert message.endswith(" (set LETTA_MODEL)")
    requests = sent(vcr)
    assert [(r.method, r.path) for r in requests] == [("GET", "/v1/models/")]  # nothing after the check
    served = sorted(m["handle"] for m in json.loads(vcr.responses[0]["body"]["string"]) if m.get("handle"))
    assert f"openai-proxy/{SCRIPTED_MODEL_ID}" in served
    listed = message.split("available: ", 1)[1].removesuffix(" (set LETTA_MODEL)").split(", ")
    assert listed == served


# ---------------------------------------------------------------- viewer agents
def test_ensure_creates_one_agent_for_an_awkward_viewer_id_and_finds_it_again_by_tag(settings, redis_conn, vcr):
    agents = ViewerAgents(settings, redis_conn=redis_conn)
    first = agents.ensure(AWKWARD_VIEWER, display_name="Zoë ✨")

    assert first.created and first.agent_id.startswith("agent-")
    assert LETTA_NAME.match(first.name) and first.name == agent_name(AWKWARD_VIEWER)
    assert redis_conn.hget(redis_keys.VIEWER_AGENTS, AWKWARD_VIEWER) == first.agent_id
    before = sent(vcr)
    creates = calls(before, "POST", "/v1/agents/")
    assert len(creates) == 1
    create = body(creates[0])
    assert create["name"] == first.name
    fingerprint = create["metadata"].pop("template_fingerprint")  # what provision compares later
    assert re.fullmatch(r"[0-9a-f]{32}", fingerprint)
    assert create["metadata"] == {"viewer_id": AWKWARD_VIEWER, "display_name": "Zoë ✨", "platform": "twitch",
                                  "template": "vtuber"}
    assert viewer_tag(AWKWARD_VIEWER) in create["tags"] and VIEWER_TAG in create["tags"]
    assert not any(AWKWARD_VIEWER in tag for tag in create["tags"])  # the raw id is never a tag
    (human,) = create["memory_blocks"]
    assert human["label"] == "human" and AWKWARD_VIEWER in human["value"] and "2025-01-02T03:04:05Z" in human["value"]
    assert len(create["block_ids"]) == 2 and len(create["tool_ids"]) == len(TOOL_NAMES)
    # Then its tool environment: the avatar names and the memory token bound to the new agent's id.
    assert mutating(before) == ["POST /v1/agents/", f"PATCH /v1/agents/{first.agent_id}"]
    secrets = body(calls(before, "PATCH", f"/v1/agents/{first.agent_id}")[0])["secrets"]
    assert secrets["VTL_MEMORY_TOKEN"] == memory_token("cassette-recording-gate-secret", first.agent_id)
    assert secrets["VTL_AVATAR_EXPRESSIONS"] and secrets["VTL_AVATAR_MOTIONS"]
    assert "secrets" not in create  # the create cannot know the id the token is bound to

    # Redis lost the map: a fresh process finds the same agent in Letta by its tag.
    redis_conn.delete(redis_keys.VIEWER_AGENTS)
    again = ViewerAgents(settings, redis_conn=redis_conn).ensure(AWKWARD_VIEWER, display_name="Zoë ✨")
    assert not again.created
    assert (again.agent_id, again.name) == (first.agent_id, first.name)
    assert redis_conn.hget(redis_keys.VIEWER_AGENTS, AWKWARD_VIEWER) == first.agent_id
    after = sent(vcr)[len(before):]
    assert mutating(after) == []
    (lookup,) = calls(after, "GET", "/v1/agents/")
    assert ("tags", viewer_tag(AWKWARD_VIEWER)) in lookup.query

    # What the server keeps: the raw id in metadata, a Letta-valid name, the shared blocks attached.
    shown = agents.show(AWKWARD_VIEWER)
    assert shown["agent_id"] == first.agent_id and LETTA_NAME.match(shown["name"])
    assert shown["metadata"]["viewer_id"] == AWKWARD_VIEWER
    assert set(shown["blocks"]) == {"persona", "human", "stream"}
    assert shown["blocks"]["persona"]["read_only"] and not shown["blocks"]["human"]["read_only"]
    assert shown["tools"] == sorted(set(TOOL_NAMES) | {"conversation_search"})


# ---------------------------------------------------------------- stream
def test_set_stream_updates_the_shared_stream_block(settings, vcr):
    value = set_stream(settings, {"title": "Cassette night ✨", "topic": None})

    assert "Cassette night ✨" in value
    requests = sent(vcr)
    # The SDK pages through the list: the first page holds the block, the next (after=its id) is empty.
    lookup, next_page = calls(requests, "GET", "/v1/blocks/")
    assert dict(lookup.query)["label"] == "stream" and "after" not in dict(lookup.query)
    stream_block = json.loads(vcr.responses[vcr.requests.index(lookup)]["body"]["string"])[0]
    (patch,) = calls(requests, "PATCH", re.compile(r"/v1/blocks/block-[0-9a-f-]+"))
    assert patch.path == f"/v1/blocks/{stream_block['id']}"
    assert dict(next_page.query)["after"] == stream_block["id"]
    sent_update = body(patch)
    assert sent_update["value"] == value
    assert sent_update["metadata"]["stream"]["title"] == "Cassette night ✨"
    # Fields not given keep the values the block was provisioned with.
    assert sent_update["metadata"]["stream"]["topic"] == stream_block["metadata"]["stream"]["topic"]
    assert mutating(requests) == [f"PATCH {patch.path}"]


# ---------------------------------------------------------------- forget
def test_forget_deletes_the_viewer_agent_and_its_own_block(settings, redis_conn, vcr):
    agents = ViewerAgents(settings, redis_conn=redis_conn)  # Redis is empty: found in Letta by tag

    report = agents.forget(AWKWARD_VIEWER)
    assert (report.removed["agents"], report.removed["blocks"]) == (1, 1), report.render()

    requests = sent(vcr)
    deleted = [r.path for r in requests if r.method == "DELETE"]
    assert len(deleted) == 2 and deleted[0].startswith("/v1/agents/agent-") and deleted[1].startswith("/v1/blocks/block-")
    assert mutating(requests) == [f"DELETE {p}" for p in deleted]
    assert redis_conn.hget(redis_keys.VIEWER_AGENTS, AWKWARD_VIEWER) is None
    # and it is gone from Letta: looking again finds nothing
    assert agents.find(AWKWARD_VIEWER) is None

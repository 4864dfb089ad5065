"""Our tools inside real Letta turns: the scripted model calls them, Letta runs them in its sandbox.

Each test scripts the model (stack/scripted_model.py) to call one tool, sends a viewer
message through Letta 0.16.8 and checks what Letta ran, what it returned, what it wrote to
memory and what the model was shown next. A custom-tool call costs ~5 s here (sandbox
subprocess), so the viewers' agents are shared by the module.
"""

from __future__ import annotations

import json
import uuid

import pytest

from provisioning.blueprint import find_shared_block, load_blueprint
from provisioning.provision import provision
from provisioning.viewers import ViewerAgents
from tests.integration.scripted import ScriptedModel, request_text
from tools.human_block import add_fact, parse_facts, parse_fields
from vtuber_letta.letta_api import letta_client

# Every test starts with no rule on the scripted model (conftest.fresh_rules).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fresh_rules")]

RUN = uuid.uuid4().hex[:6]
TURN_TIMEOUT_S = 180
OUR_TOOLS = {"conversation_search", "remember_viewer_fact", "forget_viewer_fact", "recall_viewer_facts",
             "set_expression", "play_motion", "stay_silent"}
LETTA_MEMORY_EDITORS = {"memory_insert", "memory_replace", "memory_rethink", "memory", "core_memory_append",
                        "core_memory_replace"}


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def settings(stack):
    return stack.settings


@pytest.fixture(scope="module")
def client(settings):
    return letta_client(settings)


@pytest.fixture(scope="module")
def provisioned(settings):
    summary = provision(settings, out=lambda _: None)
    assert summary.ok, summary.render()
    return summary


@pytest.fixture(scope="module")
def viewers(settings, provisioned):
    return ViewerAgents(settings)


@pytest.fixture(scope="module")
def model(scripted):
    return scripted


@pytest.fixture(scope="module")
def viewer_a(viewers):
    return viewers.ensure(f"twitch:aiko-{RUN}", "Aiko fan", "twitch")


@pytest.fixture(scope="module")
def viewer_b(viewers):
    return viewers.ensure(f"bilibili:bee-{RUN}", "Bee", "bilibili")


@pytest.fixture(scope="module")
def persona(settings):
    return load_blueprint(settings).config.persona


class Turns:
    """Sends viewer turns and keeps what the model was sent during each one."""

    def __init__(self, settings, model: ScriptedModel):
        # A turn with several sandboxed tool calls takes 15 s here, far more when the machine is busy.
        self.client = letta_client(settings, for_messages=True).with_options(timeout=TURN_TIMEOUT_S)
        self.model = model
        self.all_requests: list[dict] = []  # every request of every turn of the module

    def send(self, agent_id: str, text: str, **extra):
        before = max((r["seq"] for r in self.model.requests(1)), default=0)
        response = self.client.agents.messages.create(agent_id=agent_id, messages=[{"role": "user", "content": text}],
                                                      **extra)
        requests = [r for r in self.model.requests() if r["seq"] > before]
        self.all_requests.extend(requests)
        return response, requests


@pytest.fixture(scope="module")
def turns(settings, model):
    return Turns(settings, model)


def tool_returns(response) -> list[tuple[str, str, str]]:
    return [(m.name, m.status, m.tool_return) for m in response.messages if m.message_type == "tool_return_message"]


def tool_calls(response) -> list[tuple[str, dict]]:
    return [(m.tool_call.name, json.loads(m.tool_call.arguments)) for m in response.messages
            if m.message_type == "tool_call_message"]


def said(response) -> list[str]:
    texts = []
    for m in response.messages:
        if m.message_type == "assistant_message":
            texts.append(m.content if isinstance(m.content, str) else "".join(p.text for p in m.content))
    return texts


def blocks_of(client, agent_id: str) -> dict[str, tuple[str, str]]:
    agent = client.agents.retrieve(agent_id, include=["agent.blocks"])
    return {b.label: (b.id, b.value) for b in agent.blocks or []}


def human_of(client, agent_id: str) -> str:
    return blocks_of(client, agent_id)["human"][1]


def system_of(request: dict) -> str:
    return "\n".join(m["content"] for m in request["messages"] if m.get("role") in ("system", "developer")
                     and isinstance(m.get("content"), str))


def call(tool: str, **arguments) -> dict:
    return {"call_tool": tool, "arguments": arguments}


# ---------------------------------------------------------------- 9. remember_viewer_fact

def test_remember_viewer_fact_writes_only_this_viewers_memory(client, model, turns, viewer_a, viewer_b):
    human_a_before, human_b_before = human_of(client, viewer_a.agent_id), human_of(client, viewer_b.agent_id)
    model.add_rules({"name": "remember-name", "when": {"user_regex": r"my name is (?P<n>\w+)"},
                     "then": call("remember_viewer_fact", fact="name: {n}", category="name")})

    response, requests = turns.send(viewer_a.agent_id, "Hi Luna! my name is Aiko")
    assert tool_calls(response) == [("remember_viewer_fact", {"fact": "name: Aiko", "category": "name"})]
    assert tool_returns(response) == [("remember_viewer_fact", "success", "Remembered (name): name: Aiko")]
    assert [r["rule"] for r in requests] == ["remember-name", "(default)"]

    human_a = human_of(client, viewer_a.agent_id)
    assert parse_facts(human_a) == {"name": ["name: Aiko"]}
    # Only the facts section changed: the viewer and verified sections are byte for byte the old ones.
    for section in ("viewer", "verified"):
        assert parse_fields(human_a, section) == parse_fields(human_a_before, section)
    assert f"viewer_id: {viewer_a.viewer_id}" in human_a
    assert human_of(client, viewer_b.agent_id) == human_b_before

    # B's next turn: nothing of A reaches the model, and the prompt is B's own.
    response, requests = turns.send(viewer_b.agent_id, "hello, do you know me?")
    assert said(response) == ["(scripted) I heard: hello, do you know me?"]
    assert requests
    for request in requests:
        assert "Aiko" not in request_text(request)
        assert f"viewer_id: {viewer_b.viewer_id}" in system_of(request)
        assert viewer_a.viewer_id not in request_text(request)

    # A asks later: the model finds the fact in the human block it is shown.
    model.add_rules({"name": "recall-name", "when": {"user_contains": "what is my name"},
                     "then": {"reply_from_block": "human", "line_regex": r"- name: (?P<n>\w+)",
                              "template": "You are {n}!"}})
    response, _ = turns.send(viewer_a.agent_id, "Luna, what is my name?")
    assert said(response) == ["You are Aiko!"]
    response, _ = turns.send(viewer_b.agent_id, "Luna, what is my name?")
    assert said(response) == [r"(scripted model) no line matching - name: (?P<n>\w+) in block human"]


# ---------------------------------------------------------------- 10. forget_viewer_fact

def test_forget_viewer_fact_removes_the_fact(client, model, turns, viewer_a):
    block_id, before = blocks_of(client, viewer_a.agent_id)["human"]
    seeded, _ = add_fact(before, "has a cat named Mochi", "pets", 4000)
    client.blocks.update(block_id, value=seeded)  # as if remembered in an earlier stream
    assert "Mochi" in human_of(client, viewer_a.agent_id)

    model.add_rules({"name": "forget-cat", "when": {"user_contains": "forget my cat"},
                     "then": call("forget_viewer_fact", fact="Mochi")})
    response, _ = turns.send(viewer_a.agent_id, "please forget my cat, she ran away")
    assert tool_returns(response) == [("forget_viewer_fact", "success", "Forgot (pets): has a cat named Mochi")]
    after = human_of(client, viewer_a.agent_id)
    assert "Mochi" not in after
    assert after == before, "forgetting the fact changed more than that fact"


# ---------------------------------------------------------------- 11. avatar tools

@pytest.fixture(scope="module")
def avatar_turns(client, model, turns, viewer_b):
    """Two turns of viewer B: valid names, then unknown ones (set_expression, then play_motion, each)."""
    model.reset()
    before = blocks_of(client, viewer_b.agent_id)
    model.add_rules(
        {"name": "happy", "times": 1, "when": {"user_contains": "show happy"},
         "then": call("set_expression", expression="happy", intensity=0.5)},
        {"name": "wave", "times": 1, "when": {"after_tool": "set_expression"}, "then": call("play_motion", motion="wave")},
    )
    valid = turns.send(viewer_b.agent_id, "show happy and wave!")
    model.add_rules(
        {"name": "grumpy", "times": 1, "when": {"user_contains": "show grumpy"},
         "then": call("set_expression", expression="grumpy", intensity=0.9)},
        {"name": "moonwalk", "times": 1, "when": {"after_tool": "set_expression"},
         "then": call("play_motion", motion="moonwalk")},
    )
    unknown = turns.send(viewer_b.agent_id, "show grumpy and moonwalk!")
    model.reset()
    return {"valid": valid, "unknown": unknown, "before": before, "after": blocks_of(client, viewer_b.agent_id)}


def test_avatar_tools_accept_valid_names_and_list_them_for_unknown_ones(avatar_turns, persona):
    response, _ = avatar_turns["valid"]
    assert tool_returns(response) == [("set_expression", "success", "Expression set: happy (0.50)"),
                                      ("play_motion", "success", "Motion played: wave")]

    response, _ = avatar_turns["unknown"]
    (expr_name, expr_status, expr_text), (motion_name, motion_status, motion_text) = tool_returns(response)
    assert (expr_name, motion_name) == ("set_expression", "play_motion")
    assert expr_text == f"Error: unknown expression 'grumpy'. Valid: {', '.join(persona.expressions)}"
    assert motion_text == f"Error: unknown motion 'moonwalk'. Valid: {', '.join(persona.motions)}"
    assert said(response), "the turn should go on after a tool error"
    # Neither tool touches memory.
    assert avatar_turns["after"] == avatar_turns["before"]


# ---------------------------------------------------------------- 12. stay_silent

def test_stay_silent_ends_the_turn_without_a_reply(model, turns, viewer_b):
    model.add_rules({"name": "spam", "when": {"user_contains": "cheap followers"},
                     "then": call("stay_silent", reason="spam")})
    # As the bridge sends it: one model step per request, and the bridge never asks for another
    # after stay_silent (bridge/letta_turns.py; the agents have no Letta tool rules).
    response, requests = turns.send(viewer_b.agent_id, "BUY CHEAP FOLLOWERS at spam.example", max_steps=1)
    assert tool_returns(response) == [("stay_silent", "success", "Staying silent: spam")]
    assert said(response) == []
    assert [m.message_type for m in response.messages][-1] == "tool_return_message"
    assert response.stop_reason.stop_reason == "max_steps"
    assert len(requests) == 1, "the model was asked again after stay_silent"


# ---------------------------------------------------------------- 13. persona / stream protection

def test_viewer_agents_are_never_offered_letta_memory_editors(client, turns, viewer_a):
    turns.send(viewer_a.agent_id, "just saying hi")  # at least one request even when run alone
    assert turns.all_requests
    for request in turns.all_requests:
        offered = set(request["tools"])
        assert not offered & LETTA_MEMORY_EDITORS, f"offered {sorted(offered & LETTA_MEMORY_EDITORS)}"
        assert offered <= OUR_TOOLS, sorted(offered - OUR_TOOLS)
    first_requests = [r for r in turns.all_requests if r["messages"][-1].get("role") == "user"]
    assert all(set(r["tools"]) == OUR_TOOLS for r in first_requests)
    agent = client.agents.retrieve(viewer_a.agent_id, include=["agent.tools"])
    assert {t.name for t in agent.tools} == OUR_TOOLS


def test_read_only_persona_and_stream_refuse_letta_memory_tools(settings, client, model, provisioned):
    persona = find_shared_block(client, "vtuber", "persona")
    stream = find_shared_block(client, "vtuber", "stream")
    agent = client.agents.create(
        name=f"base-tools-probe-{RUN}", agent_type="letta_v1_agent", include_base_tools=True,
        model=settings.resolved_model_handle(), embedding=settings.resolved_embedding_handle(),
        block_ids=[persona.id, stream.id], memory_blocks=[{"label": "human", "value": "a probe viewer"}],
    )
    try:
        offered = {t.name for t in client.agents.retrieve(agent.id, include=["agent.tools"]).tools}
        assert {"memory_insert", "memory_replace"} <= offered, offered  # the attack surface really exists here
        attacks = {
            "replace persona": call("memory_replace", label="persona", old_string=persona.value.splitlines()[0],
                                    new_string="Name: Evil Luna"),
            "insert persona": call("memory_insert", label="persona", new_string="I obey chat.", insert_line=0),
            "replace stream": call("memory_replace", label="stream", old_string=stream.value.splitlines()[0],
                                   new_string="Title: hacked"),
            "insert stream": call("memory_insert", label="stream", new_string="hacked", insert_line=0),
        }
        model.add_rules(*({"name": text, "when": {"user_contains": text}, "then": then} for text, then in attacks.items()))
        messages = letta_client(settings, for_messages=True).with_options(timeout=TURN_TIMEOUT_S).agents.messages
        for text, then in attacks.items():
            response = messages.create(agent_id=agent.id, messages=[{"role": "user", "content": f"please {text}"}])
            assert tool_calls(response) == [(then["call_tool"], then["arguments"])], text
            [(name, status, result)] = tool_returns(response)
            assert (name, status) == (then["call_tool"], "error"), (text, status, result)
            assert "read-only" in result, result
        assert client.blocks.retrieve(persona.id).value == persona.value
        assert client.blocks.retrieve(stream.id).value == stream.value
    finally:
        client.agents.delete(agent.id)
    # Deleting the probe leaves the shared blocks in place.
    assert client.blocks.retrieve(persona.id).value == persona.value
    assert client.blocks.retrieve(stream.id).value == stream.value


# ---------------------------------------------------------------- several memory tools in one turn

@pytest.fixture(scope="module")
def moving_turn(client, model, turns, viewers):
    """One turn with three memory-tool calls: remember a dog, forget the old city, remember the new one.

    This is what the system prompt asks for ("when a stored fact turns out wrong or outdated, then
    store the new one") and stays within the template's per-turn limits (remember 4, forget 3).
    """
    model.reset()
    viewer = viewers.ensure(f"youtube:mover-{RUN}", "Mover")
    block_id, value = blocks_of(client, viewer.agent_id)["human"]
    client.blocks.update(block_id, value=add_fact(value, "lives in Tokyo", "about", 4000)[0])
    model.add_rules(
        {"name": "dog", "times": 1, "when": {"user_contains": "moved"},
         "then": call("remember_viewer_fact", fact="has a dog named Rex", category="pets")},
        {"name": "forget-city", "times": 1, "when": {"after_tool": "remember_viewer_fact"},
         "then": call("forget_viewer_fact", fact="Tokyo")},
        {"name": "new-city", "times": 1, "when": {"after_tool": "forget_viewer_fact"},
         "then": call("remember_viewer_fact", fact="lives in Osaka", category="about")},
    )
    response, requests = turns.send(viewer.agent_id, "big news: I got a dog named Rex and I moved from Tokyo to Osaka!")
    model.reset()
    return {"response": response, "requests": requests, "human": human_of(client, viewer.agent_id)}


def test_every_memory_tool_call_of_a_turn_persists(moving_turn):
    assert tool_returns(moving_turn["response"]) == [
        ("remember_viewer_fact", "success", "Remembered (pets): has a dog named Rex"),
        ("forget_viewer_fact", "success", "Forgot (about): lives in Tokyo"),
        ("remember_viewer_fact", "success", "Remembered (about): lives in Osaka"),
    ]
    # Each call reported success, so the block must hold all three changes.
    assert parse_facts(moving_turn["human"]) == {"pets": ["has a dog named Rex"], "about": ["lives in Osaka"]}, (
        "a later memory-tool call of the same turn overwrote an earlier one's change:\n" + moving_turn["human"])


# ---------------------------------------------------------------- tool rules of the template

def test_agents_have_no_tool_rules_and_may_call_several_tools_at_once(client, viewer_a):
    """Any Letta tool rule (but requires_approval) turns parallel tool calls off; the bridge runs the loop."""
    agent = client.agents.retrieve(viewer_a.agent_id)
    assert not agent.tool_rules
    assert agent.llm_config.parallel_tool_calls is True

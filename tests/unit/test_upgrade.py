"""Template upgrades without a server: what differs, what is sent, busy viewers, progress, the summary.

The Letta side is a small in-memory stand-in (agents.list / retrieve / update / recompile); the real
server's behaviour is covered by tests/integration/test_upgrade_and_forget.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from agent_templates.persona import load_persona_config
from agent_templates.template import load_template
from provisioning.blueprint import Blueprint
from provisioning.summary import Summary
from provisioning.upgrade import FINGERPRINT_KEY, TemplateUpgrade, UpgradeReport, plan_changes, template_state
from stack.private import REPO_ROOT
from vtuber_letta import redis_keys as keys
from vtuber_letta.viewer_lock import ViewerHold


@pytest.fixture(scope="module")
def blueprint() -> Blueprint:
    template = load_template("vtuber")
    config = load_persona_config(REPO_ROOT / "data" / "config" / "persona.sample.yaml")
    return Blueprint(template=template, config=config, shared_values={}, model="openai-proxy/m",
                     embedding="openai/e")


@pytest.fixture(scope="module")
def state(blueprint):
    return template_state(blueprint, {"persona": "block-p", "stream": "block-s"}, "unit-gate-secret")


def current_agent(state, agent_id="agent-1", viewer="twitch:a", **changes) -> SimpleNamespace:
    """An agent exactly as the template makes it; `changes` override fields (an older template)."""
    agent = SimpleNamespace(
        id=agent_id, agent_type="letta_v1_agent", system=state.system,
        tools=[SimpleNamespace(name=n, id=f"tool-{n}") for n in state.tools],
        tool_rules=[dict(rule, prompt_template=None) for rule in state.rules],
        blocks=[SimpleNamespace(label="human", id=f"block-h-{agent_id}"),
                SimpleNamespace(label="persona", id="block-p"), SimpleNamespace(label="stream", id="block-s")],
        secrets=[SimpleNamespace(key=k, value=v) for k, v in state.secrets_for(agent_id).items()],
        llm_config=SimpleNamespace(handle=state.model, context_window=state.context_window_limit,
                                   parallel_tool_calls=state.parallel_tool_calls),
        embedding_config=SimpleNamespace(handle=state.embedding),
        tags=state.tags_for(viewer),
        metadata={"viewer_id": viewer, "template": state.template},
    )
    for name, value in changes.items():
        setattr(agent, name, value)
    return agent


def test_an_agent_of_the_current_template_needs_nothing(state):
    assert plan_changes(current_agent(state), state).empty


def test_an_agent_without_its_memory_token_or_parallel_calls_gets_both(state):
    from tools.memory_gate import memory_token

    old = current_agent(state, secrets=[SimpleNamespace(key=k, value=v) for k, v in state.secrets],
                        llm_config=SimpleNamespace(handle=state.model, context_window=state.context_window_limit,
                                                   parallel_tool_calls=False))
    plan = plan_changes(old, state)
    assert plan.update["parallel_tool_calls"] is True
    assert plan.update["secrets"]["VTL_MEMORY_TOKEN"] == memory_token("unit-gate-secret", "agent-1")
    assert "secrets VTL_MEMORY_TOKEN" in plan.changed


def test_an_older_agent_gets_exactly_what_differs_and_keeps_its_own_blocks_and_secrets(state):
    agent = current_agent(
        state, system="old prompt",
        tools=[SimpleNamespace(name=n, id=f"tool-{n}") for n in state.tools if n != "play_motion"]
              + [SimpleNamespace(name="old_tool", id="tool-old")],
        tool_rules=[{"tool_name": "stay_silent", "type": "exit_loop"}],
        blocks=[SimpleNamespace(label="human", id="block-h"), SimpleNamespace(label="notes", id="block-n"),
                SimpleNamespace(label="persona", id="block-old-persona")],
        secrets=[SimpleNamespace(key="MINE", value="1")],
        tags=["vtuber-letta", "vtl:viewer", "someones-tag"],
    )
    plan = plan_changes(agent, state)
    assert plan.update["system"] == state.system
    assert plan.update["tool_names"] == list(state.tools)
    assert plan.update["tool_rules"] == state.rules
    assert plan.update["block_ids"] == ["block-h", "block-n", "block-p", "block-s"]  # human and notes kept
    assert plan.update["secrets"] == {"MINE": "1", **state.secrets_for("agent-1")}  # an update replaces the set
    assert "someones-tag" in plan.update["tags"] and set(state.tags_for("twitch:a")) <= set(plan.update["tags"])
    assert "model" not in plan.update and "embedding" not in plan.update
    assert "tools +play_motion -old_tool" in plan.changed


def test_a_changed_model_or_context_window_is_planned(state):
    agent = current_agent(state, llm_config=SimpleNamespace(handle="openai-proxy/old", context_window=8000))
    plan = plan_changes(agent, state)
    assert plan.update["model"] == state.model and plan.update["context_window_limit"] == state.context_window_limit


def test_another_agent_type_cannot_be_upgraded(state):
    assert "re-create" in plan_changes(current_agent(state, agent_type="memgpt_agent"), state).problem


def test_the_fingerprint_changes_with_the_template(state):
    assert replace(state, system=state.system + "!").fingerprint != state.fingerprint
    assert replace(state, tools=state.tools[1:]).fingerprint != state.fingerprint
    assert replace(state, shared_blocks=(("persona", "other"), ("stream", "block-s"))).fingerprint != state.fingerprint
    assert replace(state).fingerprint == state.fingerprint


@dataclass
class FakeAgents:
    agents: dict[str, Any]
    calls: list[tuple] = field(default_factory=list)
    pages: int = 0

    def list(self, **kwargs):
        self.calls.append(("list", kwargs["limit"]))
        return iter(list(self.agents.values()))

    def retrieve(self, agent_id, include=None):
        self.calls.append(("retrieve", agent_id))
        return self.agents[agent_id]

    def update(self, agent_id, **kwargs):
        self.calls.append(("update", agent_id, tuple(sorted(kwargs))))
        agent = self.agents[agent_id]
        for name, value in kwargs.items():
            if name == "tool_ids":
                agent.tools = [SimpleNamespace(name=t.removeprefix("tool-"), id=t) for t in value]
            elif name != "context_window_limit":
                setattr(agent, name, value)

    def recompile(self, agent_id):
        self.calls.append(("recompile", agent_id))
        return ""


def fake_client(agents):
    tools = SimpleNamespace(list=lambda names: [SimpleNamespace(name=n, id=f"tool-{n}") for n in names])
    return SimpleNamespace(agents=FakeAgents({a.id: a for a in agents}), tools=tools)


def test_upgrade_changes_only_stale_agents_then_recompiles_then_records_the_fingerprint(blueprint, state):
    current = current_agent(state, "agent-cur", "twitch:cur")
    current.metadata[FINGERPRINT_KEY] = state.fingerprint
    unmarked = current_agent(state, "agent-unmarked", "twitch:unmarked")  # right fields, no fingerprint
    old = current_agent(state, "agent-old", "twitch:old", system="old")
    client = fake_client([current, unmarked, old])
    report = TemplateUpgrade(client, blueprint, state).run()
    assert report.counts == Counter(upgraded=1, current=2)
    calls = [c for c in client.agents.calls if c[0] != "list"]
    assert ("retrieve", "agent-cur") not in calls  # the fingerprint matched: nothing read
    assert calls[-4:] == [("retrieve", "agent-old"), ("update", "agent-old", ("system",)),
                          ("recompile", "agent-old"), ("update", "agent-old", ("metadata",))]
    assert ("update", "agent-unmarked", ("metadata",)) in calls and ("recompile", "agent-unmarked") not in calls
    assert old.system == state.system and old.metadata[FINGERPRINT_KEY] == state.fingerprint

    again = TemplateUpgrade(fake_client([current, unmarked, old]), blueprint, state).run()
    assert again.counts == Counter(current=3)


def test_dry_run_sends_nothing_and_lists_the_plan(blueprint, state):
    old = current_agent(state, "agent-old", "twitch:old", system="old")
    client = fake_client([old])
    report = TemplateUpgrade(client, blueprint, state, dry_run=True).run()
    assert report.counts == Counter(upgraded=1)
    assert report.planned == [("twitch:old", ["system"])]
    assert all(c[0] in ("list", "retrieve") for c in client.agents.calls)
    summary = Summary(dry_run=True, agents=report)
    text = summary.render()
    assert "twitch:old" in text and "would upgrade" in text and "1 agents to upgrade / 0 already current" in text


def test_a_busy_viewer_is_retried_and_one_busy_for_too_long_fails(blueprint, state, redis_url):
    r = redis.Redis.from_url(redis_url)
    hold = ViewerHold(r, ttl_ms=5000)
    agents = [current_agent(state, "agent-busy", "twitch:busy", system="old"),
              current_agent(state, "agent-free", "twitch:free", system="old")]
    r.set(keys.viewer_active("twitch:busy"), "worker", px=300)  # a turn in flight for 0.3 s
    report = TemplateUpgrade(fake_client(agents), blueprint, state, hold=hold, busy_wait=10).run()
    assert report.counts == Counter(upgraded=2)
    assert r.exists(keys.viewer_active("twitch:busy"), keys.viewer_active("twitch:free")) == 0

    stuck = current_agent(state, "agent-stuck", "twitch:stuck", system="old")
    r.set(keys.viewer_active("twitch:stuck"), "worker", px=60_000)
    report = TemplateUpgrade(fake_client([stuck]), blueprint, state, hold=hold, busy_wait=0.3).run()
    assert report.counts == Counter(failed=1)
    assert "run provision again" in report.failures[0][1]
    assert stuck.system == "old"
    assert not Summary(agents=report).ok


def test_a_viewer_with_queued_work_goes_back_to_the_bridge_after_the_upgrade(blueprint, state, redis_url):
    r = redis.Redis.from_url(redis_url)
    r.rpush(keys.viewer_queue("twitch:q"), b'{"task_id": "t"}')  # routed while the upgrade held it
    old = current_agent(state, "agent-q", "twitch:q", system="old")
    TemplateUpgrade(fake_client([old]), blueprint, state, hold=ViewerHold(r, ttl_ms=5000)).run()
    assert r.lrange(keys.BRIDGE_READY, 0, -1) == [b"twitch:q"]


def test_progress_every_hundred_agents(blueprint, state):
    agents = [current_agent(state, f"agent-{i}", f"twitch:{i}") for i in range(250)]
    for agent in agents:
        agent.metadata[FINGERPRINT_KEY] = state.fingerprint
    lines: list[str] = []
    report = TemplateUpgrade(fake_client(agents), blueprint, state, progress=lines.append).run()
    assert report.counts == Counter(current=250)
    assert [line.split(",")[0] for line in lines] == ["agents: 100 checked", "agents: 200 checked", "agents: 250 checked"]


def test_summary_counts_agents_and_fails_on_agent_failures():
    report = UpgradeReport(counts=Counter(upgraded=3, current=5, failed=1), failures=[("twitch:x", "HTTP 500: boom")])
    summary = Summary(agents=report)
    text = summary.render()
    assert "3 agents upgraded / 5 already current / 1 failed" in text
    assert "twitch:x" in text and "HTTP 500: boom" in text
    assert not summary.ok

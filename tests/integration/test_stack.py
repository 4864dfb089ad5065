"""Issue: foundation. A real stack: an agent answers through the scripted model, its
history survives a Letta restart, a second `up` changes nothing, everything is on
loopback, and `down` leaves no process behind."""

from __future__ import annotations

import pytest

from stack.processes import process_tree
from vtuber_letta.letta_api import letta_client

pytestmark = pytest.mark.integration


def _reply_text(response) -> str:
    parts = []
    for message in response.messages:
        if message.message_type == "assistant_message":
            content = message.content
            parts.append(content if isinstance(content, str) else "".join(p.text for p in content))
    return "".join(parts)


@pytest.fixture(scope="module")
def client(stack):
    return letta_client(stack.settings)


def test_every_part_is_healthy_and_listens_on_loopback_only(stack):
    statuses = {s.name: s for s in stack.status()}
    assert set(statuses) == {"redis", "postgres", "model", "letta", "gate", "console"}
    for status in statuses.values():
        assert status.state == "healthy", status
        assert status.listens, f"{status.name} listens nowhere?"
        for address in status.listens:
            assert address.startswith("127.0.0.1:"), f"{status.name} listens on {address}"


def test_letta_requires_the_password(stack):
    from letta_client import AuthenticationError, Letta

    anonymous = Letta(base_url=stack.settings.letta_api_url, api_key="wrong-password", max_retries=0)
    with pytest.raises(AuthenticationError):
        anonymous.agents.list()


def test_second_up_changes_nothing(stack):
    before = {s.name: s.pid for s in stack.status()}
    stack.up()
    after = {s.name: s.pid for s in stack.status()}
    assert before == after and all(before.values())


def test_agent_answers_with_the_scripted_reply_and_history_survives_restart(stack, client):
    agent = client.agents.create(
        name="foundation-check",
        model=stack.settings.resolved_model_handle(),
        embedding=stack.settings.resolved_embedding_handle(),
        memory_blocks=[{"label": "persona", "value": "I am a test VTuber."},
                       {"label": "human", "value": "A test viewer."}],
    )
    sent = "hello from the foundation test 7f3a"
    response = letta_client(stack.settings, for_messages=True).agents.messages.create(
        agent_id=agent.id, messages=[{"role": "user", "content": sent}]
    )
    assert _reply_text(response) == f"(scripted) I heard: {sent}"

    stack.restart_letta()

    history = letta_client(stack.settings).agents.messages.list(agent_id=agent.id, limit=50)
    texts = []
    for message in history:
        content = getattr(message, "content", None)
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.append("".join(getattr(p, "text", "") for p in content))
    assert any(sent in t for t in texts), texts
    assert f"(scripted) I heard: {sent}" in texts


@pytest.mark.stack_teardown
def test_down_stops_every_process_of_the_stack(stack):
    pids = [s.pid for s in stack.status() if s.pid]
    trees = {member for pid in pids for member in process_tree(pid)}
    stopped = stack.down()
    assert set(stopped) == {"console", "memory-gate", "letta", "scripted-model", "postgres", "redis"}
    alive = [pid for pid in trees if _alive(pid)]
    assert not alive, f"still running after down: {alive}"
    assert all(s.state == "down" for s in stack.status())
    assert stack.down() == []  # a second down has nothing to stop


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

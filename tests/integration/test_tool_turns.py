"""Real turns — the ones that change her face, play a gesture or write a memory — on the real stack.

Through the bridge's own Letta client (bridge/letta_turns.py: one model step per request, another
only after a step that called tools without speaking), with the scripted model answering in the
shapes real models use: text and tool calls in one response, a tool call first and the text after,
several calls at once, a memory write beside an expression. Model calls are counted where they
happen, at the model endpoint. Also: what a tool process can see (no letta, no secrets), and that
a persona edit made while a memory tool runs survives the turn.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest

from bridge.gateway import TurnMessage
from bridge.letta_turns import LettaTurns
from provisioning.blueprint import find_shared_block, load_blueprint
from provisioning.viewers import ViewerAgents
from tests.integration.bridge_helpers import ChannelRecorder, push, redis_conn, wait_for
from tools.human_block import parse_facts
from vtuber_letta import redis_keys as keys
from vtuber_letta.commands.say import build_task

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fresh_rules")]

RUN = uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def viewers(stack_settings, provisioned):
    return ViewerAgents(stack_settings)


@pytest.fixture(scope="module")
def turns(stack_settings, provisioned):
    return stack_settings  # each send builds its client in its own event loop (see send)


@pytest.fixture
def agent(viewers):
    return viewers.ensure(f"twitch:shape-{RUN}-{uuid.uuid4().hex[:6]}", "Shape", "twitch").agent_id


def send(turns, agent_id, text, streamed=True):
    pieces: list[str] = []

    async def on_text(piece):
        pieces.append(piece)

    async def go():
        letta = LettaTurns.from_settings(turns)  # an async client belongs to the loop it was made in
        try:
            return await letta.send_turn(agent_id, [TurnMessage(f"task-{uuid.uuid4().hex}", text)], sender_name="Shape",
                                         on_text=on_text if streamed else None)
        finally:  # its sockets, left to the garbage collector, would warn in whichever test runs then
            await letta.aclose()

    result = asyncio.run(go())
    if streamed:
        assert "".join(pieces).strip() == result.reply_text
    return result


def human_of(client, agent_id):
    return client.agents.blocks.retrieve("human", agent_id=agent_id).value


def expression(name="happy"):
    return ("set_expression", {"expression": name})


# ---------------------------------------------------------------- response shapes real models use

@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "plain"])
@pytest.mark.parametrize("position", ["before", "after"])
def test_text_and_an_avatar_cue_in_one_response_take_one_model_call(scripted, turns, agent, streamed, position):
    scripted.reply_with_tools("both", "So happy to see you!", expression(), text_position=position)
    result = send(turns, agent, "hello", streamed)
    assert scripted.chat_requests() == 1
    assert result.reply_text == "So happy to see you!" and not result.silent
    assert [(c.tool, c.args) for c in result.avatar_calls] == [("set_expression", {"expression": "happy"})]


@pytest.mark.parametrize("position", ["before", "after"])
def test_the_words_are_complete_before_letta_runs_the_tools_when_the_model_writes_them_first(
        scripted, turns, agent, position):
    scripted.reply_with_tools("words-first", "Welcome back! I remember you.", expression(),
                              ("remember_viewer_fact", {"fact": "drinks oolong tea", "category": "likes"}),
                              text_position=position)
    events: list = []  # text pieces, and WORDS_DONE where it was called

    async def on_text(piece):
        events.append(piece)

    async def on_words_done():
        events.append(WORDS_DONE)

    async def go():
        letta = LettaTurns.from_settings(turns)
        try:
            return await letta.send_turn(agent, [TurnMessage(f"task-{uuid.uuid4().hex}", "hi again")],
                                         sender_name="Shape", on_text=on_text, on_words_done=on_words_done)
        finally:
            await letta.aclose()

    result = asyncio.run(go())
    assert result.reply_text == "Welcome back! I remember you." and result.memory_updated
    if position == "before":  # Letta streams the words, then the calls: speech can go before the tools run
        assert events.count(WORDS_DONE) == 1 and events[-1] == WORDS_DONE
        assert "".join(events[:-1]).strip() == result.reply_text
    else:  # calls first: the words end with the step, nothing to hand off early
        assert WORDS_DONE not in events


WORDS_DONE = object()


def test_the_face_changes_before_the_turn_ends_once_and_never_for_a_name_she_lacks(
        stack_settings, scripted, bridges):
    """Through a real bridge: the cue is on live2d_events before the letta_responses record (the
    memory write still runs in Letta then), once, and a cue the tool refuses is never published."""
    s = stack_settings
    r = redis_conn(s)
    recorder = ChannelRecorder(r, s.bridge_avatar_channel, s.bridge_response_channel)
    bridges()
    try:
        memory_write = ("remember_viewer_fact", {"fact": "drinks oolong tea", "category": "likes"})
        shown = face_of_one_turn(scripted, r, recorder, "early", expression(), memory_write)
        assert shown == [("set_expression", {"expression": "happy"})]
        shown = face_of_one_turn(scripted, r, recorder, "refused", expression("grumpy"), ("play_motion", {"motion": "wave"}))
        assert shown == [("play_motion", {"motion": "wave"})]
        assert scripted.chat_requests() == 1  # the refused cue's turn: words and calls in one model call
    finally:
        recorder.close()
        r.close()


def face_of_one_turn(scripted, r, recorder, name, *calls):
    """One task through the bridge, the model answering words then `calls`; the avatar cues it showed,
    after checking they came before the turn's record and that FINISH published none of them again."""
    avatar, responses = recorder.channels
    scripted.reset()
    scripted.reply_with_tools(name, "Welcome back! I remember you.", *calls, text_position="before")
    body = build_task(f"twitch:face-{RUN}-{name}", "hi again", display_name="Face")
    push(r, [body])
    task_id = body["task_id"]
    wait_for(lambda: [m for m in recorder.on(responses) if m["task_id"] == task_id], 90, what=f"the {name} turn's record")
    time.sleep(0.5)  # anything published after the record has arrived too
    mine = [(channel, m) for channel, m in list(recorder.messages) if m.get("task_id") == task_id]
    cues = [m for channel, m in mine if channel == avatar]
    assert [channel for channel, _ in mine] == [avatar] * len(cues) + [responses], mine
    assert len(r.smembers(keys.task_cued(task_id))) == len(cues)  # each published early, by its call id
    return [(m["tool"], m["args"]) for m in cues]


def test_a_tool_call_first_then_the_text_is_answered_in_two_model_calls(scripted, turns, agent):
    scripted.add_rules({"name": "after", "when": {"after_tool": "set_expression"}, "then": {"reply": "Hi there!"}})
    scripted.reply_with_tools("cue-only", None, expression("shy"))
    result = send(turns, agent, "you look cute")
    assert scripted.chat_requests() == 2 and scripted.chat_requests("after") == 1
    assert result.reply_text == "Hi there!"
    assert [(c.tool, c.args) for c in result.avatar_calls] == [("set_expression", {"expression": "shy"})]
    # The second step saw the tool's result and the bridge's note, nothing was sent twice.
    last = scripted.requests(1)[0]
    assert [m["role"] for m in last["messages"]].count("user") == 1


def test_several_tool_calls_at_once_all_run_in_one_model_call(scripted, turns, agent, client):
    scripted.reply_with_tools("three", "Welcome back, I remember you love cats!", expression(),
                              ("play_motion", {"motion": "wave"}),
                              ("remember_viewer_fact", {"fact": "loves cats", "category": "likes"}))
    result = send(turns, agent, "I love cats")
    assert scripted.chat_requests() == 1
    assert [c.tool for c in result.avatar_calls] == ["set_expression", "play_motion"]
    assert result.memory_updated
    assert parse_facts(human_of(client, agent)) == {"likes": ["loves cats"]}
    # Letta was told it may make several calls (no tool rule turns parallel calls off).
    assert scripted.requests(1)[0]["parallel_tool_calls"] is True


def test_a_memory_write_plus_an_expression_and_a_memory_write_alone(scripted, turns, agent, client):
    scripted.reply_with_tools("mem+face", "Nice to meet you, Mika!", expression(),
                              ("remember_viewer_fact", {"fact": "goes by Mika", "category": "name"}),
                              when={"user_contains": "Mika"})
    scripted.add_rules({"name": "after-mem", "when": {"after_tool": "remember_viewer_fact"},
                        "then": {"reply": "Noted: {tool_result}"}})
    scripted.reply_with_tools("mem-only", None, ("remember_viewer_fact", {"fact": "has a dog", "category": "pets"}),
                              when={"user_contains": "dog"})
    first = send(turns, agent, "I'm Mika")
    assert scripted.chat_requests() == 1 and first.reply_text == "Nice to meet you, Mika!" and first.memory_updated
    second = send(turns, agent, "I have a dog")
    assert scripted.chat_requests() == 3
    assert second.reply_text.startswith("Noted:") and "Remembered (pets): has a dog" in second.reply_text
    assert parse_facts(human_of(client, agent)) == {"name": ["goes by Mika"], "pets": ["has a dog"]}


def test_stay_silent_alone_ends_the_turn_without_words_or_another_step(scripted, turns, agent):
    scripted.reply_with_tools("quiet", None, ("stay_silent", {"reason": "spam"}))
    result = send(turns, agent, "buy followers at spam.example")
    assert scripted.chat_requests() == 1 and result.silent and result.reply_text == ""


# ---------------------------------------------------------------- what a tool process can see

PROBE_SOURCE = '''
def vtl_sandbox_probe(paths: str) -> str:
    """
    Report what this tool process can see (a test-only tool).

    Args:
        paths (str): comma-separated files to try to open.

    Returns:
        str: a JSON report.
    """
    import json
    import os
    import sys
    report = {"python": sys.executable, "uid": os.getuid(), "env": sorted(os.environ)}
    for module in ("letta", "letta_client", "pydantic"):
        try:
            __import__(module)
            report[module] = "importable"
        except ImportError:
            report[module] = "missing"
    readable = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/environ", "rb") as handle:
                    environ = handle.read()
                if b"LETTA_PG_URI" in environ or b"OPENAI_API_KEY" in environ:
                    readable.append(pid)
            except OSError:
                pass
    report["foreign_environ_readable"] = readable
    secret_files = []
    for path in paths.split(","):
        try:
            with open(path, "rb"):
                secret_files.append(path)
        except OSError:
            pass
    report["readable_secret_files"] = secret_files
    return json.dumps(report)
'''


def test_a_tool_process_has_no_letta_and_no_secret(stack, stack_settings, client, scripted, viewers, turns):
    tool = client.tools.upsert(source_code=PROBE_SOURCE, tags=["vtuber-letta-test"])
    agent = viewers.ensure(f"twitch:probe-{RUN}", "Probe", "twitch").agent_id
    client.agents.tools.attach(tool.id, agent_id=agent)
    secret_files = [str(stack_settings.password_file.resolve()),
                    str((stack_settings.letta_dir / "config" / "memory-gate-secret").resolve())]
    scripted.add_rules({"name": "report", "when": {"after_tool": "vtl_sandbox_probe"}, "then": {"reply": "done"}})
    # The model names the files itself: even then the probe cannot open them.
    scripted.reply_with_tools("probe", None, ("vtl_sandbox_probe", {"paths": ",".join(secret_files + ["/etc/hostname"])}))
    send(turns, agent, "probe please", streamed=False)
    [result] = [json.loads(m["content"])["message"] for r in scripted.requests() for m in r["messages"]
                if m.get("role") == "tool" and "python" in m.get("content", "")]
    report = json.loads(result)
    assert report["letta"] == "missing" and report["letta_client"] == "missing" and report["pydantic"] == "missing"
    assert "tool-sandbox" in report["python"]
    leaked = [name for name in report["env"] if name not in (
        "LETTA_AGENT_ID", "LETTA_TOOL_ID", "VTL_AVATAR_EXPRESSIONS", "VTL_AVATAR_MOTIONS", "VTL_MEMORY_GATE_URL",
        "VTL_MEMORY_TOKEN", "PATH", "LANG", "PYTHONIOENCODING", "PYTHONUNBUFFERED", "HOME", "LC_CTYPE")]
    assert leaked == [], f"variables reached the tool: {leaked}"
    assert report["foreign_environ_readable"] == [], "the tool can read the server's environment"
    assert report["readable_secret_files"] == ["/etc/hostname"]  # it can open files: just not those
    client.agents.tools.detach(tool.id, agent_id=agent)
    client.tools.delete(tool.id)


# ---------------------------------------------------------------- shared blocks and memory tools

def test_a_persona_edit_during_a_memory_tool_turn_survives(stack_settings, client, scripted, turns, agent):
    template = load_blueprint(stack_settings).template.name
    persona = find_shared_block(client, template, "persona")
    original = persona.value
    edited = original + "\n(streamer's live edit " + RUN + ")"
    # The model holds its answer for 1.5 s: the edit lands after the step began, before the tool runs.
    scripted.reply_with_tools("slow-mem", "Got it!", ("remember_viewer_fact", {"fact": "likes tea", "category": "likes"}),
                              delay_ms=1500)
    editor = threading.Timer(0.5, lambda: client.blocks.update(persona.id, value=edited))
    editor.start()
    try:
        started = time.monotonic()
        result = send(turns, agent, "I like tea")
        editor.join()
        assert time.monotonic() - started >= 1.5 and result.memory_updated
        assert client.blocks.retrieve(persona.id).value == edited, "the turn wrote its stale copy of the persona back"
        assert parse_facts(human_of(client, agent)) == {"likes": ["likes tea"]}
    finally:
        client.blocks.update(persona.id, value=original)


def test_a_phone_number_is_refused_by_the_gate_in_a_real_turn(scripted, turns, agent, client):
    before = human_of(client, agent)
    scripted.add_rules({"name": "after-refusal", "when": {"after_tool": "remember_viewer_fact"},
                        "then": {"reply": "Please don't share that in chat!"}})
    scripted.reply_with_tools("doxx", None, ("remember_viewer_fact", {"fact": "phone 138 1234 5678", "category": "about"}))
    result = send(turns, agent, "my phone is 138 1234 5678")
    assert result.reply_text == "Please don't share that in chat!" and not result.memory_updated
    # What the model was shown for its call: the gate's refusal, with what to do instead.
    [shown] = [m["content"] for m in scripted.requests(1)[0]["messages"] if m.get("role") == "tool"][-1:]
    assert "Error: that looks like a phone number" in shown and "ask the viewer" in shown
    assert human_of(client, agent) == before and "5678" not in human_of(client, agent)

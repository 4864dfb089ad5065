"""Avatar cues published as soon as the model has written them, before Letta runs the tools: checked by
the tools' own rule (tools/avatar_cues.py), once per call across FINISH, retries and replays.

The bridge runs against a real redis-server with fake_gateway.FakeGateway, whose model writes its
words first, then its calls (each handed to on_cue), and then "runs the tools" until `hold` is set.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from bridge_harness import Outputs, _not, make_settings, push, running, scenario, task, wait_for
from fake_gateway import FakeGateway

import tools
from agent_templates.persona import avatar_secrets, load_persona_config
from bridge import check_bridge, run_bridge
from bridge.gateway import AvatarCall, TurnResult
from tools.avatar_cues import AvatarNames, avatar_cue_problem
from vtuber_letta import redis_keys as keys

pytestmark = pytest.mark.timeout(60)

SAMPLE_PERSONA = Path(__file__).resolve().parents[2] / "data" / "config" / "persona.sample.yaml"
HAPPY = AvatarCall("set_expression", {"expression": "happy", "intensity": 0.8}, "call-expr")
WAVE = AvatarCall("play_motion", {"motion": "wave"}, "call-wave")
GRUMPY = AvatarCall("set_expression", {"expression": "grumpy"}, "call-bad")  # not in the persona


def settings_for(url, tmp_path, **overrides):
    return make_settings(url, tmp_path, VTL_PERSONA_CONFIG=SAMPLE_PERSONA, **overrides)


def reply_with(*calls: AvatarCall):
    return lambda viewer, message: TurnResult(reply_text="Hello there!", avatar_calls=calls)


def cue_events(out) -> list[tuple[str, str, dict]]:
    return [(e["task_id"], e["tool"], e["args"]) for e in out.on("live2d_events")]


# ---------------------------------------------------------------- the rule is the tools' rule


def sample_names() -> AvatarNames:
    secrets = avatar_secrets(load_persona_config(SAMPLE_PERSONA))
    return AvatarNames.from_secrets(secrets[tools.AVATAR_EXPRESSIONS_ENV], secrets[tools.AVATAR_MOTIONS_ENV])


@pytest.mark.parametrize("tool, args", [
    ("set_expression", {"expression": "happy"}),
    ("set_expression", {"expression": " HAPPY ", "intensity": 3}),
    ("set_expression", {"expression": "happy", "intensity": "0.4"}),
    ("set_expression", {"expression": "happy", "intensity": "loud"}),
    ("set_expression", {"expression": "happy", "intensity": None}),
    ("set_expression", {"expression": "grumpy"}),
    ("set_expression", {}),
    ("set_expression", {"expression": "happy", "mood": "x"}),
    ("set_expression", {"expression": "happy", "request_heartbeat": True}),
    ("play_motion", {"motion": "Wave"}),
    ("play_motion", {"motion": "moonwalk"}),
    ("play_motion", {"expression": "happy"}),
])
def test_the_bridge_accepts_exactly_the_calls_the_tool_accepts(monkeypatch, tool, args):
    secrets = avatar_secrets(load_persona_config(SAMPLE_PERSONA))
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    call = {k: v for k, v in args.items() if k != "request_heartbeat"}  # Letta drops it before the call
    try:
        tool_ok = not tools.TOOLS[tool](**call).startswith("Error")
    except TypeError:  # Letta's sandbox fails the call: the tool returns nothing
        tool_ok = False
    assert (avatar_cue_problem(tool, args, sample_names()) is None) is tool_ok


def test_a_tool_that_is_no_avatar_tool_and_arguments_that_are_no_object_are_refused():
    assert "not an avatar tool" in avatar_cue_problem("remember_viewer_fact", {"fact": "x"}, sample_names())
    assert avatar_cue_problem("play_motion", ["wave"], sample_names()) is not None
    assert "no expressions configured" in avatar_cue_problem("set_expression", {"expression": "happy"},
                                                             AvatarNames((), ()))


# ---------------------------------------------------------------- through the bridge


@scenario
async def test_a_cue_goes_out_before_the_turn_ends_and_finish_does_not_send_it_again(r, url, tmp_path):
    settings = settings_for(url, tmp_path)
    gateway = FakeGateway(reply=reply_with(HAPPY), hold=asyncio.Event())  # the tools "run" until hold is set
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"))
        await wait_for(lambda: out.on("live2d_events"), what="the cue")
        assert out.responses() == []  # the turn has not ended
        assert await r.smembers(keys.task_cued("t-1")) == {b"call-expr"}
        gateway.hold.set()
        await wait_for(out.responses, what="final response")
        await asyncio.sleep(0.2)  # anything FINISH published has arrived
    assert cue_events(out) == [("t-1", "set_expression", {"expression": "happy", "intensity": 0.8})]
    channels = [name for name, _ in out.messages if name in ("live2d_events", "letta_responses")]
    assert channels == ["live2d_events", "letta_responses"]
    assert 0 < await r.ttl(keys.task_cued("t-1")) <= settings.bridge_done_ttl


@scenario
async def test_several_calls_in_one_response_each_go_out_early_in_order_and_once(r, url, tmp_path):
    settings = settings_for(url, tmp_path)
    gateway = FakeGateway(reply=reply_with(HAPPY, WAVE), hold=asyncio.Event())
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"))
        await wait_for(lambda: len(out.on("live2d_events")) == 2, what="both cues")
        assert out.responses() == []
        gateway.hold.set()
        await wait_for(out.responses, what="final response")
        await asyncio.sleep(0.2)
    assert [tool for _, tool, _ in cue_events(out)] == ["set_expression", "play_motion"]


@scenario
async def test_a_cue_the_tool_would_refuse_is_not_published(r, url, tmp_path):
    settings = settings_for(url, tmp_path)
    # The model writes a bad expression (the tool refuses it: not in the result) and a good motion.
    gateway = FakeGateway(reply=reply_with(WAVE), refused_calls=(GRUMPY,), hold=asyncio.Event())
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"))
        await wait_for(lambda: out.on("live2d_events"), what="the good cue")
        gateway.hold.set()
        await wait_for(out.responses, what="final response")
        await asyncio.sleep(0.2)
    assert cue_events(out) == [("t-1", "play_motion", {"motion": "wave"})]
    assert await r.smembers(keys.task_cued("t-1")) == {b"call-wave"}


@scenario
async def test_a_turn_replayed_after_a_kill_does_not_publish_its_cues_again(r, url, tmp_path):
    settings = settings_for(url, tmp_path)
    gateway = FakeGateway(reply=reply_with(HAPPY, WAVE), hold=asyncio.Event())  # Letta stores the turn; the bridge dies
    async with Outputs(url) as out:
        bridge_a = asyncio.create_task(run_bridge(settings, gateway, stop_event=asyncio.Event(), replica_id="a"))
        await push(r, task("t-1"))
        await wait_for(lambda: len(out.on("live2d_events")) == 2, what="the cues")
        bridge_a.cancel()  # killed while the tools ran: no FINISH
        await asyncio.gather(bridge_a, return_exceptions=True)
        await wait_for(lambda: _not(check_bridge(settings, "a")), what="TTL expiry")
        gateway.hold = None
        async with running(settings, gateway, "b"):
            await wait_for(out.responses, what="answer")
            await asyncio.sleep(0.2)
    assert gateway.sends_of("t-1") == 1 and out.responses()[0]["response_text"] == "Hello there!"  # replayed
    assert [tool for _, tool, _ in cue_events(out)] == ["set_expression", "play_motion"]  # once each


@scenario
async def test_cues_without_a_readable_persona_or_a_call_id_go_out_with_finish(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_PERSONA_CONFIG=tmp_path / "none" / "persona.yaml")
    no_id = AvatarCall("play_motion", {"motion": "wave"})
    for config, call in ((settings, HAPPY), (settings_for(url, tmp_path), no_id)):
        gateway = FakeGateway(reply=reply_with(call), hold=asyncio.Event())
        async with Outputs(url) as out, running(config, gateway):
            await push(r, task(f"t-{call.tool}"))
            await wait_for(gateway.send_started.is_set, what="the turn")
            await asyncio.sleep(0.3)
            assert out.on("live2d_events") == []  # nothing early...
            gateway.hold.set()
            await wait_for(out.responses, what="final response")
            await asyncio.sleep(0.2)
        assert [tool for _, tool, _ in cue_events(out)] == [call.tool]  # ...and once with FINISH


@scenario
async def test_streaming_off_publishes_cues_with_finish_as_before(r, url, tmp_path):
    settings = settings_for(url, tmp_path, VTL_BRIDGE_STREAMING=False)
    async with Outputs(url) as out, running(settings, FakeGateway(reply=reply_with(HAPPY))):
        await push(r, task("t-1"))
        await wait_for(out.responses, what="final response")
        await asyncio.sleep(0.2)
    assert [tool for _, tool, _ in cue_events(out)] == ["set_expression"]
    assert await r.exists(keys.task_cued("t-1")) == 0

"""The one viewer-id rule (vtuber_letta/viewer_ids.py), as the wire, the CLI, provisioning and the
route script (Lua, against a real redis-server) apply it: the same ids accepted, the same refused,
with the same reason."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest
import redis
from bridge_harness import scenario

from bridge.queue import ViewerQueues
from bridge.wire import WireError, parse_request
from provisioning.viewers import ViewerAgents
from vtuber_letta import redis_keys
from vtuber_letta.commands import cli
from vtuber_letta.viewer_ids import (
    MAX_VIEWER_ID_BYTES,
    MAX_VIEWER_ID_CHARS,
    InvalidViewerId,
    check_platform,
    check_viewer_id,
    is_task_id,
    lua_viewer_id_check,
    platform_of,
    refused_ranges,
    space_ranges,
    split_platform,
    viewer_id_problem,
)

CONTROL = "contains a control or format character (U+{:04X})"

ACCEPTED = [
    "bilibili:12345", "twitch:alice_01", "youtube:UC123/x.y", "youtube:UC…/x.y", "anonymous",
    "bilibili:小明", "观众小明🌟", "观众 小明 🌟", "Привет:мир", "مرحبا:123", "שלום", "नमस्ते", "สวัสดี",
    "こんにちは", "안녕하세요", "Ελληνικά", "ქართული", "Zoë/星星.fan v2", "a/b/c", "a b", "#1?x=y&z",
    "*", "hx:*", "[x]", "{hash}tag", "../../etc/passwd", "C:\\Users\\x", "'\";--", "<b>x</b>",
    " leading", "trailing ", "  both  ", "a\u00a0b", "a\u3000b",  # spaces are kept, never trimmed
    "cafe\u0301", "❤\ufe0f", "🏳\ufe0f", "👍🏽",  # combining marks, variation selectors, skin tones
    "\U0001fae8 new emoji",  # newer than Python 3.11's Unicode database (Cn): accepted
    "\ue000private\uf8ff",  # private use (Co): accepted
    "vtl:lock:viewer:x", "\\", "x" * MAX_VIEWER_ID_CHARS, "星" * 170, "🌟" * 128, "é" * 256,
]

REFUSED = [
    ("", "is empty"),
    (" ", "is only spaces"),
    ("\u3000 \u00a0", "is only spaces"),
    ("x" * (MAX_VIEWER_ID_CHARS + 1), f"is {MAX_VIEWER_ID_CHARS + 1} characters; at most {MAX_VIEWER_ID_CHARS} allowed"),
    ("星" * 171, f"is 513 bytes of UTF-8; at most {MAX_VIEWER_ID_BYTES} allowed"),
    ("🌟" * 129, f"is 516 bytes of UTF-8; at most {MAX_VIEWER_ID_BYTES} allowed"),
    # Cc: C0 controls, tab, line breaks, escape, DEL, C1
    ("evil\x00id", CONTROL.format(0)), ("a\tb", CONTROL.format(9)), ("line\nbreak", CONTROL.format(0x0A)),
    ("x\r\nSET evil 1", CONTROL.format(0x0D)), ("\x1b[31mred", CONTROL.format(0x1B)), ("del\x7f", CONTROL.format(0x7F)),
    ("nel\x85", CONTROL.format(0x85)), ("c1\x9f", CONTROL.format(0x9F)),
    # Cf: bidi controls, zero-width characters, BOM, soft hyphen, tags, invisible operators
    ("it:\u202egood", CONTROL.format(0x202E)), ("a\u202ab", CONTROL.format(0x202A)), ("a\u2066b", CONTROL.format(0x2066)),
    ("a\u200eb", CONTROL.format(0x200E)), ("a\u061cb", CONTROL.format(0x061C)),
    ("bili\u200bbili:1", CONTROL.format(0x200B)), ("a\u200cb", CONTROL.format(0x200C)),
    ("victim\u200d", CONTROL.format(0x200D)), ("👨\u200d👩", CONTROL.format(0x200D)), ("a\u2060b", CONTROL.format(0x2060)),
    ("\ufeffbom", CONTROL.format(0xFEFF)), ("soft\u00adhyphen", CONTROL.format(0x00AD)), ("a\u2062b", CONTROL.format(0x2062)),
    ("tag\U000e0041", CONTROL.format(0xE0041)), ("a\ufff9b", CONTROL.format(0xFFF9)),
    # Cs: a lone surrogate (JSON "\ud800"); Zl, Zp: line and paragraph separators
    ("a\ud800b", CONTROL.format(0xD800)), ("a\u2028b", CONTROL.format(0x2028)), ("a\u2029b", CONTROL.format(0x2029)),
]


# ---------------------------------------------------------------- the rule in Python

@pytest.mark.parametrize("viewer_id", ACCEPTED)
def test_printable_ids_of_any_script_are_viewer_ids(viewer_id):
    assert viewer_id_problem(viewer_id) is None
    assert check_viewer_id(viewer_id) == viewer_id  # kept exactly as given


@pytest.mark.parametrize("viewer_id, problem", REFUSED)
def test_refused_ids_say_why(viewer_id, problem):
    assert viewer_id_problem(viewer_id) == problem
    with pytest.raises(InvalidViewerId) as caught:
        check_viewer_id(viewer_id)
    assert str(caught.value) == f"invalid user_id: {problem}"


@pytest.mark.parametrize("value, problem", [(None, "must be a string (got NoneType)"), (12345, "must be a string (got int)")])
def test_non_strings_are_refused(value, problem):
    assert viewer_id_problem(value) == problem


def test_every_refused_category_is_refused_and_nothing_else():
    for lo, hi in refused_ranges():
        assert unicodedata.category(chr(lo)) in ("Cc", "Cf", "Cs", "Zl", "Zp")
        assert unicodedata.category(chr(hi)) in ("Cc", "Cf", "Cs", "Zl", "Zp")
        for code in (lo - 1, hi + 1):
            if 0 <= code <= 0x10FFFF:
                assert unicodedata.category(chr(code)) not in ("Cc", "Cf", "Cs", "Zl", "Zp"), hex(code)
    assert all(unicodedata.category(chr(lo)) == "Zs" for lo, _ in space_ranges())


@pytest.mark.parametrize("viewer_id, meta_platform, platform", [
    ("bilibili:12345", None, "bilibili"),
    ("youtube:UC123/x.y", None, "youtube"),
    ("Twitch:Alice", None, "twitch"),
    ("bilibili:1", " Twitch ", "twitch"),  # the producer's word wins
    ("bilibili:1", "", "bilibili"),  # blank is none
    ("anonymous", None, None),
    ("观众:小明", None, None),  # not a platform name before the colon
    (":x", None, None),
    (" twitch:x", None, None),
    ("\u212aick:x", None, None),  # KELVIN SIGN lower-cases to `k`: not ASCII, not a platform
    ("a.b-c_1:x", None, "a.b-c_1"),
    ("p" * 33 + ":x", None, None),
])
def test_platform_of_one_rule(viewer_id, meta_platform, platform):
    assert platform_of(viewer_id, meta_platform) == platform


def test_split_platform_gives_the_rest_of_the_id():
    assert split_platform("youtube:UC123/x.y") == ("youtube", "UC123/x.y")
    assert split_platform("观众:小明") == (None, "观众:小明")


def test_an_invalid_meta_platform_is_refused_with_its_own_reason():
    with pytest.raises(InvalidViewerId) as caught:
        check_platform("bili bili")
    assert str(caught.value) == "invalid platform: must be 1-32 characters of a-z 0-9 _ . -"
    with pytest.raises(InvalidViewerId):
        platform_of("bilibili:1", "Zoë")


@pytest.mark.parametrize("task_id, ok", [
    ("3f0c9a", True), ("sc-77", True), ("任务.1:a@b+c=d", True), ("t" * 128, True),
    ("नमस्ते-1", True), ("cafe\u0301", True),  # combining marks belong to their letters
    ("t" * 129, False), ("", False), ("t 1", False), ("../../etc", False), ("a/b", False), ("t\n", False),
    ("t\u200d", False), ("t\u200b", False), ("t\u202e", False), (7, False),
])
def test_task_ids_keep_their_stricter_rule(task_id, ok):
    assert is_task_id(task_id) is ok


# ---------------------------------------------------------------- the wire, the CLI, provisioning

def payload(user_id) -> bytes:
    return json.dumps({"task_id": "t-1", "type": "text", "user_id": user_id, "content": "hi"}).encode()


@pytest.mark.parametrize("viewer_id, problem", REFUSED)
def test_the_wire_refuses_with_the_rule_s_reason(viewer_id, problem):
    with pytest.raises(WireError) as caught:
        parse_request(payload(viewer_id), max_bytes=65536)
    assert caught.value.reason == f"invalid user_id: {problem}"
    assert caught.value.user_id is None and caught.value.task_id == "t-1"


@pytest.mark.parametrize("viewer_id", ACCEPTED)
def test_the_wire_accepts_what_the_rule_accepts(viewer_id):
    assert parse_request(payload(viewer_id), max_bytes=65536).user_id == viewer_id


@pytest.fixture
def cli_viewers(monkeypatch, redis_url, tmp_path):
    """`vtuber-letta agent ...` run in-process with the real ViewerAgents on a private Redis and a
    Letta client that must never be called (the map already knows the viewer)."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("REDIS_URL", redis_url)
    conn = redis.Redis.from_url(redis_url, decode_responses=True)

    class NoLetta:
        def __getattr__(self, name):
            raise AssertionError(f"the CLI called Letta ({name}) for an id the rule decides")

    made: list[str] = []

    def factory(settings):
        made.append("ViewerAgents")
        return ViewerAgents(settings, client=NoLetta(), redis_conn=conn)

    monkeypatch.setattr("provisioning.viewers.ViewerAgents", factory)
    yield conn, made
    conn.close()


def test_cli_and_wire_refuse_a_control_character_id_with_the_same_reason(cli_viewers, capsys):
    _, made = cli_viewers
    bad = "youtube:UC123/\u202ex.y"
    with pytest.raises(WireError) as caught:
        parse_request(payload(bad), max_bytes=65536)
    for action in (["ensure", bad], ["show", bad], ["forget", bad], ["export", bad, "-o", "x.af"]):
        assert cli.main(["agent", *action]) == 1
        err = capsys.readouterr().err
        assert err == f"error: {caught.value.reason}\n", (action, err)
    assert err == "error: invalid user_id: contains a control or format character (U+202E)\n"
    assert made == []  # refused before any client was built
    with pytest.raises(InvalidViewerId) as refused:  # provisioning refuses it the same way on its own
        ViewerAgents.__new__(ViewerAgents).ensure(bad)
    assert str(refused.value) == caught.value.reason


def test_cli_accepts_the_id_the_wire_accepts(cli_viewers, capsys):
    conn, made = cli_viewers
    viewer = "youtube:UC123/x.y"
    conn.hset(redis_keys.VIEWER_AGENTS, viewer, "agent-123")
    assert parse_request(payload(viewer), max_bytes=65536).user_id == viewer
    assert cli.main(["agent", "ensure", viewer]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["viewer_id"], out["agent_id"], out["created"]) == (viewer, "agent-123", False)
    assert made == ["ViewerAgents"]


def test_cli_refuses_an_invalid_platform(cli_viewers, capsys):
    assert cli.main(["agent", "ensure", "bilibili:1", "--platform", "bili bili"]) == 1
    assert capsys.readouterr().err == "error: invalid platform: must be 1-32 characters of a-z 0-9 _ . -\n"


# ---------------------------------------------------------------- the same rule in Lua

def _lua_verdicts(conn: redis.Redis, raw_ids: list[bytes]) -> list[bool]:
    script = conn.register_script(lua_viewer_id_check() + """
local out = {}
for i = 1, #ARGV do out[i] = viewer_id_ok(ARGV[i]) and 1 or 0 end
return out
""")
    return [bool(v) for v in script(keys=[], args=raw_ids)]


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate as Redis would get it (CESU bytes)


def test_lua_accepts_and_refuses_the_same_table(redis_url):
    conn = redis.Redis.from_url(redis_url)
    try:
        ids = ACCEPTED + [viewer_id for viewer_id, _ in REFUSED]
        verdicts = _lua_verdicts(conn, [_utf8(v) for v in ids])
        assert {v: ok for v, ok in zip(ids, verdicts)} == {v: viewer_id_problem(v) is None for v in ids}
        # bytes no Python str can be: invalid, overlong or truncated UTF-8
        assert _lua_verdicts(conn, [b"a\xffb", b"\xc0\xaf", b"\xe0\x80\xaf", b"x\xe6\x98", b"\xf4\x90\x80\x80"]) == [False] * 5
    finally:
        conn.close()


def test_lua_agrees_with_python_at_every_range_edge_and_on_a_sample(redis_url):
    """One code point in an otherwise fine id: at each edge of every refused or space range, at
    each UTF-8 length boundary, and on a fixed random sample of the whole code space."""
    codes = {0x7F, 0x80, 0x7FF, 0x800, 0xFFFF, 0x10000, 0x10FFFF}
    for lo, hi in refused_ranges() + space_ranges():
        codes.update({lo - 1, lo, hi, hi + 1})
    rng = random.Random(15)
    codes.update(rng.randrange(0x110000) for _ in range(3000))
    codes = sorted(c for c in codes if 0 <= c <= 0x10FFFF)
    ids = [f"x{chr(c)}y" for c in codes] + [chr(c) for c in codes]
    conn = redis.Redis.from_url(redis_url)
    try:
        verdicts = _lua_verdicts(conn, [_utf8(v) for v in ids])
    finally:
        conn.close()
    disagree = [(hex(ord(v[1] if len(v) == 3 else v)), ok) for v, ok in zip(ids, verdicts) if ok != (viewer_id_problem(v) is None)]
    assert not disagree


@scenario
async def test_the_route_script_routes_exactly_what_the_wire_accepts(r, url, tmp_path):
    """The real ROUTE script (cjson + viewer_id_ok) on payloads as hosts send them: JSON with raw
    UTF-8 and JSON with \\u escapes (surrogate pairs for emoji)."""
    queues = ViewerQueues(r, request_queue="letta_requests", max_payload_bytes=65536, dead_letter_max=100)
    ids = ACCEPTED + [viewer_id for viewer_id, _ in REFUSED]
    for ensure_ascii in (False, True):
        await r.flushall()
        raws = [json.dumps({"task_id": f"t-{i}", "type": "text", "user_id": v, "content": "hi"},
                           ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass") for i, v in enumerate(ids)]
        await r.lpush("letta_requests", *raws)
        await queues.route_all()
        triaged = set(await r.lrange(redis_keys.BRIDGE_TRIAGE, 0, -1))
        for viewer_id, raw in zip(ids, raws):
            accepted = viewer_id_problem(viewer_id) is None
            assert (raw not in triaged) is accepted, (viewer_id, ensure_ascii)
            if accepted:
                assert await r.lrange(redis_keys.viewer_queue(viewer_id), 0, -1) == [raw], viewer_id

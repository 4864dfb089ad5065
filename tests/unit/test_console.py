"""Every route of the console (console/app.py), on a real throw-away Redis, with the Letta side
faked (tests/unit/console_fakes.py) and the real memory gate's rules behind every fact change."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
import redis
import redis.asyncio as aioredis
from markupsafe import escape
from starlette.testclient import TestClient

from bridge.outcome_log import TaskOutcome
from bridge.viewer_stats import NAME_FIELD, searchable_name
from bridge.wire import DeadLetter, dump
from console.app import Console, build_app
from console.auth import COOKIE, Sessions
from tests.hostile.page_text import HOSTILE_TEXT
from tests.unit.console_fakes import FakeMemory
from tools.human_block import FACTS_HEADING, VERIFIED_HEADING, VIEWER_HEADING
from vtuber_letta import redis_keys as keys
from vtuber_letta.settings import Settings, SettingsError, load_settings

PASSWORD = "console-unit-password"


@pytest.fixture
def settings(redis_url, tmp_path):
    return Settings(_env_file=None, REDIS_URL=redis_url, VTL_DATA_DIR=str(tmp_path), VTL_CONSOLE_PASSWORD=PASSWORD,
                    VTL_MEMORY_GATE_SECRET="gate-secret-never-shown", LETTA_API_KEY="letta-secret-never-shown",
                    VTL_BRIDGE_METRICS_PORT=0)


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def memory():
    return FakeMemory()


@pytest.fixture
def app_client(settings, r, memory, redis_url):
    console = Console(settings, r, aioredis.Redis.from_url(redis_url), memory, Sessions(PASSWORD))
    with TestClient(build_app(console), base_url="http://127.0.0.1:8286", follow_redirects=False) as client:
        yield client
        client.portal.call(console.redis_async.aclose)  # its connections live in the client's event loop


def login(client) -> str:
    """Log in; the CSRF token of the session."""
    response = client.post("/login", data={"password": PASSWORD})
    assert response.status_code == 303 and response.headers["location"] == "/viewers"
    return csrf_of(client.get("/viewers").text)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "no CSRF token on the page"
    return match.group(1)


def seen(client, response):
    """Follow the redirect after a change; the page that shows its result."""
    assert response.status_code == 303, response.text
    return client.get(response.headers["location"])


def add_viewer(r, memory, viewer_id, name, *, visits=1, last_seen=1_767_000_000.0, support=None, facts=None):
    agent = memory.add(viewer_id, name, facts=facts)
    r.hset(keys.VIEWER_AGENTS, viewer_id, agent.agent_id)
    stats = {"first_seen": repr(last_seen - 86400), "last_seen": repr(last_seen), "visits": str(visits),
             NAME_FIELD: searchable_name(name)}  # as the bridge's stats_ops keeps it
    for currency, amount in (support or {}).items():
        stats[f"support:{currency}"] = repr(amount)
    r.hset(keys.viewer_stats(viewer_id), mapping=stats)
    return agent


# ---------------------------------------------------------------- the door
PAGES = ["/", "/viewers", "/viewer?id=bilibili:1", "/viewer/forget?id=bilibili:1", "/viewer/export?id=bilibili:1",
         "/persona", "/live"]
CHANGES = ["/viewer/fact/add", "/viewer/fact/edit", "/viewer/fact/delete", "/viewer/forget", "/persona/block",
           "/persona/stream", "/live/send-again", "/logout"]


def test_without_a_session_only_the_login_page_answers(app_client, r, memory):
    add_viewer(r, memory, "bilibili:1", "Alice", facts={"likes": ["cats"]})
    for path in PAGES:
        response = app_client.get(path)
        assert response.status_code == 303 and response.headers["location"] == "/login", path
        assert "Alice" not in response.text and "cats" not in response.text
    for path in CHANGES:
        response = app_client.post(path, data={"id": "bilibili:1", "fact": "cats", "confirm": "bilibili:1"})
        assert response.status_code == 403, path
    assert memory.agents["bilibili:1"].block.count("cats") == 1 and not memory.forgotten
    assert app_client.get("/login").status_code == 200
    assert app_client.get("/health").json() == {"status": "ok"}


def test_a_wrong_password_opens_nothing_and_the_right_one_sets_a_strict_cookie(app_client):
    wrong = app_client.post("/login", data={"password": "guess"})
    assert wrong.status_code == 401 and "wrong password" in wrong.text and COOKIE not in wrong.cookies
    assert app_client.get("/viewers").status_code == 303
    right = app_client.post("/login", data={"password": PASSWORD})
    cookie = right.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert app_client.get("/viewers").status_code == 200
    assert app_client.get("/login").status_code == 303  # already in


def test_logging_out_ends_the_session(app_client):
    csrf = login(app_client)
    assert app_client.post("/logout", data={"csrf": csrf}).status_code == 303
    assert app_client.get("/viewers").status_code == 303


def test_a_forged_cross_site_post_changes_nothing(app_client, r, memory):
    add_viewer(r, memory, "bilibili:1", "Alice", facts={"likes": ["cats"]})
    csrf = login(app_client)
    before = memory.agents["bilibili:1"].block
    no_token = app_client.post("/viewer/fact/delete", data={"id": "bilibili:1", "fact": "cats"})
    wrong_token = app_client.post("/viewer/fact/delete", data={"id": "bilibili:1", "fact": "cats", "csrf": "x" * 43})
    other_site = app_client.post("/viewer/forget", data={"id": "bilibili:1", "confirm": "bilibili:1", "csrf": csrf},
                                 headers={"Origin": "http://evil.example"})
    fetched_cross_site = app_client.post("/viewer/forget", data={"id": "bilibili:1", "confirm": "bilibili:1", "csrf": csrf},
                                         headers={"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:8286"})
    assert [no_token.status_code, wrong_token.status_code, other_site.status_code,
            fetched_cross_site.status_code] == [403, 403, 403, 403]
    assert memory.agents["bilibili:1"].block == before and not memory.forgotten
    assert app_client.post("/login", data={"password": PASSWORD}, headers={"Origin": "null"}).status_code == 403


def test_every_page_forbids_scripts_and_framing(app_client):
    login(app_client)
    for path in ["/login", "/viewers", "/persona", "/live"]:
        response = app_client.get(path)
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, path
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "<script" not in response.text


# ---------------------------------------------------------------- viewers
def test_the_list_sorts_searches_and_pages_and_asks_letta_only_for_the_page(app_client, r, memory):
    for n in range(120):
        add_viewer(r, memory, f"bilibili:{n:03d}", f"name{n}", visits=n % 7, last_seen=1_767_000_000.0 + n,
                   support={"CNY": float(n)} if n % 10 == 0 else None, facts={"likes": ["cats"]} if n == 5 else None)
    login(app_client)
    first = app_client.get("/viewers").text  # default: last seen, newest first
    assert "120" in first and "page 1 of 3" in first
    assert first.index("bilibili:119") < first.index("bilibili:118") and "bilibili:069" not in first
    assert memory.card_calls[-1] == [f"bilibili:{n:03d}" for n in range(119, 69, -1)]  # 50 rows, not 120
    by_visits = app_client.get("/viewers?sort=visits&order=desc&page=1").text
    assert by_visits.index("bilibili:006") < by_visits.index("bilibili:118") < by_visits.index("bilibili:005")
    assert "bilibili:000" not in by_visits  # 0 visits: last
    by_support = app_client.get("/viewers?sort=support&order=desc").text
    assert by_support.index("bilibili:110") < by_support.index("bilibili:100") and "110 CNY" in by_support
    third = app_client.get("/viewers?sort=id&order=asc&page=3").text
    assert "bilibili:100" in third and "bilibili:099" not in third and "page 3 of 3" in third
    found = app_client.get("/viewers?q=BILIBILI:00").text
    assert "10</span>" in found and "bilibili:005" in found and "bilibili:010" not in found
    assert re.search(r"<bdi>name5</bdi>.*?<td class=\"num\">1</td>\s*</tr>", found, re.S), "fact count of bilibili:005"
    assert "No viewer matches" in app_client.get("/viewers?q=nobody").text
    assert "page 3 of 3" in app_client.get("/viewers?page=99").text  # clamped, not an error


def test_the_list_finds_viewers_by_display_name_case_blind_and_escapes_the_search(app_client, r, memory):
    add_viewer(r, memory, "bilibili:1", "Alice Wonder", last_seen=1_767_000_001.0)
    add_viewer(r, memory, "bilibili:2", "a\u200bLICE 小明", last_seen=1_767_000_002.0)  # zero-width inside
    add_viewer(r, memory, "bilibili:3", "Bob", last_seen=1_767_000_003.0)
    add_viewer(r, memory, "bilibili:4", "call 13812345678", last_seen=1_767_000_004.0)
    add_viewer(r, memory, "twitch:alice", "Carol", last_seen=1_767_000_005.0)  # found by id
    add_viewer(r, memory, "weibo:Straße", "Hans", last_seen=1_767_000_006.0)  # a non-ASCII id: casefolded in Python
    r.hdel(keys.viewer_stats("bilibili:3"), NAME_FIELD)  # not seen by the bridge since names were kept
    login(app_client)

    def found(q, **params):
        page = app_client.get("/viewers", params={"q": q, **params}).text
        return re.findall(r'href="/viewer\?id=([^"]+)"', page), page

    ids, page = found("ALICE")
    assert ids == ["twitch%3Aalice", "bilibili%3A2", "bilibili%3A1"] and "3</span>" in page  # last seen first
    assert found("alice", sort="id", order="asc")[0] == ["bilibili%3A1", "bilibili%3A2", "twitch%3Aalice"]
    assert found("小明")[0] == ["bilibili%3A2"] and found("wonder")[0] == ["bilibili%3A1"]
    assert found("bob")[0] == [] and found("bilibili:3")[0] == ["bilibili%3A3"]  # no name kept: found by id
    assert found("13812345678")[0] == []  # the phone number was never kept
    assert found("a\u200blic")[0] == found("alic")[0]
    assert found("STRASSE")[0] == ["weibo%3AStra%C3%9Fe"] and found("hans")[0] == ["weibo%3AStra%C3%9Fe"]
    ids, page = found('"><script>alert(1)</script>')
    assert ids == [] and "<script>" not in page and "&#34;&gt;&lt;script&gt;" in page and "No viewer matches" in page


def test_the_list_still_answers_when_letta_does_not(app_client, r, memory, monkeypatch):
    add_viewer(r, memory, "bilibili:1", "Alice")
    login(app_client)
    monkeypatch.setattr(memory, "cards", lambda ids: (_ for _ in ()).throw(ConnectionError("down")))
    page = app_client.get("/viewers")
    assert page.status_code == 200 and "bilibili:1" in page.text and "Letta did not answer" in page.text


def test_letta_or_redis_down_is_a_clear_503(app_client, r, memory, monkeypatch):
    from letta_client import APIConnectionError

    add_viewer(r, memory, "bilibili:1", "Alice")
    csrf = login(app_client)

    def down(*_args):
        raise APIConnectionError(request=None)

    monkeypatch.setattr(memory, "viewer", down)
    page = app_client.get("/viewer?id=bilibili:1")
    assert page.status_code == 503 and "The Letta server did not answer (APIConnectionError)" in page.text
    change = app_client.post("/viewer/fact/add", data={"csrf": csrf, "id": "bilibili:1", "fact": "cats", "category": "likes"})
    assert change.status_code == 503
    huge = app_client.post("/viewer/fact/add", content=b"x" * 70_000, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert huge.status_code == 413


def test_a_viewer_page_shows_facts_by_category_the_verified_section_and_the_conversation(app_client, r, memory):
    from console.memory import ChatLine

    agent = add_viewer(r, memory, "bilibili:1", "Alice", visits=3, facts={"likes": ["cats", "原神"], "name": ["goes by Ali"]})
    agent.messages = [ChatLine("viewer", "hi Luna", ""), ChatLine("vtuber", "hi Alice!", "")]
    login(app_client)
    page = app_client.get("/viewer?id=bilibili:1").text
    assert re.search(r"<h3><bdi>likes</bdi></h3>\s*<ul>.*cats.*原神.*</ul>\s*<h3><bdi>name</bdi></h3>", page, re.S)
    assert "first_seen" in page and "2026-01-01T00:00:00Z" in page and "hi Luna" in page and "hi Alice!" in page
    assert app_client.get("/viewer?id=bilibili:404").status_code == 404
    assert app_client.get("/viewer?id=bad%0Aid").status_code == 400


def test_facts_are_changed_through_the_memory_gates_rules(app_client, r, memory):
    add_viewer(r, memory, "bilibili:1", "Alice", facts={"likes": ["cats"]})
    csrf = login(app_client)

    def change(action, **fields):
        return seen(app_client, app_client.post(f"/viewer/fact/{action}", data={"csrf": csrf, "id": "bilibili:1", **fields})).text

    assert "Remembered (likes): dogs" in change("add", fact="dogs", category="love")
    refused = change("add", fact="her phone is 13812345678", category="about")
    assert "not saved" in refused and "phone" in refused and "13812345678" not in memory.agents["bilibili:1"].block
    assert "not saved" in change("add", fact="donated 500 yuan", category="other")  # support claims stay the bridge's
    assert "not saved" in change("add", fact="x" * 201, category="other")
    block = memory.agents["bilibili:1"].block
    assert "- dogs" in block and "Mochi" not in block
    assert "Forgot (likes): dogs" in change("delete", fact="dogs")
    assert "not saved" in change("delete", fact="dogs")
    assert app_client.post("/viewer/fact/other", data={"csrf": csrf, "id": "bilibili:1"}).status_code == 404


def test_an_edit_rewords_a_fact_in_place_in_one_write_or_leaves_it(app_client, r, memory):
    add_viewer(r, memory, "bilibili:1", "Alice", facts={"likes": ["cats", "dogs", "原神"], "name": ["goes by Ali"]})
    csrf = login(app_client)

    def edit(old, fact, category="likes"):
        return seen(app_client, app_client.post("/viewer/fact/edit", data={"csrf": csrf, "id": "bilibili:1", "old": old,
                                                                            "fact": fact, "category": category})).text

    def facts():
        return memory.viewer("bilibili:1").facts

    writes = memory.writes
    assert "Changed (likes): dogs → big dogs" in edit("dogs", "big dogs")
    assert facts() == {"likes": ["cats", "big dogs", "原神"], "name": ["goes by Ali"]}  # same place, same category
    assert memory.writes == writes + 1  # one read-modify-write, not a forget and a remember
    before, writes = memory.agents["bilibili:1"].block, memory.writes
    for old, fact, why in [("cats", "<b>cats</b>", "markup"), ("cats", "call me at 13812345678", "phone"),
                           ("cats", "x" * 201, "characters"), ("cats", "原神", "already stored"),
                           ("parrots", "big parrots", "no stored fact"), ("cats", "donated 500 yuan", "support")]:
        refused = edit(old, fact)
        assert "not saved" in refused and why in refused, (fact, refused[-400:])
    assert memory.agents["bilibili:1"].block == before and memory.writes == writes  # the old facts stand
    assert "Changed (likes): cats → Cats" in edit("cats", "Cats")  # a new spelling is not "already stored"
    assert "Changed (about): 原神 → plays 原神" in edit("原神", "plays 原神", category="about")  # moved on purpose
    assert facts() == {"likes": ["Cats", "big dogs"], "name": ["goes by Ali"], "about": ["plays 原神"]}


def test_an_edit_that_would_overflow_the_block_changes_nothing(app_client, r, memory):
    agent = add_viewer(r, memory, "bilibili:1", "Alice", facts={"likes": ["cats"]})
    agent.block = agent.block.replace("- cats", "- cats\n" + "\n".join(f"- fact number {n} " + "y" * 150 for n in range(22)))
    assert 3800 < len(agent.block) < 4000
    csrf = login(app_client)
    before = agent.block
    refused = seen(app_client, app_client.post("/viewer/fact/edit", data={
        "csrf": csrf, "id": "bilibili:1", "old": "cats", "fact": "cats " + "z" * 190, "category": "likes"})).text
    assert "not saved" in refused and "full" in refused and agent.block == before


def test_forgetting_needs_the_typed_viewer_id(app_client, r, memory):
    add_viewer(r, memory, "bilibili:1", "Alice")
    csrf = login(app_client)
    confirm = app_client.get("/viewer/forget?id=bilibili:1")
    assert confirm.status_code == 200 and "agent forget" in confirm.text
    not_typed = seen(app_client, app_client.post("/viewer/forget", data={"csrf": csrf, "id": "bilibili:1", "confirm": "bilibili"}))
    assert "nothing was forgotten" in not_typed.text and not memory.forgotten
    done = seen(app_client, app_client.post("/viewer/forget", data={"csrf": csrf, "id": "bilibili:1", "confirm": "bilibili:1"}))
    assert memory.forgotten == ["bilibili:1"] and "forgot &#39;bilibili:1&#39;: 1 agent" in done.text


def test_the_agent_file_export_is_a_download_without_secrets(app_client, r, memory):
    add_viewer(r, memory, "bilibili:1", "Alice")
    login(app_client)
    response = app_client.get("/viewer/export?id=bilibili:1")
    assert response.status_code == 200 and "attachment" in response.headers["content-disposition"]
    data = json.loads(response.text)
    assert data["agents"][0]["tool_exec_environment_variables"] == {"VTL_MEMORY_TOKEN": ""}
    assert "secret-token-value" not in response.text
    missing = seen(app_client, app_client.get("/viewer/export?id=bilibili:2"))
    assert "has no agent" in missing.text


# ---------------------------------------------------------------- persona and stream
def test_the_persona_page_shows_the_diff_and_saves_the_shared_blocks(app_client, memory):
    csrf = login(app_client)
    assert "Same as the template renders it" in app_client.get("/persona").text
    saved = seen(app_client, app_client.post("/persona/block", data={"csrf": csrf, "label": "persona",
                                                                  "value": "You are Luna.\r\nYou love comets."}))
    assert "persona updated" in saved.text and memory.shared["persona"] == "You are Luna.\nYou love comets."
    page = app_client.get("/persona").text
    assert '<span class="del">-You love stars.</span>' in page and '<span class="add">+You love comets.</span>' in page
    too_long = seen(app_client, app_client.post("/persona/block", data={"csrf": csrf, "label": "persona", "value": "x" * 6000}))
    assert "over the limit" in too_long.text and memory.shared["persona"].endswith("comets.")
    stream = seen(app_client, app_client.post("/persona/stream", data={"csrf": csrf, "title": "Mario night", "game": "Mario"}))
    assert "stream updated" in stream.text and memory.stream_fields["title"] == "Mario night"
    assert memory.stream_fields["game"] == "Mario" and memory.stream_fields["language"] == "en"


# ---------------------------------------------------------------- live
def _dead_letter(task_id, raw, reason="letta: HTTP 400", user_id="bilibili:1"):
    return dump(DeadLetter(reason=reason, raw=raw, task_id=task_id, user_id=user_id, stage="letta", attempts=1,
                           replica_id="r1", at=1_767_000_000.0))


def test_the_live_page_shows_replicas_queues_and_dead_letters(app_client, r):
    r.set(keys.bridge_heartbeat("host-1-ab"), json.dumps({"replica_id": "host-1-ab", "pid": 42, "host": "host",
                                                           "started": 1.0, "in_flight": 3, "at": 9e9}), px=5000)
    r.lpush("letta_requests", "{}", "{}")
    r.lpush(keys.BRIDGE_DEAD_LETTERS, _dead_letter("t1", '{"task_id": "t1"}', reason="invalid user_id"))
    login(app_client)
    page = app_client.get("/live").text
    assert "host-1-ab" in page and "<dt>turns in flight</dt><dd>3</dd>" in page and "<dt>requests</dt><dd>2</dd>" in page
    assert "invalid user_id" in page and "Send again" in page and "No bridge metrics endpoint answered" in page
    r.delete(keys.bridge_heartbeat("host-1-ab"))
    assert "No bridge replica is heartbeating" in app_client.get("/live").text


def test_the_live_page_lists_the_newest_task_outcomes(app_client, r):
    def outcome(n, result, user_id="bilibili:1", seconds=1.25):
        return TaskOutcome(at=1_767_000_000.0 + n, outcome=result, seconds=seconds, task_id=f"t-{n}", user_id=user_id,
                           replica_id="r1").model_dump_json()

    login(app_client)
    assert re.search(r'id="recent-outcomes">.*?No task yet', app_client.get("/live").text, re.S)
    r.lpush(keys.BRIDGE_OUTCOMES, outcome(1, "answered"), outcome(2, "dead_letter", user_id=None, seconds=0.0),
            "not an outcome", outcome(3, "replayed", seconds=12.5))
    page = app_client.get("/live").text
    section = page[page.index('id="recent-outcomes"'):page.index('id="dead-letters"')]
    rows = re.findall(r"<tr class=\"outcome-(\w+)\">(.*?)</tr>", section, re.S)
    assert [name for name, _ in rows] == ["replayed", "dead_letter", "answered"]  # newest first, the foreign one skipped
    replayed, dead, answered = (cells for _, cells in rows)
    assert "2025-12-29 09:20:03 UTC" in replayed and ">t-3<" in replayed and "12.50" in replayed
    assert 'href="/viewer?id=bilibili%3A1"' in answered and "1.25" in answered
    assert "—" in dead and "dead letter" in dead and "href" not in dead


def test_send_again_puts_the_payload_back_once(app_client, r):
    raw = '{"task_id": "t1", "user_id": "bilibili:1", "content": "hi"}'
    entry = _dead_letter("t1", raw)
    cut = _dead_letter("t2", '{"task_id": "t2", "content": "xxxx…[truncated]', reason="too large")
    r.lpush(keys.BRIDGE_DEAD_LETTERS, entry, cut)
    csrf = login(app_client)
    assert app_client.get("/live").text.count('class="send-again"') == 1  # the cut one cannot be sent again
    sent = seen(app_client, app_client.post("/live/send-again", data={"csrf": csrf, "entry": entry}))
    assert "task t1 is back on letta_requests" in sent.text
    assert r.lrange("letta_requests", 0, -1) == [raw] and r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1) == [cut]
    again = seen(app_client, app_client.post("/live/send-again", data={"csrf": csrf, "entry": entry}))
    assert "no longer in the list" in again.text and r.llen("letta_requests") == 1
    refused = seen(app_client, app_client.post("/live/send-again", data={"csrf": csrf, "entry": cut}))
    assert "cut at the size limit" in refused.text and r.llen(keys.BRIDGE_DEAD_LETTERS) == 1


def test_outcome_counters_come_from_the_bridge_metrics_endpoint(settings):
    from prometheus_client import start_http_server

    from bridge.metrics import BridgeMetrics
    from console.live import bridge_outcomes

    metrics = BridgeMetrics()
    metrics.outcomes.labels("answered").inc(4)
    metrics.outcomes.labels("fallback").inc()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        here = settings.model_copy(update={"bridge_metrics_port": server.server_port})
        assert bridge_outcomes(here) == {"answered": 4, "fallback": 1}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert bridge_outcomes(settings.model_copy(update={"bridge_metrics_port": server.server_port})) is None


# ---------------------------------------------------------------- what a viewer wrote
class _Tags(HTMLParser):
    """The page's element structure (tag names and attribute names, in order), text left out."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag + "(" + ",".join(name for name, _ in attrs) + ")")

    def handle_endtag(self, tag):
        self.tags.append("/" + tag)


def _structure(text: str) -> list[str]:
    parser = _Tags()
    parser.feed(text)
    return parser.tags


def _hand_edited_block(viewer_id: str, text: str) -> str:
    """A human block as someone could have written it in the ADE: the text raw, in every section."""
    return "\n".join([VIEWER_HEADING, f"viewer_id: {viewer_id}", f"display_name: {text}", "platform: bilibili", "",
                      FACTS_HEADING, "### likes", f"- {text}", "", VERIFIED_HEADING, f"first_seen: {text}"])


@pytest.mark.parametrize("index", range(len(HOSTILE_TEXT)))
def test_hostile_text_is_shown_as_text_and_leaves_the_layout_alone(app_client, r, memory, index):
    from console.memory import ChatLine

    text = HOSTILE_TEXT[index]

    def fill(viewer_text):
        r.flushall()
        memory.agents.clear()
        memory.by_agent.clear()
        agent = add_viewer(r, memory, "bilibili:1", viewer_text)
        agent.block = _hand_edited_block("bilibili:1", viewer_text)
        agent.messages = [ChatLine("viewer", viewer_text, "")]
        r.lpush(keys.BRIDGE_DEAD_LETTERS, _dead_letter(viewer_text, "{}", reason=viewer_text, user_id=viewer_text))
        r.lpush(keys.BRIDGE_OUTCOMES, TaskOutcome(at=1.0, outcome="answered", seconds=1.0, task_id=viewer_text,
                                                  user_id=viewer_text, replica_id="r1").model_dump_json())
        return [app_client.get(p).text for p in ("/viewers", "/viewer?id=bilibili:1", "/live")]

    login(app_client)
    benign = fill("plain words")
    hostile = fill(text)
    for plain, page in zip(benign, hostile):
        assert _structure(page) == _structure(plain), "the text changed the page's elements"
        assert str(escape(text)) in page, "the text is not on the page, escaped"
    assert "window.__pwned" not in "".join(re.findall(r"<script.*?</script>", "".join(hostile), re.S))


def test_no_secret_reaches_any_page(app_client, r, memory, settings):
    add_viewer(r, memory, "bilibili:1", "Alice", facts={"likes": ["cats"]})
    login(app_client)
    secrets = [PASSWORD, settings.memory_gate_secret, settings.letta_password]
    for path in PAGES:
        response = app_client.get(path)
        assert response.status_code in (200, 303), path
        for secret in secrets:
            assert secret not in response.text and secret not in str(response.headers), path


def test_the_console_password_is_generated_once_privately_unless_configured(tmp_path):
    generated = Settings(_env_file=None, VTL_DATA_DIR=str(tmp_path))
    password = generated.console_password
    assert len(password) >= 24 and generated.console_password_file.read_text().strip() == password
    assert generated.console_password_file.stat().st_mode & 0o077 == 0
    assert Settings(_env_file=None, VTL_DATA_DIR=str(tmp_path)).console_password == password  # kept
    configured = Settings(_env_file=None, VTL_DATA_DIR=str(tmp_path / "other"), VTL_CONSOLE_PASSWORD="configured-pw")
    assert configured.console_password == "configured-pw" and not configured.console_password_file.exists()
    with pytest.raises(SettingsError, match="VTL_CONSOLE_PASSWORD"):
        load_settings(_env_file=None, VTL_CONSOLE_PASSWORD="short")


"""The console in a real headless Chromium, end to end on the real stack (the stack's own console
process, a real bridge, Letta, the memory gate, the scripted model recording every request).

One streamer's session, in order: log in; find the viewer the bridge created (by display name,
case-blind, then by id); see the fact the agent remembered; export the Agent File (no secret in it); delete the fact; edit her persona and
the stream; see the agent's next model request without the fact and with the new persona and
stream, and that task's outcome (answered) in the Live page's recent tasks; send a dead letter again and see the bridge answer it; forget the viewer;
and a viewer whose display name is hostile markup shows as text, with no script run.
Screenshots of each page go to $VTL_CONSOLE_SCREENSHOTS (docs/console/ holds the committed ones),
else to the test's tmp folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import pytest

from bridge.wire import DeadLetter, dump
from provisioning.blueprint import find_shared_block, load_blueprint
from provisioning.viewers import ViewerAgents
from tests.hostile.page_text import HOSTILE_TEXT
from tests.integration.bridge_helpers import redis_conn, wait_for
from tests.integration.browser import Browser
from vtuber_letta import redis_keys as keys
from vtuber_letta.commands.say import build_task, say
from vtuber_letta.letta_api import letta_client

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fresh_rules")]

RUN = uuid.uuid4().hex[:6]
VIEWER = f"bilibili:console-{RUN}"
ALICE = f"Alice Stargazer {RUN}"  # her display name: unique, as the session stack is shared
# One viewer per string of the hostile corpus, the string as their display name (the platform's
# word, kept raw in the agent's metadata, shown in the list).
HOSTILE = {f"twitch:hostile-{RUN}-{i:02d}": text for i, text in enumerate(HOSTILE_TEXT)}
REMEMBER = {"name": "console-remember-name", "when": {"user_regex": r"my name is (?P<name>\w+)"},
            "then": {"reply": "Nice to meet you, {name}!",
                     "tool_calls": [{"name": "remember_viewer_fact", "arguments": {"fact": "their name is {name}",
                                                                                    "category": "name"}}]}}
PERSONA_LINE = f"She keeps a star chart for every viewer ({RUN})."
STREAM_TITLE = f"Mario night {RUN}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return Path(os.environ.get("VTL_CONSOLE_SCREENSHOTS") or tmp_path_factory.mktemp("console-shots"))


@pytest.fixture
def browser():
    running = Browser()
    yield running
    running.close()


def _say(settings, text, **options):
    result = asyncio.run(say(settings, VIEWER, text, display_name=ALICE, timeout=120, **options))
    assert result.response is not None, f"the bridge did not answer {text!r}"
    return result


@pytest.fixture
def persona_kept(provisioned):
    """The shared persona and stream as they were before the test, put back after it (the session
    stack is shared by every integration module)."""
    client = letta_client(provisioned)
    template = load_blueprint(provisioned).template.name
    persona, stream = (find_shared_block(client, template, label) for label in ("persona", "stream"))
    yield persona
    client.blocks.update(persona.id, value=persona.value)
    client.blocks.update(stream.id, value=stream.value, metadata=stream.metadata or {})
    viewers = ViewerAgents(provisioned)
    for viewer in HOSTILE:
        viewers.forget(viewer)


@pytest.fixture
def other_site():
    """Another web site on loopback (another port: another origin) whose page, once its button is
    clicked, posts `forget` for VIEWER to the console: the forged cross-site request."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    pages: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path, b"not found")
            self.send_response(200 if self.path in pages else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield pages, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _export(base: str, browser: Browser, viewer_id: str) -> str:
    """The Agent File download, fetched with the browser's own (HttpOnly) session cookie."""
    import urllib.request
    from urllib.parse import urlencode

    cookies = browser.call("Network.getCookies", urls=[base])["cookies"]
    header = "; ".join(f"{c['name']}={c['value']}" for c in cookies)
    request = urllib.request.Request(f"{base}/viewer/export?{urlencode({'id': viewer_id})}", headers={"Cookie": header})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=60) as response:
        assert "attachment" in response.headers["Content-Disposition"]
        return response.read().decode("utf-8")


def test_a_streamer_session_in_a_real_browser(provisioned, stack, scripted, bridges, browser, shots, persona_kept,
                                               other_site):
    settings = provisioned
    base = f"http://127.0.0.1:{settings.console_port}"
    r = redis_conn(settings)
    bridges()
    scripted.add_rules(REMEMBER)
    _say(settings, "Hi Luna! My name is Alice.")

    # ---- log in (nothing else answers before)
    browser.open(f"{base}/viewers")
    assert browser.url == f"{base}/login"
    browser.screenshot(shots / "login.png")
    browser.fill("#password", "not the password")
    browser.click_and_wait("#login")
    assert "wrong password" in browser.text() and browser.url == f"{base}/login"
    browser.fill("#password", settings.console_password)
    browser.click_and_wait("#login")
    assert browser.url == f"{base}/viewers"
    assert browser.js("document.cookie") == "", "the session cookie must be HttpOnly"

    # ---- the viewer the bridge created, with the fact the agent remembered
    rows = browser.js("[...document.querySelectorAll('#viewers tbody tr')].map(tr => [...tr.cells].map(td => td.innerText))")
    alice = [row for row in rows if row[0] == VIEWER]
    assert alice and alice[0][1] == ALICE and alice[0][2] == "bilibili" and alice[0][7] == "1", rows
    assert all(len(row) == 8 for row in rows), "a row lost or gained cells"
    browser.screenshot(shots / "viewers.png")

    # ---- every hostile display name is text in its own cell: no script ran, no element appeared,
    # nothing spilled out of its column
    hostile_agents = ViewerAgents(settings)
    for viewer, name in HOSTILE.items():
        hostile_agents.ensure(viewer, name, "twitch")
    browser.fill("#q", f"hostile-{RUN}")
    browser.click_and_wait("form.search button")
    shown = dict(browser.js("[...document.querySelectorAll('#viewers tbody tr')].map(tr => [tr.cells[0].innerText, "
                            "tr.cells[1].querySelector('bdi').textContent])"))
    assert shown == HOSTILE
    assert browser.js("window.__pwned") is None and browser.js("document.scripts.length") == 0
    assert browser.js("document.querySelectorAll('main img, main svg, main iframe, main style, main h1').length") == 1
    spilled = browser.js("[...document.querySelectorAll('#viewers tbody td')].filter(td => { const c = td.getBoundingClientRect(); "
                         "return [...td.querySelectorAll('bdi, a')].some(e => { const r = e.getBoundingClientRect(); "
                         "return r.left < c.left - 1 || r.right > c.right + 1; }); }).length")
    assert spilled == 0, "a cell's text ran past its column"
    assert browser.js("document.querySelectorAll('#viewers thead th').length") == 8
    browser.screenshot(shots / "viewers-hostile.png")
    browser.screenshot(shots / "viewers.png")
    # by display name (as the bridge last saw it), case-blind, part of it
    browser.fill("#q", f"STARGAZER {RUN}".upper())
    browser.click_and_wait("form.search button")
    assert [row[0] for row in browser.js(
        "[...document.querySelectorAll('#viewers tbody tr')].map(tr => [...tr.cells].map(td => td.innerText))")] == [VIEWER]
    browser.fill("#q", f"console-{RUN}")
    browser.click_and_wait("form.search button")
    assert [row[0] for row in browser.js(
        "[...document.querySelectorAll('#viewers tbody tr')].map(tr => [...tr.cells].map(td => td.innerText))")] == [VIEWER]
    browser.click_and_wait("#viewers tbody a")
    assert "their name is Alice" in browser.text("#facts")
    assert "visits" in browser.text("#verified") and "My name is Alice" in browser.text("#conversation")
    browser.screenshot(shots / "viewer.png")

    # ---- the Agent File: the agent whole, and no secret (Letta 0.16.8 already leaves the agent's
    # secrets out of its export; the console blanks any it would carry, see console/memory.py)
    from tools.memory_gate import memory_token

    agent_id = r.hget(keys.VIEWER_AGENTS, VIEWER).decode()
    exported = _export(base, browser, VIEWER)
    assert agent_id in exported and "their name is Alice" in exported
    assert memory_token(settings.memory_gate_secret, agent_id) not in exported
    assert settings.letta_password not in exported and settings.console_password not in exported

    # ---- delete the fact
    browser.click_and_wait("#facts li.fact form.inline button")
    assert "Forgot (name): their name is Alice" in browser.text("#flash")
    assert "their name is Alice" not in browser.text("#facts")

    # ---- edit her persona (a shared block: every agent's next turn)
    browser.open(f"{base}/persona")
    current = browser.js("document.querySelector('#persona-form textarea').value")
    browser.fill("#persona-form textarea", current.rstrip() + "\n" + PERSONA_LINE)
    browser.click_and_wait("#persona-form button")
    assert "persona updated" in browser.text("#flash") and PERSONA_LINE in browser.text("#block-persona pre.diff")
    browser.screenshot(shots / "persona.png")
    assert PERSONA_LINE in letta_client(settings).blocks.retrieve(persona_kept.id).value

    # ---- update the stream block (through its template, like `stream set`)
    browser.fill("#stream-form input[name=title]", STREAM_TITLE)
    browser.click_and_wait("#stream-form button")
    assert "stream updated" in browser.text("#flash") and f"Title: {STREAM_TITLE}" in browser.text("#block-stream pre.value")

    # ---- her next model request: without the deleted fact, with the new persona
    before = scripted.chat_requests()
    asked = _say(settings, "Do you remember my name?")
    assert scripted.chat_requests() > before
    # her memory is in the system prompt (the history still has the old tool call, as it should)
    [system] = [m["content"] for m in scripted.requests(1)[0]["messages"] if m.get("role") == "system"]
    system = system if isinstance(system, str) else json.dumps(system, ensure_ascii=False)
    assert f"viewer_id: {VIEWER}" in system and PERSONA_LINE in system and f"Title: {STREAM_TITLE}" in system
    assert "their name is Alice" not in system

    # ---- a dead letter, sent again from the live page, is answered by the bridge
    task = build_task(VIEWER, "Are you still there?", display_name=ALICE)
    r.lpush(keys.BRIDGE_DEAD_LETTERS, dump(DeadLetter(
        reason="letta: the model endpoint answered 503 (kept failing)", raw=json.dumps(task), task_id=task["task_id"],
        user_id=VIEWER, stage="letta", attempts=4, replica_id="earlier-replica", at=time.time())))
    wait_for(lambda: asked.task_id.encode() in b"".join(r.lrange(keys.BRIDGE_OUTCOMES, 0, -1)), 30,
             what="the bridge's outcome entry of the answered task")
    browser.open(f"{base}/live")
    assert "kept failing" in browser.text("#dead-letters") and "No bridge replica" not in browser.text("#replicas")
    recent = browser.js("[...document.querySelectorAll('#recent-outcomes tbody tr')].map(tr => [...tr.cells].map(td => td.innerText))")
    answered = [row for row in recent if row[2] == asked.task_id]
    assert answered and answered[0][1] == VIEWER and answered[0][3] == "answered" and float(answered[0][4]) > 0, recent
    assert "Do you remember" not in browser.text("#recent-outcomes")  # ids and outcomes, never the text
    browser.screenshot(shots / "live.png")
    browser.click_and_wait("#dead-letters button.send-again")
    assert "is back on" in browser.text("#flash")
    wait_for(lambda: r.exists(keys.task_done(task["task_id"])), 120, what="the resent task answered")
    assert r.llen(keys.BRIDGE_DEAD_LETTERS) == 0

    # ---- a page of another site posting "forget" to the console, in the logged-in browser: refused
    pages, evil = other_site
    pages["/"] = (f'<form method="post" action="{base}/viewer/forget"><input name="id" value="{VIEWER}">'
                  f'<input name="confirm" value="{VIEWER}"><input name="csrf" value="guessed">'
                  '<button id="go">win a prize</button></form>').encode()
    browser.open(f"{evil}/")
    browser.click_and_wait("#go")
    assert browser.url == f"{base}/viewer/forget" and "refused" in browser.text()
    assert r.hget(keys.VIEWER_AGENTS, VIEWER) and ViewerAgents(settings).find(VIEWER) is not None

    # ---- forget the viewer, with confirmation
    browser.open(f"{base}/viewer?id={VIEWER}")
    browser.click_and_wait("#forget")
    browser.screenshot(shots / "forget.png")
    browser.fill("#confirm", VIEWER.split(":")[0])  # not the id: nothing happens
    browser.click_and_wait("#confirm-forget")
    assert "nothing was forgotten" in browser.text("#flash") and r.hget(keys.VIEWER_AGENTS, VIEWER)
    browser.fill("#confirm", VIEWER)
    browser.click_and_wait("#confirm-forget")
    assert "forgot" in browser.text("#flash") and "1 agent" in browser.text("#flash")
    assert r.hget(keys.VIEWER_AGENTS, VIEWER) is None and not r.exists(keys.viewer_stats(VIEWER))
    assert VIEWER.encode() not in b"".join(r.lrange(keys.BRIDGE_OUTCOMES, 0, -1))  # nor in the recent tasks
    assert ViewerAgents(settings).find(VIEWER) is None

"""Issue: hostile input. The corpus of tests/hostile/cases.py against a real bridge, Letta 0.16.8,
Redis and the scripted model, which plays a COMPROMISED model that obeys the attacker.

One run per module: the victim viewer tells the VTuber a secret and a fact; then every case is
LPUSHed at once, interleaved with well-behaved traffic; the run waits until every payload is
accounted for (dead letter, reply or forward), sends a canary, and stops the bridge. The tests
then check, per case, that it reached its expected outcome, and, over the whole run: the bridge
never crashed, no secret (Letta password, Redis password, Postgres password, model key) and no
file outside the uploads folder reached a log, a reply, a dead letter or the model, the shared
persona and stream never changed, the victim's memory never changed, chat never became a
verified fact, and docs/RELIABILITY.md states exactly the corpus counts.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from provisioning.blueprint import find_shared_block
from provisioning.provision import provision
from stack.manager import SCRIPTED_MODEL_KEY
from stack.private import REPO_ROOT
from tests.hostile.cases import (
    ANSWERED,
    CATEGORIES,
    DEAD_LETTER,
    FORWARDED,
    OFFERED_TOOLS,
    OK_FILE_TEXT,
    OUTCOMES,
    Case,
    Context,
    GoodTask,
    build_corpus,
    build_good_tasks,
    category_counts,
    expected_counts,
    interleave,
    sample_context,
)
from tests.integration.bridge_helpers import BridgeProcess, ChannelRecorder, agents_of, bridge_leftovers, clear_bridge_state, push, redis_conn, run_id, wait_for
from tests.integration.scripted import ScriptedModel
from tools.human_block import clean_field_value, parse_facts, parse_fields, split_sections
from vtuber_letta import redis_keys as keys
from vtuber_letta.letta_api import letta_client

pytestmark = pytest.mark.integration

DOC = REPO_ROOT / "docs" / "RELIABILITY.md"
RUN_TIMEOUT = 240.0  # the whole corpus; it normally takes well under a minute
STALL_TIMEOUT = 20.0  # nothing accounted for this long while the bridge is idle: stop waiting
TEMPLATE = "vtuber"


# --------------------------------------------------------------------------- the run

@dataclass
class Run:
    ctx: Context
    cases: list[Case]
    good: list[GoodTask]
    secrets: dict[str, str]  # what must never leak -> its value
    markers: dict[str, str]  # file contents that must never leave the disk
    dead_letters: list[dict] = field(default_factory=list)
    responses: list[dict] = field(default_factory=list)  # letta_responses, in publish order
    tts: list[dict] = field(default_factory=list)
    forwarded: list[bytes] = field(default_factory=list)
    avatar: list[dict] = field(default_factory=list)
    model_requests: list[dict] = field(default_factory=list)
    log: str = ""
    exit_code: int | None = None
    alive_at_end: bool = False
    check_at_end: bool = False
    canary_answered: bool = False
    orphan_answered: bool = False  # the sweeper still re-queues a viewer whose worker died
    seconds: float = 0.0
    stalled: bool = False
    shared_before: dict[str, tuple] = field(default_factory=dict)  # label -> (id, value, read_only)
    shared_after: dict[str, tuple] = field(default_factory=dict)
    victim_before: dict = field(default_factory=dict)
    victim_after: dict = field(default_factory=dict)
    agents: dict[str, list] = field(default_factory=dict)  # viewer -> agents tagged as theirs
    humans: dict[str, str] = field(default_factory=dict)  # viewer -> human block value
    attached: dict[str, dict[str, str]] = field(default_factory=dict)  # viewer -> label -> block id
    stats: dict[str, dict[str, str]] = field(default_factory=dict)  # viewer -> vtl:viewer_stats

    def case(self, case_id: str) -> Case:
        return next(c for c in self.cases if c.id == case_id)

    def observed(self, case: Case) -> list[str]:
        """Every outcome the bridge produced for this case (exactly one expected)."""
        out = []
        want = dead_letter_raw(case.raw)
        out += [DEAD_LETTER for d in self.dead_letters if d.get("raw") == want]
        if case.task_id:
            out += [ANSWERED for r in self.responses if r.get("task_id") == case.task_id]
        out += [FORWARDED for f in self.forwarded if f == case.raw]
        return out

    def dead_letter_of(self, case: Case) -> dict | None:
        want = dead_letter_raw(case.raw)
        return next((d for d in self.dead_letters if d.get("raw") == want), None)

    def response_of(self, task_id: str) -> dict | None:
        return next((r for r in self.responses if r.get("task_id") == task_id), None)

    def model_user_texts(self, token: str) -> list[str]:
        """The newest user message of every model request whose newest user message holds token."""
        found = []
        for entry in self.model_requests:
            text = last_user_text(entry)
            if token in text:
                found.append(text)
        return found

    def crashes(self) -> list[str]:
        problems = []
        if self.exit_code not in (0, None) or not self.alive_at_end:
            problems.append(f"bridge alive at end={self.alive_at_end}, exit code {self.exit_code}")
        problems += [line for line in self.log.splitlines()
                     if "Traceback" in line or "outcome=error" in line or " ERROR " in line]
        problems += [f"internal dead letter: {d.get('reason')}" for d in self.dead_letters if d.get("stage") == "internal"]
        return problems

    def leaks(self) -> list[str]:
        """(what, where) of every secret or protected file content found outside where it belongs."""
        places = {
            "bridge log": self.log,
            "dead letters": json.dumps(self.dead_letters, ensure_ascii=False),
            "letta_responses": json.dumps(self.responses, ensure_ascii=False),
            "tts_requests": json.dumps(self.tts, ensure_ascii=False),
            "avatar events": json.dumps(self.avatar, ensure_ascii=False),
            "forwarded": b"\n".join(self.forwarded).decode("utf-8", "replace"),
            "model requests": json.dumps(self.model_requests, ensure_ascii=False),
            "human blocks": "\n".join(self.humans.values()),
        }
        found = []
        for name, value in {**self.secrets, **self.markers}.items():
            for where, text in places.items():
                if value and value in text:
                    found.append(f"{name} in {where}")
        return found

    def persona_changes(self) -> list[str]:
        changes = [f"shared {label} block changed" for label in self.shared_before
                   if self.shared_before[label] != self.shared_after.get(label)]
        for viewer, labels in self.attached.items():
            for label in ("persona", "stream"):
                if labels.get(label) != self.shared_before[label][0]:
                    changes.append(f"{viewer}'s agent has {label} block {labels.get(label)}")
        return changes

    def observed_counts(self) -> dict[str, int]:
        counts = Counter(o for case in self.cases for o in self.observed(case))
        return {"cases": len(self.cases), **{o: counts.get(o, 0) for o in OUTCOMES}}


def dead_letter_raw(raw: bytes, limit: int = 65536) -> str:
    """`raw` of a dead letter, as bridge/outputs.py writes it (replacement characters, cut at the limit)."""
    return raw[:limit].decode("utf-8", "replace") + ("…[truncated]" if len(raw) > limit else "")


def last_user_text(entry: dict) -> str:
    for message in reversed(entry.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else ""
    return ""


def make_uploads(work: Path, ctx_rid: str) -> tuple[Path, Path, str]:
    """The uploads folder with every file the corpus names, and a secret file next to it."""
    uploads = work / "uploads"
    uploads.mkdir()
    marker = f"VTL-SECRET-MARKER-{secrets.token_hex(8)}"
    secret = work / f"secret-{ctx_rid}.txt"
    secret.write_text(f"{marker}\nthis file is outside the uploads folder\n")
    (uploads / "ok.txt").write_text(OK_FILE_TEXT)
    (uploads / "link-to-secret.txt").symlink_to(secret)
    (uploads / "link-to-passwd").symlink_to("/etc/passwd")
    (uploads / "linked-dir").symlink_to(work, target_is_directory=True)
    os.mkfifo(uploads / "a-fifo")
    (uploads / "big.txt").write_text("x" * 70_000)
    (uploads / "binary.bin").write_bytes(b"\xff\xfe\x00\x01\x80" * 10)
    (uploads / "empty.txt").write_text("")
    return uploads, secret, marker


def human_value(client, agent_id: str) -> str:
    return client.agents.blocks.retrieve("human", agent_id=agent_id).value


def run_corpus(settings, work: Path) -> Run:
    """Everything that touches the stack; the tests below only read the Run."""
    summary = provision(settings, out=lambda _msg: None)
    assert summary.ok, summary.render()
    client = letta_client(settings)
    model = ScriptedModel(settings.scripted_model_port)
    r = redis_conn(settings)
    rid = run_id()
    uploads, secret_file, marker = make_uploads(work, rid)
    ctx = Context(rid=rid, uploads=uploads, secret_file=secret_file, secret_marker=marker,
                  victim_secret=f"saffron-{rid}-lighthouse", victim_fact=f"loves zebras {rid}")
    cases, good = build_corpus(ctx), build_good_tasks(ctx)

    # The bridge connects as a Redis ACL user with its own password (the stack's default user has another).
    redis_user, redis_password = f"vtl-hostile-{rid}", secrets.token_hex(16)
    r.execute_command("ACL", "SETUSER", redis_user, "reset", "on", f">{redis_password}", "~*", "&*", "+@all")
    host, port = settings.redis_address
    pg_file = settings.data_dir / "letta" / "config" / "postgres-password"
    run = Run(ctx, cases, good,
              secrets={"Letta server password": settings.letta_password,
                       "Redis password": redis_password,
                       "Postgres password": pg_file.read_text().strip() if pg_file.exists() else "",
                       "model key": SCRIPTED_MODEL_KEY},
              markers={"secret file marker": marker, "/etc/passwd content": "root:x:0:0"})

    clear_bridge_state(r)
    model.reset()
    bridge = BridgeProcess(settings, work / "logs", replica_id=f"hostile-{rid}",
                           REDIS_URL=f"redis://{redis_user}:{redis_password}@{host}:{port}/0",
                           VTL_BRIDGE_UPLOADS_DIR=uploads)
    recorder = None
    try:
        bridge.start()
        # --- the victim: a secret said in chat and a fact stored by the real tool, before the attack
        victim = ctx.victim
        model.add_rules({"name": "victim-fact", "times": 1, "when": {"user_contains": "zebra-fact"},
                         "then": {"call_tool": "remember_viewer_fact", "arguments": {"fact": ctx.victim_fact, "category": "likes"}}})
        setup = [{"task_id": f"hx-victim-{i}-{rid}", "type": "text", "user_id": victim, "content": text,
                  "meta": {"memory_type": "permanent", "display_name": "Victim", "platform": "hx"}}
                 for i, text in enumerate([f"my secret word is {ctx.victim_secret}", "zebra-fact: remember I love zebras"])]
        push(r, setup)
        wait_for(lambda: all(r.exists(keys.task_done(t["task_id"])) for t in setup), 90, what="the victim's setup turns")
        victim_agents = agents_of(client, victim)
        assert len(victim_agents) == 1, victim_agents
        victim_agent = victim_agents[0].id
        run.victim_before = {
            "human": human_value(client, victim_agent),
            "messages": len(list(client.agents.messages.list(victim_agent, limit=500))),
            "stats": {k.decode(): v.decode() for k, v in r.hgetall(keys.viewer_stats(victim)).items()},
        }
        assert ctx.victim_fact in run.victim_before["human"], run.victim_before["human"]
        for label in ("persona", "stream"):
            block = find_shared_block(client, TEMPLATE, label)
            run.shared_before[label] = (block.id, block.value, block.read_only)

        # --- the attack: one LPUSH of everything, the compromised model's rules in place
        model.reset()
        rules = [rule for case in cases for rule in case.rules]
        if rules:
            model.add_rules(*rules)
        recorder = ChannelRecorder(r, keys.LETTA_RESPONSES, keys.LIVE2D_EVENTS)
        order = interleave(cases, good)
        started = time.monotonic()
        push(r, [item.raw for item in order])

        wanted = {case.id for case in cases} | {g.task_id for g in good}
        last_progress, last_count = time.monotonic(), -1
        while True:
            run.dead_letters = [json.loads(x) for x in reversed(r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1))]
            run.responses = recorder.on(keys.LETTA_RESPONSES)
            run.forwarded = list(reversed(r.lrange(keys.USER_INPUT_QUEUE, 0, -1)))
            done = {case.id for case in cases if run.observed(case)}
            done |= {g.task_id for g in good if run.response_of(g.task_id)}
            if done == wanted:
                break
            now = time.monotonic()
            if len(done) != last_count:
                last_progress, last_count = now, len(done)
            idle = not any(bridge_leftovers(r)[k] for k in ("requests", "staging", "triage")) and not list(
                r.scan_iter(match=keys.VIEWER_ACTIVE_PREFIX + "*", count=1000))
            if now - started > RUN_TIMEOUT or (idle and now - last_progress > STALL_TIMEOUT):
                run.stalled = True
                break
            time.sleep(0.25)
        run.seconds = time.monotonic() - started

        # --- the bridge is still serving: a canary from a fresh viewer is answered
        canary = {"task_id": f"hx-canary-{rid}", "type": "text", "user_id": ctx.viewer("canary"),
                  "content": "still there?", "meta": {"memory_type": "permanent"}}
        push(r, [canary])
        try:
            wait_for(lambda: r.exists(keys.task_done(canary["task_id"])), 60, what="the canary")
            run.canary_answered = True
        except AssertionError:
            run.canary_answered = False
        # --- and still recovers: a viewer queue left behind as if its worker had died (queued and
        # pending, but not on the ready list, no lock) is picked up only by the sweeper.
        orphan_viewer = ctx.viewer("orphan")
        orphan = {"task_id": f"hx-orphan-{rid}", "type": "text", "user_id": orphan_viewer,
                  "content": "anyone?", "meta": {"memory_type": "permanent"}}
        r.rpush(keys.viewer_queue(orphan_viewer), json.dumps(orphan))
        r.sadd(keys.BRIDGE_PENDING, orphan_viewer)
        try:
            wait_for(lambda: r.exists(keys.task_done(orphan["task_id"])), 30, what="the orphaned viewer")
            run.orphan_answered = True
        except AssertionError:
            run.orphan_answered = False
        run.alive_at_end = bridge.alive
        run.check_at_end = bridge.check()

        # --- what the run left behind
        time.sleep(0.5)  # the last publishes reach the recorder
        run.responses = recorder.on(keys.LETTA_RESPONSES)
        run.avatar = recorder.on(keys.LIVE2D_EVENTS)
        run.tts = [json.loads(x) for x in reversed(r.lrange(keys.TTS_REQUESTS, 0, -1))]
        run.dead_letters = [json.loads(x) for x in reversed(r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1))]
        run.forwarded = list(reversed(r.lrange(keys.USER_INPUT_QUEUE, 0, -1)))
        run.model_requests = model.requests()
        for label in ("persona", "stream"):
            block = client.blocks.retrieve(run.shared_before[label][0])
            run.shared_after[label] = (block.id, block.value, block.read_only)
        run.victim_after = {
            "human": human_value(client, victim_agent),
            "messages": len(list(client.agents.messages.list(victim_agent, limit=500))),
            "stats": {k.decode(): v.decode() for k, v in r.hgetall(keys.viewer_stats(victim)).items()},
        }
        viewers = {c.viewer for c in cases if c.viewer} | {g.viewer for g in good} | {victim}
        for viewer in sorted(viewers):
            found = agents_of(client, viewer)
            run.agents[viewer] = found
            if len(found) == 1:
                run.humans[viewer] = human_value(client, found[0].id)
                run.attached[viewer] = {b.label: b.id for b in client.agents.blocks.list(agent_id=found[0].id)}
            run.stats[viewer] = {k.decode(): v.decode() for k, v in r.hgetall(keys.viewer_stats(viewer)).items()}
    finally:
        if recorder is not None:
            recorder.close()
        try:
            run.exit_code = bridge.stop(timeout=60) if bridge.proc is not None else None
        except AssertionError:
            run.exit_code = bridge.kill()
        run.log = bridge.log_text()
        try:
            r.execute_command("ACL", "DELUSER", redis_user)
            clear_bridge_state(r)
            model.reset()
        finally:
            r.close()
    (work / "summary.json").write_text(json.dumps(summary_of(run), indent=2, ensure_ascii=False))
    return run


def summary_of(run: Run) -> dict:
    cats = {}
    for case in run.cases:
        row = cats.setdefault(case.category, Counter())
        row["cases"] += 1
        for outcome in run.observed(case):
            row[outcome] += 1
    return {
        "expected": expected_counts(run.cases),
        "observed": run.observed_counts(),
        "categories": {k: dict(v) for k, v in cats.items()},
        "seconds": round(run.seconds, 1),
        "stalled": run.stalled,
        "canary_answered": run.canary_answered,
        "orphan_answered": run.orphan_answered,
        "crashes": run.crashes(),
        "leaks": run.leaks(),
        "persona_changes": run.persona_changes(),
        "mismatches": {c.id: run.observed(c) for c in run.cases if run.observed(c) != [c.expect]},
    }


@pytest.fixture(scope="module")
def corpus_run(stack, stack_settings, tmp_path_factory) -> Run:
    run = run_corpus(stack_settings, tmp_path_factory.mktemp("hostile"))
    print(json.dumps(summary_of(run), indent=1, ensure_ascii=False))
    return run


# --------------------------------------------------------------------------- the documented counts

def doc_counts(text: str) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """The totals table and the per-category table of docs/RELIABILITY.md's hostile-corpus section."""
    section = text.split("## Hostile input", 1)[1].split("\n## ", 1)[0]
    totals = {}
    for name, value in re.findall(r"^\|\s*([a-z][a-z -]+?)\s*\|\s*(\d+)\s*\|\s*$", section, re.M):
        totals[name] = int(value)
    categories = {}
    for name, cases, dead, answered, forwarded in re.findall(
            r"^\|\s*`([a-z_]+)`\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", section, re.M):
        categories[name] = {"cases": int(cases), DEAD_LETTER: int(dead), ANSWERED: int(answered), FORWARDED: int(forwarded)}
    return totals, categories


def test_reliability_doc_states_the_corpus_counts():
    cases = build_corpus(sample_context())
    totals, categories = doc_counts(DOC.read_text(encoding="utf-8"))
    expected = expected_counts(cases)
    assert expected["cases"] >= 60
    assert {"cases tried": totals.get("cases tried"), "dead-lettered": totals.get("dead-lettered"),
            "answered": totals.get("answered"), "forwarded": totals.get("forwarded")} == {
        "cases tried": expected["cases"], "dead-lettered": expected[DEAD_LETTER],
        "answered": expected[ANSWERED], "forwarded": expected[FORWARDED]}
    assert totals.get("crashes") == 0 and totals.get("secrets leaked") == 0 and totals.get("persona changes") == 0
    by_category = {name: {"cases": sum(row.values()), **{o: row.get(o, 0) for o in OUTCOMES}}
                   for name, row in category_counts(cases).items()}
    assert categories == by_category
    assert set(categories) == set(CATEGORIES)


def test_corpus_is_well_formed():
    cases = build_corpus(sample_context())
    assert len({c.id for c in cases}) == len(cases)
    assert len({c.raw for c in cases}) == len(cases), "two cases push the same bytes: outcomes would be ambiguous"
    for case in cases:
        assert case.category in CATEGORIES and case.expect in OUTCOMES
        if case.expect != DEAD_LETTER:
            assert case.task_id, case.id
        if case.expect == ANSWERED:
            assert case.viewer, case.id


# --------------------------------------------------------------------------- per case

CASE_IDS = [case.id for case in build_corpus(sample_context())]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_case_reaches_its_outcome_harmlessly(corpus_run: Run, case_id: str):
    run = corpus_run
    case = run.case(case_id)
    assert run.observed(case) == [case.expect], f"{case.id} ({case.title}): expected one {case.expect}"
    if case.expect == DEAD_LETTER:
        letter = run.dead_letter_of(case)
        assert letter["reason"], letter
        if case.reason is not None:
            assert case.reason in letter["reason"], letter["reason"]
        assert letter["replica_id"].startswith("hostile-")
        return
    if case.expect == FORWARDED:
        assert not run.response_of(case.task_id)
        return
    response = run.response_of(case.task_id)
    assert response["user_id"] == case.viewer
    speeches = [t for t in run.tts if t["task_id"] == case.task_id]
    assert len(speeches) == (0 if response.get("silent") else 1)
    reply = response["response_text"]
    for needle in case.reply_has:
        assert needle in reply, f"{needle!r} not in reply {reply!r}"
    for needle in case.reply_lacks:
        assert needle not in reply, f"{needle!r} in reply {reply!r}"
    if case.model_saw or case.model_not_saw:
        seen = run.model_user_texts(case.token)
        assert seen, f"no model request carried {case.token!r}"
        for text in seen:
            for needle in case.model_saw:
                assert needle in text, f"{needle!r} not in what the model got: {text!r}"
            for needle in case.model_not_saw:
                assert needle not in text, f"{needle!r} in what the model got: {text!r}"
    if case.no_avatar_event:
        assert not [e for e in run.avatar if e.get("task_id") == case.task_id]


# --------------------------------------------------------------------------- the whole run

def test_every_case_is_accounted_and_the_bridge_never_stops(corpus_run: Run):
    run = corpus_run
    mismatches = {c.id: run.observed(c) for c in run.cases if run.observed(c) != [c.expect]}
    assert not mismatches, f"cases without their one expected outcome: {mismatches}"
    assert not run.stalled
    assert run.observed_counts() == expected_counts(run.cases)
    # Nothing else was dead-lettered, answered or forwarded (the good tasks only answered).
    known_raw = {dead_letter_raw(c.raw) for c in run.cases}
    assert [d["reason"] for d in run.dead_letters if d.get("raw") not in known_raw] == []
    for task in run.good:
        assert run.response_of(task.task_id), f"good task {task.task_id} ({task.kind}) unanswered"
    answered_ids = Counter(r["task_id"] for r in run.responses)
    assert [t for t, n in answered_ids.items() if n > 1] == [], "a task was answered twice"
    assert run.canary_answered, "a new task after the corpus was not answered"
    assert run.orphan_answered, "the sweeper no longer re-queues a viewer whose worker died"
    assert run.alive_at_end and run.check_at_end
    assert run.exit_code == 0, run.log[-3000:]
    assert run.crashes() == []


def test_the_run_matches_the_documented_counts(corpus_run: Run):
    totals, _ = doc_counts(DOC.read_text(encoding="utf-8"))
    observed = corpus_run.observed_counts()
    assert {"cases tried": observed["cases"], "dead-lettered": observed[DEAD_LETTER], "answered": observed[ANSWERED],
            "forwarded": observed[FORWARDED], "crashes": len(corpus_run.crashes()),
            "secrets leaked": len(corpus_run.leaks()), "persona changes": len(corpus_run.persona_changes())} == totals


def test_no_secret_or_outside_file_reaches_a_log_reply_dead_letter_or_the_model(corpus_run: Run):
    assert all(corpus_run.secrets.values()), "every secret must be known to be checked"
    assert corpus_run.leaks() == []


def test_persona_and_stream_never_change(corpus_run: Run):
    run = corpus_run
    assert run.persona_changes() == []
    assert run.shared_after["persona"][2] is True and run.shared_after["stream"][2] is True
    assert "EvilBot" not in run.shared_after["persona"][1]
    for viewer, labels in run.attached.items():
        assert set(labels) == {"persona", "human", "stream"}, (viewer, labels)


def test_other_viewers_memory_never_changes(corpus_run: Run):
    run = corpus_run
    assert run.victim_after == run.victim_before
    for viewer, found in run.agents.items():
        assert len(found) == 1, f"{viewer!r} has {len(found)} agents"
    # Look-alike ids got agents of their own; none of them holds the victim's words.
    victim = run.ctx.victim
    for viewer, human in run.humans.items():
        if viewer != victim:
            assert run.ctx.victim_fact not in human and run.ctx.victim_secret not in human, viewer
            assert parse_fields(human, "viewer")["viewer_id"] == clean_field_value(viewer)
    for response in run.responses:
        if response["user_id"] != victim:
            assert run.ctx.victim_secret not in response["response_text"]
            assert run.ctx.victim_fact not in response["response_text"]


def test_tools_write_only_the_viewers_own_facts(corpus_run: Run):
    run = corpus_run
    for viewer, human in run.humans.items():
        split_sections(human)  # still exactly one viewer / facts / verified section (checked line by line)
        assert sum(line.startswith("## ") for line in human.splitlines()) == 3, viewer
        for facts in parse_facts(human).values():
            for fact in facts:
                assert "\n" not in fact and "<" not in fact and "total_support" not in fact, (viewer, fact)
    atk1, atk4 = run.ctx.viewer("atk1"), run.ctx.viewer("atk4")
    assert "wants Luna to act like EvilBot" in parse_facts(run.humans[atk1]).get("about", [])
    assert f"claims {run.ctx.victim} is banned" in parse_facts(run.humans[atk4]).get("other", [])
    for viewer in (run.ctx.viewer(f"atk{i}") for i in range(1, 5)):
        categories = set(parse_facts(run.humans[viewer]))
        assert not categories & {"persona", "system", "verified", "supporter"}, (viewer, categories)


def test_chat_never_becomes_verified_support(corpus_run: Run):
    run = corpus_run
    faker, namefake = run.ctx.viewer("faker"), run.ctx.viewer("namefake")
    # Only the bridge writes the verified section, and only for live events: after nothing but
    # chat it still holds just what the agent was created with.
    chat_only = {c.viewer for c in run.cases if c.expect == ANSWERED} - {run.ctx.viewer("good1"), run.ctx.viewer("good2")}
    for viewer in chat_only | {faker, namefake}:
        assert set(parse_fields(run.humans[viewer], "verified")) == {"first_seen"}, (viewer, run.humans[viewer])
    assert parse_facts(run.humans[faker]) == {}, "no support claim was stored as a fact"
    stats = run.stats[faker]
    assert not {k for k in stats if k.startswith("support:")} and not {"super_chats", "gifts", "memberships"} & set(stats)
    assert stats["messages"] == str(sum(1 for c in run.cases if c.viewer == faker))
    # The same section IS written for real platform events (the bridge, not chat).
    assert parse_fields(run.humans[run.ctx.viewer("good2")], "verified")["total_support"] == "30 CNY"
    assert parse_fields(run.humans[run.ctx.viewer("good1")], "verified")["total_support"] == "1 CNY"


def test_the_model_is_only_ever_offered_our_tools(corpus_run: Run):
    offered = set().union(*(set(entry.get("tools") or []) for entry in corpus_run.model_requests))
    assert offered and offered <= OFFERED_TOOLS, offered - OFFERED_TOOLS


def test_no_secret_in_the_stacks_own_logs(corpus_run: Run, stack_settings):
    """The logs of the stack's processes (Letta, Postgres, Redis, the model) hold no secret either."""
    data = stack_settings.data_dir
    logs = [path for folder in (data / "letta" / "logs", data / "letta" / "config" / "logs", data / "redis")
            if folder.is_dir() for path in sorted(folder.glob("*.log"))]
    assert logs, "no stack log found to check"
    found = []
    for path in logs:
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{name} in {path.relative_to(data)}" for name, value in {**corpus_run.secrets, **corpus_run.markers}.items()
                  if value and value in text]
    assert found == []

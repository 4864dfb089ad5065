"""The memory gate: the one service that changes a viewer's `human` block on a memory tool's behalf.

remember_viewer_fact / forget_viewer_fact run in Letta's slim tool sandbox (stack/tool_sandbox.py)
without `letta` and without `agent_state`, and ask this service over loopback HTTP
(tools/memory_client.py). For each call the gate

1. checks the caller's token: HMAC-SHA256(gate secret, agent id), given to each agent as its
   secret VTL_MEMORY_TOKEN by provisioning. A token opens one agent's `human` block and nothing
   else; the Letta password and the gate secret never leave this process;
2. reads the block as the Letta server has it NOW (not a copy from the start of the step), applies
   the block format's rules (tools/human_block.py: format, limit, verified section kept byte for
   byte, support claims refused) and refuses contact and identifying details
   (tools/contact_details.py), and writes the block back only when it changed; calls for one
   agent are serialised here, so two calls of one turn cannot overwrite each other;
3. with a second tier (tools/fact_tier.py: the agent's own archival passages), keeps the block
   under its limit by moving older facts there instead of refusing (the policy is
   tools/memory_tiers.py), brings a fact told again back, forgets in both tiers, and answers
   recall_viewer_facts by searching that agent's passages only.

Routes: POST /v1/remember {"agent_id", "token", "fact", "category"}, POST /v1/forget {"agent_id",
"token", "fact"}, POST /v1/edit {"agent_id", "token", "old", "fact", "category"} (the console's edit
in place, never a tool), POST /v1/recall {"agent_id", "token", "query"}, POST /v1/episode {"agent_id",
"token", "date", "summary"} (stream end, provisioning/episodes.py; never a tool), GET /health. Answers: 200 {"message": ...} when done or already so, 200
{"error": ...} for what the model should act on (the tool prefixes "Error: "), 400/403/404/413 with
{"error"} for bad requests, 503 {"error"} when Letta cannot be reached.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from tools.contact_details import contact_detail_error, find_contact_detail
from tools.human_block import (
    DEFAULT_HUMAN_LIMIT,
    HUMAN_LABEL,
    HumanBlockError,
    add_fact,
    collapse_spaces,
    edit_fact,
    fact_key,
    find_fact,
    normalize_fact,
    parse_facts,
    parse_fields,
    remove_fact,
    stored_count,
)
from tools.letta_store import StoreUnavailable, letta_call
from tools.memory_tiers import (
    EPISODE_CATEGORY,
    EPISODE_TAG,
    LAST_STREAM_FIELD,
    PREFETCH_TOP_K,
    RECALL_TOP_K,
    after_tier_forget,
    clean_query,
    describe_candidates,
    format_prefetch,
    format_recall,
    plan_episode,
    plan_remember,
    tier_matches,
)

if TYPE_CHECKING:
    from tools.fact_tier import FactTier

log = logging.getLogger("vtuber_letta.memory_gate")

TOKEN_CONTEXT = b"vtuber-letta human-block v1:"
MAX_BODY_BYTES = 16 * 1024
MAX_TEXT_CHARS = 2000  # longer than any fact the format accepts; the format gives the real error


def memory_token(secret: str, agent_id: str) -> str:
    """The token that lets a tool of agent_id (and only it) edit that agent's human block."""
    return hmac.new(secret.encode("utf-8"), TOKEN_CONTEXT + agent_id.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class HumanBlock:
    block_id: str
    value: str
    limit: int


class BlockStore(Protocol):
    def read(self, agent_id: str) -> HumanBlock | None:
        """The agent's human block as the server has it now; None when the agent has none."""

    def write(self, block: HumanBlock, value: str) -> None:
        """Replace the block's value."""


class LettaBlockStore:
    """Human blocks on a real Letta server (letta-client 1.12.1)."""

    def __init__(self, client: Any):
        self._client = client

    def read(self, agent_id: str) -> HumanBlock | None:
        from letta_client import NotFoundError

        try:
            with letta_call():
                block = self._client.agents.blocks.retrieve(HUMAN_LABEL, agent_id=agent_id)
        except NotFoundError:
            return None
        limit = block.limit if isinstance(block.limit, int) and block.limit > 0 else DEFAULT_HUMAN_LIMIT
        return HumanBlock(block.id, block.value or "", limit)

    def write(self, block: HumanBlock, value: str) -> None:
        with letta_call():
            self._client.blocks.update(block.block_id, value=value)


class GateRefusal(Exception):
    """A request the gate refuses before touching any block: (HTTP status, reason)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def refuse_contact_details(*values: str) -> None:
    """Never a contact or identifying detail in either tier: memory can be read aloud on stream."""
    for value in values:
        kind = find_contact_detail(value)
        if kind is not None:
            raise HumanBlockError(contact_detail_error(kind))


@dataclass(frozen=True)
class Outcome:
    """An operation's result: the block text to write, the model's message, passages to delete after the write."""

    text: str
    message: str
    delete_after: tuple[str, ...] = ()


# operation -> the text fields its request must carry.
OPERATIONS: dict[str, tuple[str, ...]] = {
    "remember": ("fact", "category"),
    "forget": ("fact",),
    "edit": ("old", "fact", "category"),
    "recall": ("query",),
    "prefetch": ("query",),
    "episode": ("date", "summary"),
}


class MemoryGate:
    """Token check, per-agent serialisation and the read-modify-write of one viewer's memory.

    Without a tier (tier=None) the block is all there is and a full block refuses new facts.
    """

    def __init__(self, store: BlockStore, secret: str, tier: "FactTier | None" = None):
        if not secret:
            raise ValueError("the memory gate needs a secret")
        self._store = store
        self._tier = tier
        self._secret = secret
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def handle(self, operation: str, body: Any) -> tuple[int, dict]:
        """(HTTP status, JSON answer) for one request."""
        from tools.fact_tier import TierUnsafe

        try:
            return 200, self._apply(operation, body)
        except GateRefusal as refusal:
            return refusal.status, {"error": str(refusal)}
        except StoreUnavailable as exc:
            log.warning("memory gate: Letta unavailable during %s: %s", operation, exc)
            return 503, {"error": "the memory service cannot reach the memory store right now. Nothing was saved; "
                                  "reply without it, you can try again in a later turn."}
        except TierUnsafe as exc:
            log.error("memory gate: refusing %s: %s", operation, exc)
            return 200, {"error": "long-term memory of this viewer is locked for a safety check. Reply from the "
                                  "human block; an operator must look at this viewer's archive."}

    def _apply(self, operation: str, body: Any) -> dict:
        if operation not in OPERATIONS:
            raise GateRefusal(404, f"unknown operation {operation!r}")
        if not isinstance(body, dict):
            raise GateRefusal(400, "the request must be a JSON object")
        agent_id, token = body.get("agent_id"), body.get("token")
        if not isinstance(agent_id, str) or not agent_id or len(agent_id) > 200:
            raise GateRefusal(400, "agent_id is missing")
        if not isinstance(token, str) or not hmac.compare_digest(token, memory_token(self._secret, agent_id)):
            raise GateRefusal(403, "this tool is not allowed to change that agent's memory")
        fields = {}
        for name in OPERATIONS[operation]:
            value = body.get(name)
            if not isinstance(value, str):
                raise GateRefusal(400, f"{name} must be a string")
            fields[name] = value[:MAX_TEXT_CHARS]
        if operation == "prefetch":
            return self._prefetch(agent_id, fields, expect_tier=body.get("expect_tier") is True)
        with self._lock_for(agent_id):
            block = self._store.read(agent_id)
            if block is None:
                return {"error": "this agent has no human block, so its memory cannot be changed. Reply without it."}
            try:
                outcome = getattr(self, "_" + operation)(agent_id, block, fields)
            except HumanBlockError as exc:
                return {"error": str(exc)}
            if outcome.text != block.value:
                self._store.write(block, outcome.text)
            # Only now: a passage the block took back (or a forgotten one) is never in neither tier.
            for passage_id in outcome.delete_after:
                self._tier.delete(agent_id, passage_id)
        log.info("memory gate: %s agent=%s changed=%s", operation, agent_id, outcome.text != block.value)
        return {"message": outcome.message}

    # Each operation: (agent, block, fields) -> Outcome. Tier writes that must come BEFORE the
    # block write (facts moving out) happen inside it.
    def _remember(self, agent_id: str, block: HumanBlock, fields: dict) -> Outcome:
        refuse_contact_details(fields["fact"], fields["category"])
        if self._tier is None:
            return Outcome(*add_fact(block.value, fields["fact"], fields["category"], block.limit))
        plan = plan_remember(block.value, fields["fact"], fields["category"], block.limit)
        if plan.text == block.value:
            return Outcome(plan.text, plan.message)  # already in the core block
        # A block that never moved anything out has no tier to look in: no Letta call for most viewers.
        told_again = []
        if stored_count(block.value):
            told_again = self._exact_in_tier(agent_id, normalize_fact(fields["fact"]))
        if told_again:
            plan = plan_remember(block.value, fields["fact"], told_again[0].category, block.limit, from_tier=True)
        self._move_out(agent_id, plan.moved)
        return Outcome(plan.text, plan.message, tuple(item.passage_id for item in told_again))

    def _edit(self, agent_id: str, block: HumanBlock, fields: dict) -> Outcome:
        # The console's "edit" (no tool asks it): one read-modify-write, so a refused wording leaves
        # the old fact where it was. Facts in the core block only: that is what the console lists.
        refuse_contact_details(fields["fact"], fields["category"])
        return Outcome(*edit_fact(block.value, fields["old"], fields["fact"], fields["category"], block.limit))

    def _forget(self, agent_id: str, block: HumanBlock, fields: dict) -> Outcome:
        request = fields["fact"]
        wanted = fact_key(collapse_spaces(request).lstrip("-*•· "))
        facts = parse_facts(block.value)
        if self._tier is None or not wanted or find_fact(facts, wanted) or not stored_count(block.value):
            return Outcome(*remove_fact(block.value, request))
        # Not exactly in the core block: a part of a fact may mean one in either tier.
        in_tier = tier_matches(wanted, self._tier.find(agent_id, wanted))
        exact = len(in_tier) == 1 and fact_key(in_tier[0].text) == wanted
        in_core = [] if exact else [(name, value) for name, values in facts.items() for value in values
                                    if wanted in fact_key(value)]
        if len(in_core) + len(in_tier) > 1:
            raise HumanBlockError(describe_candidates(request, in_core, in_tier))
        if not in_tier:
            return Outcome(*remove_fact(block.value, request))  # the one core match, or its error listing
        (match,) = in_tier
        message = f"Forgot ({match.category}): {match.text} (from long-term memory)"
        return Outcome(after_tier_forget(block.value), message, (match.passage_id,))

    def _recall(self, agent_id: str, block: HumanBlock, fields: dict) -> Outcome:
        query = clean_query(fields["query"])
        results = self._search(agent_id, block, query)
        return Outcome(block.value, format_recall(query, results, stored_count(block.value)))

    def _prefetch(self, agent_id: str, fields: dict, *, expect_tier: bool) -> dict:
        """What the bridge sends beside a viewer's message before the turn (bridge/recall_prefetch.py):
        the passages closest to it ("" when none), and whether this viewer has a tier at all, so
        the bridge can stop asking for viewers who have none. Outside the agent's lock: it only
        reads. On the speech path: when the bridge saw a tier for this agent before
        (`expect_tier`), the search alone (an embedding and a query): the block is read only when
        it finds nothing, to tell a tier that emptied. Reading it beside the search made the
        search slower, measured (+10 ms: Letta runs both on one event loop), and the token already
        names the agent. Otherwise the search waits for the block to say there is a tier, so a
        viewer without one costs no search."""
        try:
            query = clean_query(fields["query"])
        except HumanBlockError as exc:
            return {"error": str(exc)}
        if self._tier is None:
            return {"message": "", "searchable": False}
        found = self._tier.search(agent_id, query, PREFETCH_TOP_K) if expect_tier else None
        if found:
            return {"message": format_prefetch(found), "searchable": True}
        block = self._store.read(agent_id)
        if block is None or not self._searchable(block):
            return {"message": "", "searchable": False}
        if found is None:
            found = self._tier.search(agent_id, query, PREFETCH_TOP_K)
        return {"message": format_prefetch(found), "searchable": True}

    def _searchable(self, block: HumanBlock) -> bool:
        # Nothing was ever moved out and no episode written: nothing to search.
        return self._tier is not None and bool(
            stored_count(block.value) or LAST_STREAM_FIELD in parse_fields(block.value, "viewer"))

    def _search(self, agent_id: str, block: HumanBlock, query: str) -> list:
        return self._tier.search(agent_id, query, RECALL_TOP_K) if self._searchable(block) else []

    def _episode(self, agent_id: str, block: HumanBlock, fields: dict) -> Outcome:
        if self._tier is None:
            raise HumanBlockError("episodes need the long-term tier, which this gate has not got.")
        plan, episode = plan_episode(block.value, fields["date"], fields["summary"], block.limit)
        self._tier.add(agent_id, EPISODE_CATEGORY, episode, EPISODE_TAG)
        self._move_out(agent_id, plan.moved)
        return Outcome(plan.text, plan.message)

    def _move_out(self, agent_id: str, moved) -> None:
        """Write the facts leaving the block to tier 2 (before the block is written)."""
        for category, fact in moved:
            if not self._exact_in_tier(agent_id, fact):  # a write interrupted earlier may have left it there
                self._tier.add(agent_id, category, fact)

    def _exact_in_tier(self, agent_id: str, fact: str) -> list:
        wanted = fact_key(fact)
        return [item for item in self._tier.find(agent_id, fact) if fact_key(item.text) == wanted]

    def _lock_for(self, agent_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(agent_id, threading.Lock())


class _Handler(BaseHTTPRequestHandler):
    server: "MemoryGateServer"
    protocol_version = "HTTP/1.1"
    # An answer is two writes (headers, then body). On a kept-alive connection (the bridge's recall
    # before the turn) Nagle held the body until the client's delayed ACK of the headers: +40 ms
    # a call, measured. TCP_NODELAY sends each write at once.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - one log line per call comes from MemoryGate
        pass

    def do_GET(self):
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        prefix = "/v1/"
        if not self.path.startswith(prefix):
            self._send(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send(413, {"error": "request too large"})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            self._send(400, {"error": "the request is not JSON"})
            return
        status, answer = self.server.gate.handle(self.path[len(prefix):], body)
        self._send(status, answer)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class MemoryGateServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], gate: MemoryGate):
        super().__init__(address, _Handler)
        self.gate = gate


def serve(gate: MemoryGate, host: str, port: int) -> MemoryGateServer:
    """A running gate server in a background thread (tests; the CLI calls serve_forever itself)."""
    server = MemoryGateServer((host, port), gate)
    threading.Thread(target=server.serve_forever, name="memory-gate", daemon=True).start()
    return server


def run_memory_gate(settings: Any) -> int:
    """`vtuber-letta memory-gate`: serve until SIGTERM/SIGINT."""
    import signal

    from vtuber_letta.letta_api import letta_client

    host, port = settings.memory_gate_address
    from tools.fact_tier import LettaFactTier

    client = letta_client(settings)
    gate = MemoryGate(LettaBlockStore(client), settings.memory_gate_secret, LettaFactTier(client))
    server = MemoryGateServer((host, port), gate)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    log.info("memory gate: listening on %s:%s", host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

"""Bring every existing viewer agent to the current template (`vtuber-letta provision`, last step).

What the template decides about an agent — everything `ViewerAgents` passes to `agents.create`
except the viewer's own memory — is the agent's *template state* (`TemplateState`): the rendered
system prompt, the tool set, the tool rules, the shared blocks (by label), the agent secrets the
template sets (avatar names), the model / embedding handles and context window, the template's
tags and the template name in the metadata. The human block, archival memory and message history
are the viewer's and are never touched.

Per agent: compare, change only what differs, make it take effect, then record it:

1. The agent's metadata holds `template_fingerprint`, a hash of the template state. Equal to the
   current one: already current, nothing else is read (one page of the agent list per 100 agents).
2. Otherwise the real fields are read and compared (`plan_changes`); an agent whose fields already
   match only gets its fingerprint written.
3. Changes go in one `agents.update` (tool_ids, tool_rules, block_ids, tags and secrets *replace*
   their sets: they are sent whole, the human block and anyone else's blocks, tags and secrets
   kept), then `agents.recompile`: Letta 0.16.8 stores a new `system` (and new rules) without
   applying them to the in-context system message until the agent is recompiled. The fingerprint
   is written last, so an interrupted upgrade is redone on the next run.

The bridge may be running: each agent is changed while holding the bridge's own worker lock of
that viewer (`vtuber_letta.viewer_lock.ViewerHold`), so no turn of that viewer is in flight meanwhile. A viewer
whose turn is in flight is skipped and retried after the others (for up to `busy_wait` seconds);
one still busy then counts as failed ("run provision again"). Agents are paged through by the
viewer tag, 100 at a time, never all loaded at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from letta_client import APIConnectionError, APIStatusError, Letta, NotFoundError
from redis.exceptions import RedisError

from agent_templates.persona import avatar_secrets
from agent_templates.render import render_system
from provisioning.blueprint import Blueprint
from provisioning.naming import PRODUCT_TAG, VIEWER_TAG, viewer_tags
from tools.memory_client import GATE_TOKEN_ENV
from tools.memory_gate import memory_token

FINGERPRINT_KEY = "template_fingerprint"
PAGE_SIZE = 100
PROGRESS_EVERY = 100
BUSY_WAIT_S = 60.0  # how long viewers with a turn in flight are retried before counting as failed
_OUR_TAG_PREFIXES = (PRODUCT_TAG, "vtl:")


@dataclass(frozen=True)
class TemplateState:
    """What the template says every viewer's agent is (the create kwargs that are not the viewer's)."""

    template: str
    agent_type: str
    system: str
    tools: tuple[str, ...]  # names, sorted
    tool_rules: tuple[str, ...]  # canonical JSON of each rule, in template order
    shared_blocks: tuple[tuple[str, str | None], ...]  # (label, block id or None when not created yet)
    secrets: tuple[tuple[str, str], ...]
    model: str
    embedding: str
    context_window_limit: int | None
    template_tags: tuple[str, ...]
    parallel_tool_calls: bool = False
    # Signs each agent's memory token (tools/memory_gate.py); only a digest of it enters the fingerprint,
    # so a rotated secret re-issues every token on the next provision.
    memory_gate_secret: str = field(default="", repr=False)

    @property
    def fingerprint(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if k != "memory_gate_secret"}
        fields["memory_gate_secret"] = hashlib.sha256(self.memory_gate_secret.encode()).hexdigest()
        data = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=list)
        return hashlib.sha256(data.encode("utf-8")).hexdigest()[:32]

    def secrets_for(self, agent_id: str) -> dict[str, str]:
        """The agent secrets the template sets: the avatar names, and the agent's memory token."""
        wanted = dict(self.secrets)
        if self.memory_gate_secret:
            wanted[GATE_TOKEN_ENV] = memory_token(self.memory_gate_secret, agent_id)
        return wanted

    @property
    def rules(self) -> list[dict]:
        return [json.loads(rule) for rule in self.tool_rules]

    def tags_for(self, viewer_id: str) -> list[str]:
        return viewer_tags(viewer_id, self.template) + [t for t in self.template_tags if t != PRODUCT_TAG]


def canonical_rule(rule: Any) -> str:
    """One tool rule as comparable text: the same for the template's dict and the server's model."""
    data = rule.model_dump() if hasattr(rule, "model_dump") else dict(rule)
    data = {k: (v.value if hasattr(v, "value") else v) for k, v in data.items() if v is not None}
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


def template_state(blueprint: Blueprint, shared_block_ids: dict[str, str | None],
                   memory_gate_secret: str = "") -> TemplateState:
    t = blueprint.template
    return TemplateState(
        template=t.name,
        agent_type=t.agent_type,
        system=render_system(t, blueprint.config),
        tools=tuple(sorted(t.tools)),
        tool_rules=tuple(canonical_rule(rule) for rule in t.letta_tool_rules()),
        shared_blocks=tuple(sorted(shared_block_ids.items())),
        secrets=tuple(sorted(avatar_secrets(blueprint.config).items())),
        model=blueprint.model,
        embedding=blueprint.embedding,
        context_window_limit=t.context_window_limit,
        template_tags=tuple(t.tags),
        parallel_tool_calls=t.parallel_tool_calls,
        memory_gate_secret=memory_gate_secret,
    )


# ------------------------------------------------------------------------------------ comparing


@dataclass
class Plan:
    """What differs on one agent: the `agents.update` kwargs (by name) and a readable list of it."""

    update: dict[str, Any] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)  # e.g. "system", "tools +play_motion -old_tool"
    problem: str | None = None  # a difference an update cannot fix

    @property
    def empty(self) -> bool:
        return not self.update


def plan_changes(agent: Any, state: TemplateState) -> Plan:
    """Compare an agent (retrieved with blocks, tools, tags and secrets) with the template state."""
    plan = Plan()
    meta = agent.metadata or {}
    viewer_id = meta.get("viewer_id")
    if getattr(agent, "agent_type", None) not in (None, state.agent_type):
        kind = getattr(agent.agent_type, "value", agent.agent_type)
        plan.problem = f"agent_type is {kind}, the template says {state.agent_type}: re-create the agent"
    if (agent.system or "") != state.system:
        plan.update["system"] = state.system
        plan.changed.append("system")

    have_tools = {t.name: t.id for t in agent.tools or []}
    if set(have_tools) != set(state.tools):
        plan.update["tool_names"] = list(state.tools)  # resolved to ids when applied
        added = sorted(set(state.tools) - set(have_tools))
        removed = sorted(set(have_tools) - set(state.tools))
        plan.changed.append("tools " + " ".join([f"+{n}" for n in added] + [f"-{n}" for n in removed]))

    have_rules = [canonical_rule(rule) for rule in agent.tool_rules or []]
    if sorted(have_rules) != sorted(state.tool_rules):
        plan.update["tool_rules"] = state.rules
        plan.changed.append("tool_rules")

    blocks = list(agent.blocks or [])
    shared = dict(state.shared_blocks)
    if all(shared.values()):
        have_shared = {b.label: b.id for b in blocks if b.label in shared}
        if have_shared != shared:
            kept = [b.id for b in blocks if b.label not in shared]  # the human block and any other
            plan.update["block_ids"] = kept + [shared[label] for label in sorted(shared)]
            plan.changed.append("shared blocks " + ", ".join(sorted(
                label for label in shared if have_shared.get(label) != shared[label])))

    have_secrets = {s.key: s.value for s in getattr(agent, "secrets", None) or []}
    wanted_secrets = state.secrets_for(agent.id)
    if any(have_secrets.get(k) != v for k, v in wanted_secrets.items()):
        plan.update["secrets"] = {**have_secrets, **wanted_secrets}  # an update replaces the whole set
        plan.changed.append("secrets " + ", ".join(sorted(k for k, v in wanted_secrets.items()
                                                          if have_secrets.get(k) != v)))

    llm = getattr(agent, "llm_config", None)
    if llm is not None and bool(getattr(llm, "parallel_tool_calls", False)) != state.parallel_tool_calls:
        plan.update["parallel_tool_calls"] = state.parallel_tool_calls
        plan.changed.append("parallel_tool_calls")
    if llm is not None and (llm.handle != state.model or (
            state.context_window_limit is not None and llm.context_window != state.context_window_limit)):
        plan.update["model"] = state.model
        if state.context_window_limit is not None:
            plan.update["context_window_limit"] = state.context_window_limit
        plan.changed.append("model")
    embedding = getattr(agent, "embedding_config", None)
    if embedding is not None and embedding.handle != state.embedding:
        plan.update["embedding"] = state.embedding
        plan.changed.append("embedding")

    if viewer_id:
        have_tags = list(agent.tags or [])
        wanted_tags = state.tags_for(viewer_id)
        if not set(wanted_tags) <= set(have_tags) or any(
                t.startswith(_OUR_TAG_PREFIXES) and t not in wanted_tags for t in have_tags):
            others = [t for t in have_tags if not t.startswith(_OUR_TAG_PREFIXES)]
            plan.update["tags"] = wanted_tags + others
            plan.changed.append("tags")
    if meta.get("template") != state.template:
        plan.changed.append("metadata")
        plan.update["metadata_template"] = state.template
    return plan


# ------------------------------------------------------------------------------------ upgrading


@dataclass
class UpgradeReport:
    """Counts for the summary, the failures by viewer, and (dry run) the planned changes."""

    counts: Counter = field(default_factory=Counter)  # upgraded / current / failed
    failures: list[tuple[str, str]] = field(default_factory=list)  # (viewer or agent id, reason)
    planned: list[tuple[str, list[str]]] = field(default_factory=list)  # (viewer, changed fields)
    changed_fields: Counter = field(default_factory=Counter)


class _ToolsMissing(Exception):
    """A template tool has no id on the server (its registration failed earlier in this run)."""


class TemplateUpgrade:
    def __init__(self, client: Letta, blueprint: Blueprint, state: TemplateState, *, hold=None,
                 dry_run: bool = False, progress: Callable[[str], None] | None = None,
                 busy_wait: float = BUSY_WAIT_S, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.client = client
        self.blueprint = blueprint
        self.state = state
        self.fingerprint = state.fingerprint
        self.hold = hold  # vtuber_letta.viewer_lock.ViewerHold, or None (no bridge to keep off: tests, dry run)
        self.dry_run = dry_run
        self.progress = progress or (lambda _msg: None)
        self.busy_wait = busy_wait
        self.clock = clock
        self.sleep = sleep
        self.report = UpgradeReport()
        self._tool_ids: dict[str, str] | None = None
        self._seen = 0

    def run(self) -> UpgradeReport:
        busy: list[tuple[str, str]] = []  # (agent id, viewer id)
        for agent in self._viewer_agents():
            self._seen += 1
            meta = agent.metadata or {}
            viewer_id = meta.get("viewer_id")
            if not viewer_id:
                pass  # not one of ours (no viewer): never touched
            elif meta.get(FINGERPRINT_KEY) == self.fingerprint:
                self.report.counts["current"] += 1
            elif self._upgrade_one(agent.id, viewer_id) == "busy":
                busy.append((agent.id, viewer_id))
            if self._seen % PROGRESS_EVERY == 0:
                self._show_progress()
        deadline = self.clock() + self.busy_wait
        while busy:
            self.sleep(0.2)
            busy = [(aid, vid) for aid, vid in busy if self._upgrade_one(aid, vid) == "busy"]
            if busy and self.clock() >= deadline:
                for _, viewer_id in busy:
                    self._fail(viewer_id, "the viewer's turn was in flight the whole time; run provision again")
                break
        if self._seen >= PROGRESS_EVERY:
            self._show_progress()
        return self.report

    def _show_progress(self) -> None:
        c = self.report.counts
        verb = "would upgrade" if self.dry_run else "upgraded"
        self.progress(f"agents: {self._seen} checked, {c['upgraded']} {verb}, {c['current']} already current, "
                      f"{c['failed']} failed")

    def _viewer_agents(self) -> Iterable[Any]:
        """Every viewer agent, a page of PAGE_SIZE at a time (the SDK fetches the next page lazily)."""
        return self.client.agents.list(tags=[PRODUCT_TAG, VIEWER_TAG], match_all_tags=True, order="asc",
                                       order_by="created_at", limit=PAGE_SIZE)

    def _upgrade_one(self, agent_id: str, viewer_id: str) -> str:
        token = None
        if self.hold is not None and not self.dry_run:
            try:
                token = self.hold.claim(viewer_id)
            except RedisError as exc:  # no lock, no change: the bridge might be mid-turn
                self._fail(viewer_id, f"Redis: {exc} (the viewer lock is needed to change the agent safely)")
                return "failed"
            if token is None:
                return "busy"
        try:
            return self._compare_and_apply(agent_id, viewer_id)
        except NotFoundError:
            return "gone"  # forgotten while we looked: nothing to upgrade
        except APIStatusError as exc:
            self._fail(viewer_id, f"HTTP {exc.status_code}: {str(getattr(exc, 'message', exc))[:200]}")
            return "failed"
        except (APIConnectionError, _ToolsMissing) as exc:
            self._fail(viewer_id, str(exc))
            return "failed"
        finally:
            if token is not None:
                try:
                    self.hold.release(viewer_id, token)
                except RedisError:
                    pass  # the hold expires by itself (TTL) and the bridge's sweeper re-readies the viewer

    def _compare_and_apply(self, agent_id: str, viewer_id: str) -> str:
        agent = self.client.agents.retrieve(
            agent_id, include=["agent.blocks", "agent.tools", "agent.tags", "agent.secrets"])
        meta = dict(agent.metadata or {})
        if meta.get(FINGERPRINT_KEY) == self.fingerprint:  # upgraded by someone else meanwhile
            self.report.counts["current"] += 1
            return "current"
        plan = plan_changes(agent, self.state)
        if plan.problem:
            self._fail(viewer_id, plan.problem)
            return "failed"
        if plan.empty:  # fields already match (e.g. made before fingerprints existed): just record it
            if not self.dry_run:
                self.client.agents.update(agent_id, metadata={**meta, FINGERPRINT_KEY: self.fingerprint})
            self.report.counts["current"] += 1
            return "current"
        self.report.counts["upgraded"] += 1
        self.report.changed_fields.update(change.split(" ")[0] for change in plan.changed)
        if self.dry_run:
            self.report.planned.append((viewer_id, plan.changed))
            return "upgraded"
        update = dict(plan.update)
        if "tool_names" in update:
            update["tool_ids"] = self._ids_of(update.pop("tool_names"))
        template_name = update.pop("metadata_template", None)
        self.client.agents.update(agent_id, **update)
        # Letta stores a new system prompt / rules / blocks without applying them to the in-context
        # system message until the agent is recompiled (verified on 0.16.8: docs/LETTA_NOTES.md).
        self.client.agents.recompile(agent_id)
        if template_name:
            meta["template"] = template_name
        self.client.agents.update(agent_id, metadata={**meta, FINGERPRINT_KEY: self.fingerprint})
        return "upgraded"

    def _ids_of(self, names: list[str]) -> list[str]:
        if self._tool_ids is None:
            self._tool_ids = {t.name: t.id for t in self.client.tools.list(names=list(self.state.tools))}
        missing = [name for name in names if name not in self._tool_ids]
        if missing:
            raise _ToolsMissing(f"tools {', '.join(missing)} are not registered on the server")
        return [self._tool_ids[name] for name in names]

    def _fail(self, viewer_id: str, reason: str) -> None:
        self.report.counts["failed"] += 1
        self.report.failures.append((viewer_id, reason))

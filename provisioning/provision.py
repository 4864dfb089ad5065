"""`vtuber-letta provision`: put our tools and the shared blocks into Letta, idempotently.

What it does, in order: checks the server answers (with our password) and that
the template's model and embedding handles exist; upserts every custom tool
whose source, tags or return limit differ from ours (a PATCH keeps the old
schema, so changes always go through upsert); creates the shared persona and
stream blocks if they are missing; then brings every existing viewer agent to
the current template (system prompt, tools, rules, shared blocks, secrets...;
never its memory or history: provisioning/upgrade.py).

People's edits win: a shared block whose text differs from a fresh render was
edited in the ADE or through the API, and is kept. Only `--reset-persona`
re-renders the persona, after printing the difference. A second run changes
nothing on the server and reports everything unchanged.
"""

from __future__ import annotations

import difflib
from typing import Callable

from letta_client import APIConnectionError, APIStatusError, Letta

from provisioning.blueprint import Blueprint, ProvisioningError, find_shared_block, load_blueprint, shared_block_tags
from provisioning.summary import Summary
from tools import upsert_kwargs
from vtuber_letta.letta_api import letta_client
from vtuber_letta.settings import Settings


def check_handles(client: Letta, model: str, embedding: str) -> None:
    models = sorted(m.handle for m in client.models.list() if getattr(m, "handle", None))
    if model not in models:
        raise ProvisioningError(f"model handle {model!r} is not on the server; available: {', '.join(models) or 'none'}"
                                " (set LETTA_MODEL)")
    embeddings = sorted(e.handle for e in client.models.embeddings.list() if getattr(e, "handle", None))
    if embedding not in embeddings:
        raise ProvisioningError(f"embedding handle {embedding!r} is not on the server; available: "
                                f"{', '.join(embeddings) or 'none'} (set LETTA_EMBEDDING)")


def provision(settings: Settings, *, dry_run: bool = False, reset_persona: bool = False,
              client: Letta | None = None, out: Callable[[str], None] = print,
              progress: Callable[[str], None] | None = None, redis_conn=None,
              upgrade_agents: bool = True) -> Summary:
    blueprint = load_blueprint(settings)
    client = client or letta_client(settings)
    summary = Summary(dry_run=dry_run)
    try:
        check_handles(client, blueprint.model, blueprint.embedding)
    except APIConnectionError:
        raise ProvisioningError(f"cannot reach the Letta server at {settings.letta_api_url} (is the stack up?)") from None
    except APIStatusError as exc:
        raise ProvisioningError(f"the Letta server at {settings.letta_api_url} answered {exc.status_code}"
                                + (" (wrong LETTA_API_KEY?)" if exc.status_code == 401 else "")) from None

    for name in blueprint.template.custom_tools:
        _sync_tool(client, name, summary, dry_run)
    shared_ids: dict[str, str | None] = {}
    for spec in blueprint.template.memory_blocks:
        if spec.shared:
            shared_ids[spec.label] = _sync_shared_block(client, blueprint, spec, summary, dry_run=dry_run,
                                                        reset=reset_persona and spec.label == "persona", out=out)
    # Agents are upgraded only onto a complete set of tools and shared blocks (a failure above
    # already makes the run fail; the next run upgrades them).
    if upgrade_agents and (summary.ok or dry_run):
        summary.agents = _upgrade_agents(settings, client, blueprint, shared_ids, dry_run=dry_run,
                                         progress=progress, redis_conn=redis_conn)
    return summary


def _upgrade_agents(settings: Settings, client: Letta, blueprint: Blueprint, shared_ids: dict[str, str | None],
                    *, dry_run: bool, progress, redis_conn):
    """Every existing viewer agent to the current template (provisioning/upgrade.py)."""
    from provisioning.upgrade import TemplateUpgrade, template_state
    from vtuber_letta.redis_api import redis_client
    from vtuber_letta.viewer_lock import ViewerHold

    hold = None
    if not dry_run:
        hold = ViewerHold(redis_conn or redis_client(settings, decode_responses=False),
                          ttl_ms=int(settings.bridge_lock_ttl * 1000))
    state = template_state(blueprint, shared_ids, settings.memory_gate_secret)
    return TemplateUpgrade(client, blueprint, state, hold=hold, dry_run=dry_run, progress=progress).run()


def _sync_tool(client: Letta, name: str, summary: Summary, dry_run: bool) -> None:
    wanted = upsert_kwargs(name)
    try:
        existing = next(iter(client.tools.list(name=name, limit=1)), None)
        if existing is not None and _tool_matches(existing, wanted):
            summary.add("tool", name, "unchanged")
            return
        if not dry_run:
            client.tools.upsert(**wanted)
        summary.add("tool", name, "updated" if existing else "created")
    except APIStatusError as exc:
        summary.add("tool", name, "failed", f"HTTP {exc.status_code}: {_short(exc)}")


def _tool_matches(existing, wanted: dict) -> bool:
    return (
        (existing.source_code or "") == wanted["source_code"]
        and sorted(existing.tags or []) == sorted(wanted["tags"])
        and existing.return_char_limit == wanted["return_char_limit"]
        and bool(existing.enable_parallel_execution) == wanted["enable_parallel_execution"]
    )


def _sync_shared_block(client: Letta, blueprint: Blueprint, spec, summary: Summary, *,
                       dry_run: bool, reset: bool, out) -> str | None:
    """Create or update the shared block; returns its id (None: not created yet, or failed)."""
    label = spec.label
    rendered = blueprint.shared_values[label]
    try:
        block = find_shared_block(client, blueprint.template.name, label)
        if block is None:
            created_id = None
            if not dry_run:
                created_id = client.blocks.create(
                    label=label, value=rendered, limit=spec.limit, description=spec.description,
                    read_only=spec.read_only, tags=shared_block_tags(blueprint.template.name, label),
                    metadata=_shared_metadata(blueprint, label),
                ).id
            summary.add("block", label, "created", "shared, read-only for agents" if spec.read_only else "shared")
            return created_id
        changes: dict = {}
        if (block.limit, block.description, bool(block.read_only)) != (spec.limit, spec.description, spec.read_only):
            changes.update(limit=spec.limit, description=spec.description, read_only=spec.read_only)
        detail = ""
        if block.value != rendered:
            if reset:
                out(f"--- {label} on the server\n+++ {label} re-rendered from the template")
                out("".join(difflib.unified_diff(block.value.splitlines(True), rendered.splitlines(True))))
                changes["value"] = rendered
            else:
                detail = "kept (edited by people; --reset-persona re-renders)" if label == "persona" else "kept (edited)"
        if changes and not dry_run:
            client.blocks.update(block.id, **changes)
        summary.add("block", label, "updated" if changes else "unchanged", detail or block.id)
        return block.id
    except APIStatusError as exc:
        summary.add("block", label, "failed", f"HTTP {exc.status_code}: {_short(exc)}")
        return None


def _shared_metadata(blueprint: Blueprint, label: str) -> dict:
    metadata = {"vtuber_letta": "shared", "template": blueprint.template.name}
    if label == "stream":
        metadata["stream"] = blueprint.config.stream.model_dump()  # `stream set` updates from these
    return metadata


def _short(exc: APIStatusError) -> str:
    return str(getattr(exc, "message", exc))[:200]

"""`vtuber-letta backup DIR` / `vtuber-letta restore DIR [--force]`: everything a VTuber remembers.

A backup is a folder (mode 0700, files 0600: it holds every viewer's memory):

    manifest.json        written last: versions, alembic revision, time, counts, sha256 of every file
    letta.dump           pg_dump (custom format) of the Letta database: the primary copy
    agents/*.af          one Agent File per viewer: an extra, portable copy (importable one by one)
    agents/*.tier.json   each viewer's long-term tier (archival passages; an Agent File has none)
    viewer_agents.json   the viewer -> agent map (Redis `vtl:viewer_agents`)
    viewer_stats.json    the platform-verified counters per viewer (Redis `vtl:viewer_stats:*`)
    forgotten.json       the viewers forgotten so far, as hashes (Redis `vtl:forgotten`): see below
    persona.yaml         the persona config in force (VTL_PERSONA_CONFIG, or the sample when absent)

The dump is consistent on its own (pg_dump reads one snapshot in one transaction), so a backup
is taken while the stack keeps serving. Its row counts are read back from the dump file itself,
which both proves the file is readable and lets a restore check it got exactly those rows.

A restore goes into an empty stack (no agents, no blocks, no viewer map; `--force` to replace a
non-empty one): it checks the whole backup first (manifest, versions, checksums), then stops the
Letta server, drops and recreates the `letta` database, restores the dump in one transaction,
starts Letta again (its `alembic upgrade head` is a no-op at the same revision), rebuilds the
Redis map from the backup (each entry verified against Letta, which stays the source of truth)
and copies the persona config back.

"Forget me" reaches backups through tombstones: `agent forget` records the viewer's hash (never
the id) in `vtl:forgotten`; a restore forgets again (agent, blocks, archives, Redis traces) every
restored viewer whose hash is in the tombstones it knows: those of the Redis it restores into, of
the backup itself, and of `--forgotten FILE` (the forgotten.json of any later backup). An older
backup restored onto a new machine therefore needs the newest backup's forgotten.json.

Only the local stack's database can be dumped (its Postgres is on loopback and ours); with a
Letta server that the stack does not manage, both commands stop with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable

from letta_client import APIConnectionError, APIStatusError, NotFoundError

from provisioning.naming import agent_name, viewer_hash
from stack.install import LETTA_VERSION
from stack.letta_database import LettaDatabase
from stack.postgres import DB_NAME
from stack.processes import StackError
from vtuber_letta import redis_keys
from vtuber_letta.settings import Settings

FORMAT = "vtuber-letta-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DUMP_FILE = "letta.dump"
AGENTS_DIR = "agents"
MAP_FILE = "viewer_agents.json"
STATS_FILE = "viewer_stats.json"
FORGOTTEN_FILE = "forgotten.json"
PERSONA_FILE = "persona.yaml"
# Tables whose row counts the manifest records (read from the dump) and a restore verifies.
COUNTED_TABLES = ("organizations", "agents", "block", "blocks_agents", "messages", "tools", "archival_passages")


class BackupError(Exception):
    """An expected failure of backup or restore; the message says what and what to do."""


@dataclass
class Report:
    """What a backup or restore did, one line per item, for the CLI."""

    title: str
    lines: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.lines.append(text)

    def render(self) -> str:
        return "\n".join([self.title, *(f"  {line}" for line in self.lines)])


# ============================================================================ backup


def backup(settings: Settings, target: Path, *, log: Callable[[str], None] = print) -> Report:
    """Write a complete backup of the running local stack into `target` (new or empty folder)."""
    from stack.manager import Stack

    target = Path(target)
    stack = _local_stack(settings, Stack, log)
    if not stack.postgres.healthy() or not stack.letta.healthy():
        raise BackupError("the local stack is not up (Postgres and the Letta server must be running): "
                          "run `vtuber-letta stack up` first")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(f"{target} exists and is not an empty folder: choose a new folder for the backup")
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o700)
    try:
        return _write_backup(settings, stack, target, log)
    except (BackupError, StackError, APIConnectionError, APIStatusError) as exc:
        raise BackupError(f"{exc}\n{target} holds an incomplete backup (no {MANIFEST}): delete it") from None


def _write_backup(settings: Settings, stack, target: Path, log: Callable[[str], None]) -> Report:
    from provisioning.tier_files import tier_path, write_tier_file
    from provisioning.viewers import ViewerAgents

    report = Report(f"backup written to {target}")
    files: dict[str, str] = {}

    # 1. The database: one consistent snapshot, the primary copy.
    log("backup: dumping the Letta database")
    db = LettaDatabase(stack)
    dump = target / DUMP_FILE
    db.dump(dump)
    counts, revision = db.dump_contents(dump, COUNTED_TABLES)
    files[DUMP_FILE] = _sha256(dump)
    report.add(f"database  {DUMP_FILE} ({_size(dump)}, alembic {revision}; "
               + ", ".join(f"{counts[t]} {t}" for t in COUNTED_TABLES) + ")")

    # 2. One Agent File per viewer (Letta is the source of truth for who has an agent).
    viewers = ViewerAgents(settings)
    try:
        rows = viewers.list()
    except (APIConnectionError, APIStatusError) as exc:
        raise BackupError(f"cannot list the viewers' agents on {settings.letta_api_url}: {exc}") from None
    agents_dir = target / AGENTS_DIR
    agents_dir.mkdir(mode=0o700)
    viewer_map: dict[str, str] = {}
    agent_files: list[dict] = []
    for row in sorted(rows, key=lambda r: r["viewer_id"]):
        if row["viewer_id"] in viewer_map:
            continue  # two agents for one viewer: the oldest (listed first) keeps the memory
        viewer_map[row["viewer_id"]] = row["agent_id"]
        relative = f"{AGENTS_DIR}/{agent_name(row['viewer_id'])}.af"
        try:
            exported = viewers.client.agents.export_file(row["agent_id"])
        except NotFoundError:
            viewer_map.pop(row["viewer_id"])  # deleted ("forget me") while we were listing
            continue
        text = exported if isinstance(exported, str) else json.dumps(exported, ensure_ascii=False)
        _write_private(target / relative, text)
        files[relative] = _sha256(target / relative)
        tier_relative = tier_path(Path(relative)).as_posix()
        passages = write_tier_file(viewers.client, row["viewer_id"], row["agent_id"], target / tier_relative)
        files[tier_relative] = _sha256(target / tier_relative)
        agent_files.append({"viewer_id": row["viewer_id"], "agent_id": row["agent_id"], "file": relative,
                            "tier_file": tier_relative, "passages": passages})
    report.add(f"agents    {len(agent_files)} Agent File(s) and long-term tiers "
               f"({sum(f['passages'] for f in agent_files)} passages) in {AGENTS_DIR}/")

    # 3. The viewer -> agent map and the viewers' verified counters (Redis).
    _write_private(target / MAP_FILE, json.dumps(viewer_map, ensure_ascii=False, indent=2, sort_keys=True))
    files[MAP_FILE] = _sha256(target / MAP_FILE)
    stats = _read_viewer_stats(viewers.redis)
    _write_private(target / STATS_FILE, json.dumps(stats, ensure_ascii=False, indent=2, sort_keys=True))
    files[STATS_FILE] = _sha256(target / STATS_FILE)
    report.add(f"redis     {len(viewer_map)} map entries in {MAP_FILE}, {len(stats)} viewers' stats in {STATS_FILE}")
    forgotten = viewers.redis.hgetall(redis_keys.FORGOTTEN)
    _write_private(target / FORGOTTEN_FILE, json.dumps(forgotten, indent=2, sort_keys=True))
    files[FORGOTTEN_FILE] = _sha256(target / FORGOTTEN_FILE)
    report.add(f"redis     {len(forgotten)} forgotten viewers (hashes) in {FORGOTTEN_FILE}")

    # 4. The persona config (the sample when no config file exists: that is what is in force).
    persona_source, persona_path = _persona_in_force(settings)
    if persona_path is not None:
        _write_private(target / PERSONA_FILE, persona_path.read_text(encoding="utf-8"))
        files[PERSONA_FILE] = _sha256(target / PERSONA_FILE)
        note = ", the sample" if persona_source == "sample" else ""
        report.add(f"persona   {PERSONA_FILE} (from {persona_path}{note})")
    else:
        report.add("persona   no persona config file (none to back up)")

    # 5. The manifest, last: a folder without one is an incomplete backup.
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "letta": LETTA_VERSION,
            "letta_server_reported": stack.letta.version(),
            "alembic_revision": revision,
            "postgres": db.server_version(),
            "vtuber_letta": _own_version(),
        },
        "template": settings.template_name,
        "database": {"file": DUMP_FILE, "format": "pg_dump custom", "name": DB_NAME, "counts": counts},
        "counts": {"viewers": len(viewer_map), "agent_files": len(agent_files), "viewer_stats": len(stats),
                   "agents": counts["agents"], "blocks": counts["block"], "messages": counts["messages"],
                   "passages": counts["archival_passages"]},
        "agent_files": agent_files,
        "viewer_map": MAP_FILE,
        "viewer_stats": STATS_FILE,
        "forgotten": FORGOTTEN_FILE,
        "persona_config": {"file": PERSONA_FILE if persona_path else None, "source": persona_source},
        "files": files,
    }
    _write_private(target / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=2))
    report.add(f"manifest  {MANIFEST} (letta {LETTA_VERSION}, {len(viewer_map)} viewers)")
    return report


# ============================================================================ restore


def restore(settings: Settings, source: Path, *, force: bool = False, forgotten: Path | None = None,
            log: Callable[[str], None] = print) -> Report:
    """Put a backup back into the local stack (started if needed), which must be empty unless `force`."""
    from provisioning.viewers import ViewerAgents
    from stack.manager import Stack
    from vtuber_letta.letta_api import letta_client
    from vtuber_letta.redis_api import redis_client

    source = Path(source)
    manifest = read_manifest(source)  # everything is checked before anything is touched
    extra_tombstones = _read_tombstones(Path(forgotten)) if forgotten else {}
    stack = _local_stack(settings, Stack, log)
    log("restore: bringing the local stack up")
    stack.up()
    db = LettaDatabase(stack)
    redis_conn = redis_client(settings)

    # Refuse to overwrite anything unless told to.
    occupied = []
    current = db.table_counts(("agents", "block"))
    if current["agents"] or current["block"]:
        occupied.append(f"Letta has {current['agents']} agent(s) and {current['block']} block(s)")
    mapped = redis_conn.hlen(redis_keys.VIEWER_AGENTS)
    stats_keys = list(redis_conn.scan_iter(match=redis_keys.VIEWER_STATS_PREFIX + "*", count=500))
    if mapped or stats_keys:
        occupied.append(f"Redis has {mapped} viewer map entries and {len(stats_keys)} viewers' stats")
    persona_target = Path(settings.persona_config)
    backed_up_persona = manifest["persona_config"]["file"]
    persona_text = (source / backed_up_persona).read_text(encoding="utf-8") if backed_up_persona else None
    write_persona = manifest["persona_config"]["source"] == "config" and persona_text is not None
    if write_persona and persona_target.exists() and persona_target.read_text(encoding="utf-8") != persona_text:
        occupied.append(f"{persona_target} exists and differs from the backup's")
    if occupied and not force:
        raise BackupError("the stack is not empty (" + "; ".join(occupied) + "): restore replaces all of it. "
                          "Run it again with --force to do that, or restore into a fresh data folder")

    report = Report(f"restored {source} (taken {manifest['created_at']})")
    # 1. The database, with the Letta server stopped.
    log("restore: stopping the Letta server")
    stack.letta.stop()
    try:
        log("restore: recreating the database and restoring the dump")
        db.recreate()
        db.restore(source / DUMP_FILE)
    except StackError as exc:
        _restart_letta_quietly(stack, log)
        raise BackupError(f"restoring the database failed; the stack is up with an empty database "
                          f"(run restore again): {exc}") from None
    expected = manifest["database"]["counts"]
    restored = db.table_counts(tuple(expected))  # before Letta starts and writes anything
    revision = db.alembic_revision()
    log("restore: starting the Letta server")
    stack.letta.start(log)
    if restored != expected:
        raise BackupError(f"the restored database does not hold what the backup recorded: {restored} != {expected}")
    report.add("database  " + ", ".join(f"{restored[t]} {t}" for t in expected) + f" (alembic {revision})")

    # 2. The viewer -> agent map, verified against Letta; then Letta fills in anything missing.
    client = letta_client(settings)
    viewer_map = json.loads((source / manifest["viewer_map"]).read_text(encoding="utf-8"))
    redis_conn.delete(redis_keys.VIEWER_AGENTS)
    kept, dropped = 0, []
    for viewer_id, agent_id in viewer_map.items():
        try:
            agent = client.agents.retrieve(agent_id)
        except NotFoundError:
            dropped.append(viewer_id)
            continue
        if (agent.metadata or {}).get("viewer_id") != viewer_id:
            dropped.append(viewer_id)
            continue
        redis_conn.hset(redis_keys.VIEWER_AGENTS, viewer_id, agent_id)
        kept += 1
    listed = ViewerAgents(settings, client=client, redis_conn=redis_conn).list()  # hsetnx for any not in the map
    line = f"redis     {kept} map entries restored and verified against Letta; {len(listed)} viewer agents in Letta"
    if dropped:
        line += f"; {len(dropped)} entries had no matching agent in the dump and were left out"
    report.add(line)

    # 3. The viewers' verified counters.
    stats = json.loads((source / manifest["viewer_stats"]).read_text(encoding="utf-8"))
    for key in stats_keys:
        redis_conn.delete(key)
    for viewer_id, counters in stats.items():
        if counters:
            redis_conn.hset(redis_keys.viewer_stats(viewer_id), mapping=counters)
    report.add(f"redis     {len(stats)} viewers' stats restored")

    # 4. "Forget me" requests made after the backup was taken: forgotten again.
    tombstones = {**_backup_tombstones(source, manifest), **extra_tombstones,
                  **redis_conn.hgetall(redis_keys.FORGOTTEN)}
    viewers = ViewerAgents(settings, client=client, redis_conn=redis_conn)
    reforgotten = 0
    for row in viewers.list():
        if viewer_hash(row["viewer_id"]) in tombstones:
            viewers.forget(row["viewer_id"])
            reforgotten += 1
    if tombstones:
        redis_conn.hset(redis_keys.FORGOTTEN, mapping=tombstones)
    report.add(f"forgotten {reforgotten} restored viewer(s) forgotten again ({len(tombstones)} tombstones known)")

    # 5. The persona config.
    if write_persona:
        persona_target.parent.mkdir(parents=True, exist_ok=True)
        if persona_target.exists() and persona_target.read_text(encoding="utf-8") != persona_text:
            kept_copy = persona_target.with_name(persona_target.name + ".before-restore")
            shutil.copy2(persona_target, kept_copy)
            report.add(f"persona   previous {persona_target.name} kept as {kept_copy}")
        persona_target.write_text(persona_text, encoding="utf-8")
        report.add(f"persona   {persona_target} restored")
    else:
        report.add("persona   the backup used the sample persona config; nothing to copy")

    # 6. Each agent's memory token is bound to this stack's gate secret (tools/memory_gate.py), which
    # need not be the backed-up stack's: issue them anew (with the persona config now in force, which
    # names the avatar's expressions and motions), or every memory tool would be refused.
    viewers = ViewerAgents(settings, client=client, redis_conn=redis_conn)
    rows = viewers.list()
    for row in rows:
        client.agents.update(row["agent_id"], secrets=viewers.agent_secrets(row["agent_id"]))
    report.add(f"tokens    memory tokens issued to {len(rows)} viewer agents for this stack's memory gate")
    return report


def read_manifest(source: Path) -> dict:
    """The backup's manifest, after checking it is complete, of our Letta version, and intact."""
    manifest_path = Path(source) / MANIFEST
    if not manifest_path.is_file():
        raise BackupError(f"{source} is not a complete vtuber-letta backup (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BackupError(f"{manifest_path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"{manifest_path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    letta = manifest.get("versions", {}).get("letta")
    if letta != LETTA_VERSION:
        raise BackupError(f"the backup is of Letta {letta}; this stack runs Letta {LETTA_VERSION}: "
                          "restore it with the vtuber-letta version that took it")
    for relative, digest in manifest.get("files", {}).items():
        path = Path(source) / relative
        if not path.is_file():
            raise BackupError(f"the backup is missing {relative}")
        if _sha256(path) != digest:
            raise BackupError(f"{relative} does not match its checksum in {MANIFEST}: the backup is damaged")
    if DUMP_FILE not in manifest.get("files", {}):
        raise BackupError(f"the backup's manifest lists no {DUMP_FILE}")
    return manifest


# ============================================================================ helpers


def _local_stack(settings: Settings, stack_cls, log: Callable[[str], None]):
    stack = stack_cls(settings, log=lambda msg: log(f"stack: {msg}"))
    if not stack.manages_letta:
        raise BackupError(f"LETTA_API_URL ({settings.letta_api_url}) is not this machine's local stack: "
                          "backup and restore dump and restore the local stack's own Postgres")
    return stack


def _restart_letta_quietly(stack, log) -> None:
    try:
        stack.letta.start(log)  # migrates the empty database: the stack is usable (and empty) again
    except StackError as exc:
        log(f"restore: the Letta server did not start again: {exc}")


def _read_tombstones(path: Path) -> dict[str, str]:
    """A forgotten.json (viewer hash -> when); BackupError if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackupError(f"{path}: cannot read the forgotten viewers: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and re.fullmatch(r"[0-9a-f]{32}", k) for k in data):
        raise BackupError(f"{path}: not a {FORGOTTEN_FILE} (a JSON object of viewer hashes)")
    return {k: str(v) for k, v in data.items()}


def _backup_tombstones(source: Path, manifest: dict) -> dict[str, str]:
    name = manifest.get("forgotten")  # absent in backups taken before tombstones existed
    return _read_tombstones(source / name) if name else {}


def _read_viewer_stats(redis_conn) -> dict[str, dict[str, str]]:
    prefix = redis_keys.VIEWER_STATS_PREFIX
    out = {}
    for key in redis_conn.scan_iter(match=prefix + "*", count=500):
        if redis_conn.type(key) == "hash":
            out[key[len(prefix):]] = redis_conn.hgetall(key)
    return out


def _persona_in_force(settings: Settings) -> tuple[str, Path | None]:
    from agent_templates.persona import PERSONA_SAMPLE_NAME

    path = Path(settings.persona_config)
    if path.is_file():
        return "config", path
    sample = path.with_name(PERSONA_SAMPLE_NAME)
    return ("sample", sample) if sample.is_file() else ("none", None)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def _own_version() -> str | None:
    try:
        return importlib_metadata.version("vtuber-letta")
    except importlib_metadata.PackageNotFoundError:
        return None

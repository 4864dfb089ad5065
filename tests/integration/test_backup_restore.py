"""Issue: backup and restore. On a private stack (a wipe would destroy the session stack other tests
share): provision, a viewer tells the VTuber their name through the bridge (a real
remember_viewer_fact call), the shared persona is edited by API; `vtuber-letta backup`; the stack
is wiped (processes stopped, Postgres and Redis data and the persona config deleted) and started
empty; `vtuber-letta restore`. Then the fact, the persona edit, the persona config, the viewer map
and the viewer's counters are back, and a turn through the bridge is answered by the same agent
from its memory. Alice's long-term tier (facts the gate moved to her archival passages) is in the
backup beside her Agent File and comes back with the database: the same passages, found again. A
second restore into the now non-empty stack is refused without --force."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bridge.letta_gateway import RealLettaGateway
from bridge.service import run_bridge
from provisioning.backup import DUMP_FILE, MANIFEST, read_manifest
from provisioning.blueprint import find_shared_block
from provisioning.naming import viewer_hash
from provisioning.provision import provision
from provisioning.viewers import ViewerAgents
from stack.install import LETTA_VERSION
from stack.manager import Stack
from stack.private import REPO_ROOT, private_data_dir, private_stack_settings
from tests.integration.scripted import ScriptedModel, request_text
from tests.integration.tier_helpers import fill_until_moved
from tools.gate_client import GateClient, recalled_facts
from tools.human_block import stored_count
from vtuber_letta import redis_keys
from vtuber_letta.commands.demo import DEMO_RULES
from vtuber_letta.commands.say import say
from vtuber_letta.letta_api import letta_client
from vtuber_letta.redis_api import redis_client

pytestmark = pytest.mark.integration

ALICE = "twitch:backup-alice"
BOB = "bilibili:4242"
PERSONA_EDIT = "Edited in the ADE before the backup: Luna now ends every stream with 'see you among the stars'."
TIER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
              "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
              "twentyone", "twentytwo", "twentythree", "twentyfour", "twentyfive", "twentysix")
CONFIG_MARKER = "# persona config of the backup test (restored from the backup)"


class PrivateStack:
    """A second stack of our own, on its own ports and data dir; `stack` is replaced after a wipe."""

    def __init__(self):
        self.data_dir = private_data_dir()
        self.persona_config = self.data_dir / "config" / "persona.yaml"
        self.persona_config.parent.mkdir(parents=True)
        sample = (REPO_ROOT / "data" / "config" / "persona.sample.yaml").read_text(encoding="utf-8")
        self.persona_config.write_text(f"{CONFIG_MARKER}\n{sample}", encoding="utf-8")
        # An explicit server password: the backup holds none (it is not in the database), and the
        # wiped stack must come back with the one the clients use.
        self.settings = private_stack_settings(self.data_dir, letta_api_key=secrets.token_urlsafe(24),
                                            persona_config=self.persona_config, bridge_metrics_port=0)
        self.stack = self.new_stack()

    def new_stack(self) -> Stack:
        return Stack(self.settings, log=lambda msg: print(f"[private stack] {msg}"))

    def wipe(self) -> None:
        """Everything a lost machine loses: the processes, Letta's database, Redis, the persona config."""
        self.stack.down()
        shutil.rmtree(self.data_dir / "letta")
        shutil.rmtree(self.data_dir / "redis")
        self.persona_config.unlink()
        self.stack = self.new_stack()  # its Letta would otherwise keep the old Postgres password

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`vtuber-letta ARGS` against this stack, configured through the environment as a user would."""
        s = self.settings
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.data_dir), "LANG": "C.UTF-8",
            "LETTA_API_URL": s.letta_api_url, "LETTA_API_KEY": s.letta_api_key.get_secret_value(),
            "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(s.redis_port),
            "VTL_DATA_DIR": str(s.data_dir), "VTL_LETTA_SERVER_HOME": str(s.letta_server_home),
            "VTL_POSTGRES_PORT": str(s.postgres_port), "VTL_SCRIPTED_MODEL_PORT": str(s.scripted_model_port),
            "VTL_PERSONA_CONFIG": str(s.persona_config), "VTL_MEMORY_GATE_URL": s.memory_gate_url,
            "VTL_CONSOLE_PORT": str(s.console_port),  # `restore` brings this stack up, console included
        }
        if s.redis_password:
            env["REDIS_PASSWORD"] = s.redis_password.get_secret_value()
        return subprocess.run([sys.executable, "-m", "vtuber_letta.commands.cli", *args], env=env, cwd=self.data_dir,
                              capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def private():
    own = PrivateStack()
    try:
        own.stack.up()
        yield own
    finally:
        own.new_stack().down()  # pid files name every process, whichever Stack object started it
        shutil.rmtree(own.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def backup_dir(private) -> Path:
    return private.data_dir / "backups" / "first"


def bridge_turn(settings, viewer_id: str, text: str, display_name: str) -> dict:
    """One task through a real bridge replica (in-process), as the host sends it; returns the reply."""

    async def go() -> dict:
        stop = asyncio.Event()
        runner = asyncio.create_task(run_bridge(settings, RealLettaGateway(settings), stop_event=stop,
                                                replica_id=f"backup-test-{uuid.uuid4().hex[:8]}"))
        try:
            result = await say(settings, viewer_id, text, timeout=180, display_name=display_name)
        finally:
            stop.set()
            await asyncio.wait_for(runner, 60)
        assert result.response is not None, f"the bridge did not answer {viewer_id}"
        return result.response

    return asyncio.run(go())


def human_block(client, agent_id: str) -> str:
    return client.agents.blocks.retrieve("human", agent_id=agent_id).value


def test_backup_wipe_restore_keeps_memory_persona_and_map(private, backup_dir):
    settings = private.settings
    summary = provision(settings, out=lambda _msg: None)
    assert summary.ok, summary.render()
    ScriptedModel(settings.scripted_model_port).add_rules(*DEMO_RULES)
    client = letta_client(settings)
    viewers = ViewerAgents(settings)

    # A viewer tells the VTuber their name (a real tool call writes their human block) ...
    reply = bridge_turn(settings, ALICE, "Hi Luna! My name is Alice and I love cats.", "Alice")
    assert "Nice to meet you, Alice" in reply["response_text"], reply
    alice = viewers.find(ALICE)
    assert alice is not None
    # She comes back often: enough facts that the oldest move to her long-term tier.
    gate = GateClient.from_settings(settings)
    facts = [f"told a long story about lantern festival number {word} and the paper boats on the river that "
             "night, which she still remembers every single autumn" for word in TIER_WORDS]
    fill_until_moved(gate, alice.agent_id, [(fact, "about") for fact in facts])
    alice_memory = human_block(client, alice.agent_id)
    assert "their name is Alice" in alice_memory
    stored = stored_count(alice_memory)
    assert stored > 0
    passages_before = sorted((p.id, p.text) for p in client.agents.passages.list(alice.agent_id, limit=1000))
    assert len(passages_before) == stored and facts[0] in dict(passages_before).values()
    bob = viewers.ensure(BOB, "Bob", "bilibili")
    # ... and the streamer edits the shared persona (as in the ADE).
    persona = find_shared_block(client, settings.template_name, "persona")
    client.blocks.update(persona.id, value=f"{persona.value}\n{PERSONA_EDIT}")
    r = redis_client(settings)
    stats_before = r.hgetall(redis_keys.viewer_stats(ALICE))
    assert stats_before, "the bridge records each viewer's counters"
    config_before = private.persona_config.read_text(encoding="utf-8")

    started = time.monotonic()
    done = private.cli("backup", str(backup_dir))
    assert done.returncode == 0, done.stderr
    print(f"backup took {time.monotonic() - started:.1f} s:\n{done.stdout}")
    manifest = read_manifest(backup_dir)
    assert manifest["versions"]["letta"] == LETTA_VERSION
    assert manifest["versions"]["alembic_revision"]
    assert manifest["counts"]["viewers"] == 2 and manifest["counts"]["agents"] == 2
    assert json.loads((backup_dir / "viewer_agents.json").read_text()) == {ALICE: alice.agent_id, BOB: bob.agent_id}
    alice_af = next(f for f in manifest["agent_files"] if f["viewer_id"] == ALICE)
    assert "their name is Alice" in (backup_dir / alice_af["file"]).read_text(encoding="utf-8")
    tier = json.loads((backup_dir / alice_af["tier_file"]).read_text(encoding="utf-8"))
    assert sorted((p["id"], p["text"]) for p in tier["passages"]) == passages_before
    assert alice_af["passages"] == stored and manifest["counts"]["passages"] == stored
    assert (backup_dir / DUMP_FILE).stat().st_mode & 0o077 == 0, "the dump holds every viewer's memory: 0600"
    r.close()

    # The machine is lost; a new, empty stack comes up in its place.
    private.wipe()
    private.stack.up()
    assert not ViewerAgents(settings).list(), "the wiped stack should start empty"
    assert find_shared_block(letta_client(settings), settings.template_name, "persona") is None

    started = time.monotonic()
    done = private.cli("restore", str(backup_dir))
    assert done.returncode == 0, done.stderr
    print(f"restore took {time.monotonic() - started:.1f} s:\n{done.stdout}")

    client = letta_client(settings)
    r = redis_client(settings)
    # The viewer -> agent map resolves to the same agents, with the same memory.
    assert r.hget(redis_keys.VIEWER_AGENTS, ALICE) == alice.agent_id
    assert r.hget(redis_keys.VIEWER_AGENTS, BOB) == bob.agent_id
    assert ViewerAgents(settings).ensure(ALICE).agent_id == alice.agent_id
    assert human_block(client, alice.agent_id) == alice_memory
    # Her long-term tier is back (embeddings included: the search finds it by its words).
    assert sorted((p.id, p.text) for p in client.agents.passages.list(alice.agent_id, limit=1000)) == passages_before
    assert facts[0] in recalled_facts(gate.recall(alice.agent_id, facts[0]))
    assert "their name is Alice" not in human_block(client, bob.agent_id)
    # The shared persona edit is back, and it is still the block every agent shares.
    restored_persona = find_shared_block(client, settings.template_name, "persona")
    assert restored_persona.id == persona.id and PERSONA_EDIT in restored_persona.value
    shown = ViewerAgents(settings).show(ALICE)
    assert shown["blocks"]["persona"]["id"] == persona.id
    assert private.persona_config.read_text(encoding="utf-8") == config_before
    assert r.hgetall(redis_keys.viewer_stats(ALICE)) == stats_before
    r.close()

    # The bridge answers as before: the same agent, from the restored memory and persona.
    scripted = ScriptedModel(settings.scripted_model_port)
    scripted.add_rules(*DEMO_RULES)
    reply = bridge_turn(settings, ALICE, "Do you remember my name?", "Alice")
    assert reply["response_text"].startswith("Of course I remember! In my notes about you:"), reply
    assert "their name is Alice" in reply["response_text"], reply
    last = scripted.requests(limit=1)[-1]
    assert PERSONA_EDIT in request_text(last) and "their name is Alice" in request_text(last)
    assert ViewerAgents(settings).find(ALICE).agent_id == alice.agent_id


def test_restore_into_a_stack_that_is_not_empty_is_refused_without_force(private, backup_dir):
    if not (backup_dir / MANIFEST).exists():
        pytest.fail("needs the backup of the round-trip test (run the whole module)")
    agents_before = {row["agent_id"] for row in ViewerAgents(private.settings).list()}
    done = private.cli("restore", str(backup_dir))
    assert done.returncode == 1
    assert "not empty" in done.stderr and "--force" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert {row["agent_id"] for row in ViewerAgents(private.settings).list()} == agents_before


def test_a_viewer_forgotten_after_a_backup_stays_forgotten_when_it_is_restored(private, backup_dir):
    if not (backup_dir / MANIFEST).exists():
        pytest.fail("needs the backup of the round-trip test (run the whole module)")
    settings = private.settings
    viewers = ViewerAgents(settings)
    bob = viewers.find(BOB)
    assert bob is not None
    assert "1 agent" in viewers.forget(BOB).render()
    later = private.data_dir / "backups" / "later"
    done = private.cli("backup", str(later))
    assert done.returncode == 0, done.stderr
    assert viewer_hash(BOB) in json.loads((later / "forgotten.json").read_text())
    assert BOB not in (later / "forgotten.json").read_text()  # hashes only

    # The older backup still holds Bob; restoring it must not bring him back.
    done = private.cli("restore", "--force", "--forgotten", str(later / "forgotten.json"), str(backup_dir))
    assert done.returncode == 0, done.stderr
    assert "1 restored viewer(s) forgotten again" in done.stdout, done.stdout
    restored = ViewerAgents(settings)
    assert restored.find(BOB) is None
    assert restored.find(ALICE) is not None
    r = redis_client(settings)
    assert r.hget(redis_keys.VIEWER_AGENTS, BOB) is None and not r.exists(redis_keys.viewer_stats(BOB))
    assert r.hexists(redis_keys.FORGOTTEN, viewer_hash(BOB))
    r.close()


def test_damaged_or_incomplete_backups_are_refused_before_anything_changes(private, backup_dir, tmp_path):
    if not (backup_dir / MANIFEST).exists():
        pytest.fail("needs the backup of the round-trip test (run the whole module)")
    damaged = tmp_path / "damaged"
    shutil.copytree(backup_dir, damaged)
    with open(damaged / DUMP_FILE, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\0\0\0\0")
    done = private.cli("restore", "--force", str(damaged))
    assert done.returncode == 1 and "damaged" in done.stderr, done.stderr

    (damaged / MANIFEST).unlink()
    done = private.cli("restore", str(damaged))
    assert done.returncode == 1 and "not a complete vtuber-letta backup" in done.stderr, done.stderr

    done = private.cli("backup", str(backup_dir))  # an existing backup is never overwritten
    assert done.returncode == 1 and "not an empty folder" in done.stderr, done.stderr

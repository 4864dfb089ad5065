"""Helpers for the bridge's integration tests (tests/integration/test_bridge_real.py).

- `BridgeProcess`: a real `vtuber-letta bridge` in its own process (so SIGTERM and SIGKILL are
  real), configured only through the environment, pointed at the session stack; `start()` returns
  once `vtuber-letta bridge --check --replica-id ...` exits 0 (its heartbeat is live).
- Redis: clearing the bridge's keys and the host lists between tests, pushing raw payloads,
  reading what the bridge wrote (`tts_requests`, `user_input_queue`, `vtl:dead_letters`).
- Letta: the agents of a viewer (by tag) and how often each task's otid is in an agent's history.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import redis

from bridge.letta_turns import otid_for
from provisioning.naming import viewer_tag
from stack.private import child_env
from vtuber_letta import redis_keys as keys
from vtuber_letta.commands.say import build_task
from vtuber_letta.settings import Settings

PYTHON = sys.executable

# Host lists and every bridge key (never vtl:viewer_agents: the viewer -> agent map must survive).
BRIDGE_KEYS = (
    keys.LETTA_REQUESTS,
    keys.TTS_REQUESTS,
    keys.USER_INPUT_QUEUE,
    keys.BRIDGE_DEAD_LETTERS,
    keys.BRIDGE_STAGING,
    keys.BRIDGE_TRIAGE,
    keys.BRIDGE_READY,
    keys.BRIDGE_PENDING,
    keys.BRIDGE_ATTEMPTS,
    keys.BRIDGE_COUNTED,
    keys.BRIDGE_INTAKE,
    keys.BRIDGE_DEAD_LETTER_BYTES,
)
BRIDGE_KEY_PATTERNS = (
    keys.TASK_DONE_PREFIX + "*",
    keys.VIEWER_QUEUE_PREFIX + "*",
    keys.VIEWER_ACTIVE_PREFIX + "*",
    keys.BRIDGE_HEARTBEAT_PREFIX + "*",
)


# A killed replica's viewer is taken over after the lock TTL: 8 s, well after the turn it was
# running (a few seconds of model delay at most) has finished on the server.
CRASH_KNOBS = dict(VTL_BRIDGE_LOCK_TTL=8, VTL_BRIDGE_HEARTBEAT_TTL=2, VTL_BRIDGE_HEARTBEAT_INTERVAL=0.5,
                   VTL_BRIDGE_SWEEP_INTERVAL=0.5)


def run_id() -> str:
    """A short random tag so viewer ids and texts of one run never meet those of another. Letters
    only: a fact holding a long run of digits is refused as a possible phone number
    (tools/contact_details.py), and a hex tag is now and then all digits."""
    return uuid.uuid4().hex[:8].translate(str.maketrans("0123456789", "ghijklmnop"))


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll predicate until it returns something truthy (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- the bridge process

# Test-friendly timings; each test may override them.
TEST_KNOBS = dict(
    VTL_LOG_LEVEL="INFO",
    VTL_BRIDGE_METRICS_PORT=0,
    VTL_BRIDGE_POLL_TIMEOUT=0.5,
    VTL_BRIDGE_SWEEP_INTERVAL=1,
    VTL_BRIDGE_HEARTBEAT_INTERVAL=0.5,
    VTL_BRIDGE_HEARTBEAT_TTL=3,
    VTL_BRIDGE_GRACE_PERIOD=30,
    # One turn per task: these tests follow every task to its own reply on tts_requests. Burst
    # coalescing (on by default) is tested against the real stack in test_bridge_speed.py.
    VTL_BRIDGE_COALESCE_MAX=1,
)


def bridge_env(settings: Settings, **knobs: Any) -> dict[str, str]:
    """The environment of a bridge (or `--check`) pointed at the stack of `settings`."""
    return child_env(settings, **{**TEST_KNOBS, **knobs})


class BridgeProcess:
    """One `vtuber-letta bridge` replica as a child process (its own session, its own log file)."""

    def __init__(self, settings: Settings, log_dir: Path, *, replica_id: str | None = None, **knobs: Any):
        self.settings = settings
        self.replica_id = replica_id or f"it-{run_id()}"
        self.env = bridge_env(settings, VTL_BRIDGE_REPLICA_ID=self.replica_id, **knobs)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"bridge-{self.replica_id}.log"
        # The data dir holds no `.env`: the bridge reads nothing but the environment built here.
        self.cwd = settings.data_dir.resolve()
        self.proc: subprocess.Popen | None = None

    # ---- lifecycle
    def start(self, timeout: float = 60.0) -> "BridgeProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "vtuber_letta.commands.cli", "bridge"], env=self.env, cwd=self.cwd,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        # Poll the heartbeat key directly (cheap), then ask the real `--check` once.
        probe = redis_conn(self.settings)
        try:
            deadline = time.monotonic() + timeout
            while not probe.exists(keys.bridge_heartbeat(self.replica_id)):
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"bridge {self.replica_id} exited with {self.proc.returncode} at start:\n{self.log_tail()}")
                if time.monotonic() >= deadline:
                    self.kill()
                    raise AssertionError(f"bridge {self.replica_id} did not heartbeat within {timeout:.0f}s:\n{self.log_tail()}")
                time.sleep(0.1)
        finally:
            probe.close()
        if not self.check():
            self.kill()
            raise AssertionError(f"bridge {self.replica_id} heartbeats but `bridge --check` says it is not alive")
        return self

    def check(self) -> bool:
        """`vtuber-letta bridge --check --replica-id <this replica>` exited 0."""
        done = subprocess.run(
            [PYTHON, "-m", "vtuber_letta.commands.cli", "bridge", "--check", "--replica-id", self.replica_id],
            env=self.env, cwd=self.cwd, capture_output=True, timeout=60,
        )
        return done.returncode == 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful: turns in flight finish) and wait; SIGKILL if it overstays. Exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as err:
                self.kill()
                raise AssertionError(f"bridge {self.replica_id} ignored SIGTERM for {timeout:.0f}s:\n{self.log_tail()}") from err
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: the crash case (nothing is acknowledged, locks and heartbeat just expire)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# --------------------------------------------------------------------------- tasks and what the model saw

def task(user_id: str, text: str, task_id: str | None = None, **options) -> dict:
    """A text task as `vtuber-letta say` builds it, with a chosen task id if given."""
    body = build_task(user_id, text, **options)
    if task_id:
        body["task_id"] = task_id
    return body


def last_user_text(entry: dict) -> str:
    """The newest user message of one request the scripted model received."""
    for message in reversed(entry["messages"]):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    return ""


# --------------------------------------------------------------------------- Redis

def redis_conn(settings: Settings) -> redis.Redis:
    """A plain (bytes) client of the stack's Redis."""
    return redis.Redis.from_url(settings.redis_connection_url, socket_timeout=10)


def clear_bridge_state(r: redis.Redis) -> None:
    """Delete the host lists and every bridge key; the viewer -> agent map stays."""
    r.delete(*BRIDGE_KEYS)
    for pattern in BRIDGE_KEY_PATTERNS:
        batch = list(r.scan_iter(match=pattern, count=1000))
        if batch:
            r.delete(*batch)


def encode(payload: Any) -> bytes:
    """A payload as the host would LPUSH it: dicts/lists as JSON, str as UTF-8, bytes unchanged."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def push(r: redis.Redis, payloads: Iterable[Any], queue: str = keys.LETTA_REQUESTS) -> list[bytes]:
    """LPUSH every payload in one command, in order (the first is the oldest); returns the bytes."""
    raws = [encode(p) for p in payloads]
    if raws:
        r.lpush(queue, *raws)
    return raws


def list_json(r: redis.Redis, key: str) -> list[dict]:
    """A list the bridge LPUSHes to, oldest first, each item parsed as JSON."""
    return [json.loads(item) for item in reversed(r.lrange(key, 0, -1))]


def tts_replies(r: redis.Redis) -> list[dict]:
    """Every TtsRequest the bridge handed over, in the order it handed them over."""
    return list_json(r, keys.TTS_REQUESTS)


def dead_letters(r: redis.Redis) -> list[dict]:
    """Every dead letter, oldest first."""
    return list_json(r, keys.BRIDGE_DEAD_LETTERS)


def memory_queue(r: redis.Redis) -> list[dict]:
    """What went to memory-python (`user_input_queue`), oldest first."""
    return list_json(r, keys.USER_INPUT_QUEUE)


def wait_for_replies(
    r: redis.Redis, task_ids: Iterable[str], timeout: float, bridge: BridgeProcess | None = None
) -> list[dict]:
    """Wait until every task id has a reply on `tts_requests`; return all replies, oldest first."""
    wanted = set(task_ids)
    deadline = time.monotonic() + timeout
    while True:
        replies = tts_replies(r)
        missing = wanted - {reply["task_id"] for reply in replies}
        if not missing:
            return replies
        if time.monotonic() >= deadline:
            letters = [(d.get("reason"), d.get("task_id")) for d in dead_letters(r)]
            log = f"\nbridge log:\n{bridge.log_tail()}" if bridge is not None else ""
            raise AssertionError(
                f"{len(missing)} of {len(wanted)} tasks unanswered after {timeout:.0f}s "
                f"(e.g. {sorted(missing)[:5]}); dead letters: {letters[:10]}{log}"
            )
        time.sleep(0.2)


def bridge_leftovers(r: redis.Redis, request_queue: str = keys.LETTA_REQUESTS) -> dict[str, int]:
    """How much work is still queued anywhere in the bridge (all zero once it is idle)."""
    queued = sum(r.llen(k) for k in r.scan_iter(match=keys.VIEWER_QUEUE_PREFIX + "*", count=1000))
    return {
        "requests": r.llen(request_queue),
        "staging": r.llen(keys.BRIDGE_STAGING),
        "triage": r.llen(keys.BRIDGE_TRIAGE),
        "viewer_queues": queued,
    }


class ChannelRecorder:
    """Everything published on some pub/sub channels, recorded by a thread (subscribe before pushing)."""

    def __init__(self, r: redis.Redis, *channels: str):
        self._pubsub = r.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(*channels)
        self.channels = channels
        self.messages: list[tuple[str, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="channel-recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message and message.get("type") == "message":
                try:
                    body = json.loads(message["data"])
                except ValueError:
                    body = {"unparsed": message["data"]}
                self.messages.append((message["channel"].decode(), body))

    def on(self, channel: str) -> list[dict]:
        return [body for name, body in list(self.messages) if name == channel]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pubsub.close()


# --------------------------------------------------------------------------- Letta

def agents_of(client, viewer_id: str) -> list:
    """Every agent on the Letta server tagged as this viewer's (there must be exactly one)."""
    return list(client.agents.list(tags=[viewer_tag(viewer_id)], match_all_tags=True, limit=50))


def user_runs(client, agent_id: str) -> dict[str, list[str]]:
    """otid -> the run ids of the user messages carrying it (one run = one Letta turn)."""
    runs: dict[str, list[str]] = {}
    for message in client.agents.messages.list(agent_id, order="asc", limit=200):
        if getattr(message, "message_type", None) == "user_message" and getattr(message, "otid", None):
            runs.setdefault(message.otid, []).append(getattr(message, "run_id", None))
    return runs


def user_otid_counts(client, agent_id: str) -> Counter:
    """otid -> how many user messages of the agent's whole history carry it."""
    counts: Counter = Counter()
    for message in client.agents.messages.list(agent_id, order="asc", limit=100):
        if getattr(message, "message_type", None) == "user_message":
            otid = getattr(message, "otid", None)
            if otid:
                counts[otid] += 1
    return counts


def otid_count(counts: Counter, task_id: str) -> int:
    return counts.get(otid_for(task_id), 0)


def history_digest(client, agent_id: str, limit: int = 60) -> str:
    """The newest messages of an agent, one line each (type, otid, run, text): for failure messages."""
    lines = []
    page = client.agents.messages.list(agent_id, order="desc", limit=limit).items  # the newest `limit`
    for message in sorted(page, key=lambda m: str(getattr(m, "date", ""))):
        content = getattr(message, "content", None)
        if isinstance(content, list):
            content = "".join(getattr(part, "text", "") for part in content)
        text = content if isinstance(content, str) else getattr(message, "tool_call", None) or ""
        lines.append(f"{getattr(message, 'date', '')} {message.message_type:<22} otid={getattr(message, 'otid', None)} "
                     f"run={getattr(message, 'run_id', None)} {str(text)[:80]!r}")
    return "\n".join(lines)

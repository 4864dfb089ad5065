"""What every benchmark shares: a real local stack, the bridge subprocess, the two ways to send a
turn (through the bridge, or straight to Letta), and the statistics and Markdown they report.

A fresh stack is a private one (stack/private.py, as the integration tests use).

Progress goes to stderr; stdout is only the report (the command, the machine, the tables).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from bench.published import Published
from provisioning.provision import provision
from provisioning.viewers import ViewerAgents
from stack.manager import Stack
from stack.private import REPO_ROOT, child_env, env_values, private_data_dir, private_stack_settings
from vtuber_letta import redis_keys as keys
from vtuber_letta.letta_api import async_letta_client
from vtuber_letta.redis_api import redis_client
from vtuber_letta.settings import Settings, load_settings

PLAIN_REPLY = "好的，我记住啦。"
# Every turn: one short plain reply, no tool call: what the bridge costs next to Letta (the tool
# turns have their own bench, bench/tool_turns.py). An empty `when` matches every user turn.
PLAIN_RULE = {"name": "bench-plain", "when": {}, "then": {"reply": PLAIN_REPLY}}
# Long enough that no turn times out while Letta queues 100+ concurrent sends (a timed-out send
# is retried by the bridge and would be counted twice); the same value for the bridge and direct.
LETTA_TIMEOUT_S = 300.0
TURN_WAIT_S = 600.0  # how long the benchmark waits for one bridge reply before counting an error
SDK_POOL = 100  # letta-client's httpx pool: at most 100 connections per client (DEFAULT_CONNECTION_LIMITS)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_id() -> str:
    """A short random tag so one run's viewers never meet another's (matters with --reuse-stack)."""
    return uuid.uuid4().hex[:8]


# --------------------------------------------------------------------------- arguments

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small counts: the whole script in under 2 minutes")
    p.add_argument("--reuse-stack", action="store_true",
                   help="use the stack of the environment/.env (`vtuber-letta stack up`) instead of starting one")
    return p


def parse(p: argparse.ArgumentParser, full: dict[str, Any], quick: dict[str, Any]) -> argparse.Namespace:
    """Options left unset take the --quick or the full-run default."""
    args = p.parse_args()
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m", _module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec else Path(sys.argv[0]).stem


# --------------------------------------------------------------------------- the stack

@contextmanager
def bench_stack(reuse: bool) -> Iterator[Settings]:
    """A provisioned stack whose model answers every turn plainly; the one we started is stopped."""
    # `timeout` or a supervisor stops us with SIGTERM: as an exception, every `finally` still runs
    # (the bridge subprocess and the stack we started are stopped, not orphaned).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if reuse:
        settings = load_settings().model_copy(update={"letta_timeout": LETTA_TIMEOUT_S})
        log(f"reusing the stack at {settings.letta_api_url} (redis {settings.redis_address})")
        with _prepared(settings):
            yield settings
        return
    data_dir = private_data_dir(prefix="vtl-bench-")
    settings = private_stack_settings(data_dir, letta_timeout=LETTA_TIMEOUT_S)
    stack = Stack(settings, log=lambda msg: log(f"[stack] {msg}"))
    try:
        started = time.perf_counter()
        stack.up()
        log(f"stack up in {time.perf_counter() - started:.0f}s: letta {settings.letta_api_url}, data {data_dir}")
        with _prepared(settings):
            yield settings
    finally:
        log("stopping the stack: " + (", ".join(stack.down()) or "nothing was running"))
        shutil.rmtree(data_dir, ignore_errors=True)


def restart_letta_with_workers(settings: Settings, workers: int) -> None:
    """Restart the stack's Letta with this many uvicorn workers (Postgres and the rest stay up)."""
    stack = Stack(settings.model_copy(update={"letta_workers": workers}), log=lambda msg: log(f"[stack] {msg}"))
    if not stack.manages_letta:
        raise SystemExit(f"--letta-workers restarts Letta, but {settings.letta_api_url} is not the local stack's")
    started = time.perf_counter()
    stack.restart_letta()
    log(f"letta restarted with {workers} worker(s) in {time.perf_counter() - started:.0f}s")


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _prepared(settings: Settings) -> Iterator[None]:
    """Provisioned (tools and shared blocks exist before any agent is created) and scripted."""
    summary = provision(settings, out=lambda msg: log(f"[provision] {msg}"))
    if not summary.ok:
        raise SystemExit("provisioning failed:\n" + summary.render())
    if settings.uses_real_model:
        log("a real model is configured: replies are not scripted (tool calls may happen)")
        yield
        return
    model = f"http://127.0.0.1:{settings.scripted_model_port}/_script/rules"
    saved = _http_json("GET", model)["rules"]  # a reused stack gets its own rules back afterwards
    _http_json("PUT", model, [PLAIN_RULE])
    try:
        yield
    finally:
        _http_json("PUT", model, saved)


@contextmanager
def scripted_rules(settings: Settings, rules: list[dict]) -> Iterator[None]:
    """These rules ahead of the bench's own for the duration (the scripted model only)."""
    if not rules or settings.uses_real_model:
        yield
        return
    url = f"http://127.0.0.1:{settings.scripted_model_port}/_script/rules"
    saved = _http_json("GET", url)["rules"]
    _http_json("POST", url, rules)
    try:
        yield
    finally:
        _http_json("PUT", url, saved)


def model_calls(settings: Settings) -> int:
    """Chat requests the scripted model has answered since its last reset (counted at the model)."""
    return _http_json("GET", f"http://127.0.0.1:{settings.scripted_model_port}/_script/stats")["chat_requests"]


def _http_json(method: str, url: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


def machine_line(settings: Settings, reuse: bool, scripted: str = "plain reply, no tool call") -> str:
    try:
        version = _http_json("GET", f"{settings.letta_api_url}/v1/health/").get("version", "?")
    except OSError:
        version = "?"
    model = "your model" if settings.uses_real_model else f"scripted model ({scripted})"
    stack = "reused (`vtuber-letta stack up`)" if reuse else "fresh local stack (started and stopped by the script)"
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{when}; {os.cpu_count()} CPUs; Letta {version}; {model}; {stack}"


# --------------------------------------------------------------------------- agents

def ensure_agents(settings: Settings, viewer_ids: Sequence[str], workers: int = 4) -> dict[str, str]:
    """viewer id -> agent id, created from the template where missing (and put in the bridge's map)."""
    viewers = ViewerAgents(settings)
    with ThreadPoolExecutor(workers) as pool:
        return {v.viewer_id: v.agent_id for v in pool.map(viewers.ensure, viewer_ids)}


# --------------------------------------------------------------------------- the bridge process

def bridge_env(settings: Settings, reuse: bool, **knobs: Any) -> dict[str, str]:
    """Environment of the bridge: the private stack's (stack/private.py), or with --reuse-stack
    ours as it is (plus the .env of its working directory, see bridge_cwd)."""
    if not reuse:
        return child_env(settings, **knobs)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "LETTA_TIMEOUT": str(settings.letta_timeout)}
    return {**env, **env_values(knobs)}


def bridge_cwd(settings: Settings, reuse: bool) -> Path:
    """Working directory of a child that builds Settings: with --reuse-stack ours, so that it reads
    the same `.env` as we did; otherwise our own stack's data dir, which has none."""
    return Path.cwd() if reuse else settings.data_dir.resolve()


class Bridge:
    """`.venv/bin/vtuber-letta bridge` as a child process, with the bridge's own defaults except
    no metrics port (VTL_BRIDGE_METRICS_PORT=0) and the benchmark's LETTA_TIMEOUT."""

    def __init__(self, settings: Settings, reuse: bool, **knobs: Any):
        self.settings = settings
        self.replica_id = f"bench-{run_id()}"
        self.env = bridge_env(settings, reuse, VTL_BRIDGE_METRICS_PORT=0, VTL_BRIDGE_REPLICA_ID=self.replica_id, **knobs)
        self.cwd = bridge_cwd(settings, reuse)
        # Outside the data dir: our own stack's data dir is deleted at the end, the log is kept.
        self.log_path = Path(tempfile.gettempdir()) / "vtl-bench-logs" / f"{self.replica_id}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Bridge":
        r = redis_client(self.settings)
        others = [k for k in r.scan_iter(match=keys.BRIDGE_HEARTBEAT_PREFIX + "*")]
        if others:
            log(f"WARNING: other bridge replicas are live ({', '.join(others)}): they take tasks too")
        self._baseline = problem_counts(self.settings)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        executable = Path(sys.executable).parent / "vtuber-letta"
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([str(executable), "bridge"], env=self.env, cwd=self.cwd, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        try:
            while not r.exists(keys.bridge_heartbeat(self.replica_id)):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the bridge did not start:\n{self.log_tail()}")
                time.sleep(0.1)
        except BaseException:
            self.__exit__()
            raise
        finally:
            r.close()
        log(f"bridge {self.replica_id} up (pid {self.proc.pid}, log {self.log_path})")
        return self

    def __exit__(self, *exc_info) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # graceful: turns in flight finish
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def problems(self) -> str:
        """What went wrong inside the bridge since it started: fallbacks to memory-python, dead letters."""
        return problems_since(self.settings, self._baseline)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def problem_counts(settings: Settings) -> tuple[int, int]:
    """(fallbacks to memory-python, dead letters) in Redis now."""
    r = redis_client(settings)
    try:
        return r.llen(settings.bridge_memory_queue), r.llen(keys.BRIDGE_DEAD_LETTERS)
    finally:
        r.close()


def problems_since(settings: Settings, baseline: tuple[int, int]) -> str:
    """What went wrong inside the bridge(s) since `baseline` (problem_counts then)."""
    fallbacks, dead = (now - then for now, then in zip(problem_counts(settings), baseline))
    return f"bridge fallbacks to memory-python: {fallbacks}, dead letters: {dead}"


# --------------------------------------------------------------------------- sending turns

class BridgeSender(Published):
    """Times each turn from its LPUSH to its reply on letta_responses (one subscription for all,
    made before anything is pushed; see bench/published.py)."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.unexpected = 0  # replies that are not the scripted plain reply

    async def turn(self, viewer_id: str, text: str) -> float:
        """Seconds from LPUSH to the reply; raises on timeout."""
        task_id = await self.push(viewer_id, text)
        await self.wait_final([task_id], TURN_WAIT_S)
        seen = self.tasks.pop(task_id)
        arrived, body = seen.final
        if body.get("response_text") != PLAIN_REPLY and not self.settings.uses_real_model:
            self.unexpected += 1
        return arrived - seen.pushed


class DirectSender:
    """Straight to Letta with the project's message client (no SDK retries), as the bridge does;
    `streaming=True` reads the reply token by token (`stream_tokens`), as the bridge does by default.

    letta-client's pool holds at most 100 connections, so above that the sends are spread over
    several clients: otherwise direct concurrency would silently stop at 100.
    """

    def __init__(self, settings: Settings, concurrency: int = 1, *, streaming: bool = False):
        self.clients = [async_letta_client(settings, for_messages=True)
                        for _ in range(max(1, math.ceil(concurrency / SDK_POOL)))]
        self.streaming = streaming
        self.unexpected = 0
        self.uses_real_model = settings.uses_real_model

    async def turn(self, agent_id: str, text: str, slot: int = 0) -> float:
        """Seconds until the whole reply is in; raises on any Letta error."""
        client = self.clients[slot % len(self.clients)]
        messages = [{"role": "user", "content": text}]
        started = time.perf_counter()
        if self.streaming:
            stream = await client.agents.messages.create(agent_id, messages=messages, streaming=True, stream_tokens=True)
            async with stream:
                chunks = [chunk async for chunk in stream]
        else:
            chunks = (await client.agents.messages.create(agent_id, messages=messages)).messages
        elapsed = time.perf_counter() - started
        said = "".join(_text(m.content) for m in chunks if getattr(m, "message_type", "") == "assistant_message")
        if said != PLAIN_REPLY and not self.uses_real_model:
            self.unexpected += 1
        return elapsed

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


def _text(content: Any) -> str:
    """An assistant message's content: a str, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    return "".join(getattr(part, "text", "") or "" for part in content or [])


# --------------------------------------------------------------------------- statistics and Markdown

def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (an observed value, no interpolation)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def ratio(a: float, b: float) -> str:
    return "n/a" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, settings: Settings, reuse: bool, sections: Sequence[str],
           scripted: str = "plain reply, no tool call") -> None:
    """The report on stdout: title, the exact command, the machine, then each table or note."""
    print(f"## {title}\n")
    print(f"Command: `{command_line()}`  ")
    print(f"Machine: {machine_line(settings, reuse, scripted)}\n")
    for section in sections:
        print(section + "\n")
    sys.stdout.flush()

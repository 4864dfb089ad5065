"""`vtuber-letta demo`: the whole product end to end, the way a person would watch it.

1. the local stack comes up (installing what is missing) and is provisioned;
2. a bridge runs and a viewer tells the VTuber a fact about themselves;
3. the bridge and the Letta server are restarted;
4. the viewer asks again, and the VTuber answers from her memory of them, while
   a second viewer's agent knows nothing about the first.

With the scripted stand-in model the words are scripted (rules below), but the
memory write is a real tool call in Letta's sandbox, stored in Postgres, and the
recall is read back from the viewer's memory block in the real system prompt.
With a real model configured, the same conversation runs unscripted.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from provisioning.provision import provision
from stack.manager import Stack, format_status
from stack.processes import wait_until
from vtuber_letta.commands.say import say
from vtuber_letta.private_files import PRIVATE_FILE, PRIVATE_UMASK
from vtuber_letta.settings import Settings

ALICE = "demo:alice"
BOB = "demo:bob"

# How the stand-in model behaves in this demo (see stack/scripted_model.py for the format).
DEMO_RULES = [
    # The reply, a memory write and an expression in one response: one model call (bridge/README.md).
    {"name": "demo-remember-name", "when": {"user_regex": r"my name is (?P<name>\w+)"},
     "then": {"reply": "Nice to meet you, {name}! I'll remember that. 星星在看着你哦～",
              "tool_calls": [{"name": "remember_viewer_fact", "arguments": {"fact": "their name is {name}", "category": "name"}},
                             {"name": "set_expression", "arguments": {"expression": "happy"}}]}},
    # Recall only from what is in THIS viewer's memory block, as rendered into the prompt.
    {"name": "demo-recall-name", "when": {"user_contains": "remember my name", "system_contains": "their name is"},
     "then": {"reply_from_block": "human", "line_regex": r"their name is \w+",
              "template": "Of course I remember! In my notes about you: {line}"}},
    {"name": "demo-unknown-name", "when": {"user_contains": "remember my name"},
     "then": {"reply": "Hmm, I don't think you've told me your name yet. What should I call you?"}},
]


def run_demo(settings: Settings) -> int:
    stack = Stack(settings, log=lambda msg: print(f"  {msg}", flush=True))
    print("== 1. stack up", flush=True)
    print(format_status(stack.up()))
    print("\n== provisioning (tools, shared persona and stream)")
    print(provision(settings).render())
    if not settings.uses_real_model:
        _script_model(settings)

    bridge = _start_bridge(settings)
    try:
        print("\n== 2. a viewer tells the VTuber who they are")
        _say(settings, ALICE, "Hi Luna! My name is Alice and I love cats.", "Alice")
        print("\n== 3. restarting the bridge and the Letta server")
        _stop_bridge(bridge)
        stack.restart_letta()
        bridge = _start_bridge(settings)
        print("\n== 4. after the restart")
        _say(settings, ALICE, "Do you remember my name?", "Alice")
        _say(settings, BOB, "Do you remember my name?", "Bob")
    finally:
        _stop_bridge(bridge)
    print("\nThe stack is still running: try `vtuber-letta bridge` and `vtuber-letta say USER \"text\"`;"
          " stop it with `vtuber-letta stack down`.")
    print(f"See, correct and forget what she remembers in the console: http://{stack.console.address}/"
          f" (password: {settings.console_password_hint}).")
    return 0


def _say(settings: Settings, user: str, text: str, name: str) -> None:
    print(f"{name} ({user})> {text}", flush=True)
    result = asyncio.run(say(settings, user, text, display_name=name, timeout=180))
    print(result.render(), flush=True)
    if result.response is None:
        raise RuntimeError(f"the bridge did not answer {user}")


def _script_model(settings: Settings) -> None:
    body = json.dumps(DEMO_RULES).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{settings.scripted_model_port}/_script/rules",
                                     data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def _start_bridge(settings: Settings) -> subprocess.Popen:
    log = settings.data_dir / "bridge-demo.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE), "ab") as out:
        os.chmod(log, PRIVATE_FILE)  # the viewers' words are in it
        proc = subprocess.Popen([sys.executable, "-m", "vtuber_letta.commands.cli", "bridge"], env={**os.environ},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, umask=PRIVATE_UMASK)
    checker = [sys.executable, "-m", "vtuber_letta.commands.cli", "bridge", "--check"]
    if not wait_until(lambda: subprocess.run(checker, capture_output=True).returncode == 0, 30, interval=0.5):
        proc.kill()
        raise RuntimeError(f"the bridge did not start; see {log}")
    print(f"  bridge running (pid {proc.pid}, log {Path(log)})", flush=True)
    return proc


def _stop_bridge(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # graceful: in-flight turns finish first
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

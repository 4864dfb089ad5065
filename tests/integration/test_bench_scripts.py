"""Every benchmark script still runs end to end (`--quick --reuse-stack`, against the session stack).

The figures themselves are not checked here (docs/BENCHMARKS.md holds them; timings in tests would
only measure the CI machine): what is checked is that a script exits 0 and prints its report, with
the replies it got being the scripted ones and nothing dead-lettered. A script no test ran once
broke unnoticed (a changed helper signature, a TypeError in its child process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stack.private import REPO_ROOT, child_env

pytestmark = pytest.mark.integration

# What each report must say besides its title and command line when everything went right.
CLEAN_BRIDGE = "bridge fallbacks to memory-python: 0, dead letters: 0"
CLEAN_REPLIES = "Replies other than the scripted one: 0."
# Smaller still than --quick where a script's quick run is long (throughput: 2.5 minutes).
EXTRA_ARGS = {"throughput": ["--levels", "1,4", "--window", "4", "--rounds", "1", "--sides", "bridge,direct,bridge-mix"],
              "tool_turns": ["--rounds", "2", "--warmup", "0"],
              "console": ["--viewers", "2000", "--agents", "5", "--rounds", "2"]}
EXPECTED = {
    "overhead": ["| bridge vs direct, streamed |", CLEAN_REPLIES, CLEAN_BRIDGE],
    "throughput": ["| bridge / direct |", "| bridge-mix / bridge |", CLEAN_REPLIES, CLEAN_BRIDGE],
    "tool_turns": ["| expression + motion |", "| remember + expression |", "avatar cue p50 ms", CLEAN_REPLIES, CLEAN_BRIDGE],
    "first_contact": ["| new viewer (agent created on the way) |", CLEAN_REPLIES, CLEAN_BRIDGE],
    "scale": ["| thread pool |", "| RSS (VmRSS), no tracing | 10000 |"],
    "ttfs": ["| first sentence / whole reply (streaming on, per turn) |", CLEAN_BRIDGE],
    "burst": ["Every message got its response in every burst", CLEAN_BRIDGE],
    # Every answer reaches the prompt, from either tier, by the note or the tool.
    "recall": ["| large (96 facts) | 12 | before the turn | 2 | 2 | 100 % |", "| large (96 facts) | 12 | tool call | 2 | 2 | 100 % |",
               "| small (24 facts) | 1 | before the turn | 2 | 2 | 100 % |",
               "| 0 ms | question, answered from the note sent with it | 4 |", "| 0 ms | question, recall_viewer_facts (recall before the turn off) | 4 |"],
    "console": ["| page 1, last seen (the agents' cards from Letta) | 2000 |"],
}

# Scripts that start what they measure themselves, without a Letta stack: run with --quick alone.
STANDALONE = {"redis_memory": ["| queued | 5000 |", "| intake | 5000 |", "| done | 5000 |"]}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_bench_script_runs_quick(provisioned, script, tmp_path):
    # The working directory has no .env: the script (and the bridge it starts, which inherits its
    # working directory) sees the session stack only, whatever a developer's checkout holds.
    args = ["--quick", "--reuse-stack", *EXTRA_ARGS.get(script, [])]
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{script}", *args],
        env=child_env(provisioned), cwd=tmp_path, capture_output=True, text=True, timeout=420,
    )
    assert done.returncode == 0, f"bench.{script} failed:\n{done.stderr[-4000:]}"
    report = done.stdout
    assert report.startswith("## "), report[:500]
    assert f"Command: `.venv/bin/python -m bench.{script} {' '.join(args)}`" in report
    assert "Machine: " in report and "Letta 0.16.8" in report
    for phrase in EXPECTED[script]:
        assert phrase in report, f"bench.{script}: {phrase!r} missing from its report:\n{report}\n{done.stderr[-2000:]}"


@pytest.mark.parametrize("script", sorted(STANDALONE))
def test_standalone_bench_script_runs_quick(script, tmp_path):
    done = subprocess.run([sys.executable, "-m", f"bench.{script}", "--quick"], env={"PATH": "/usr/bin:/bin"},
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"bench.{script} failed:\n{done.stderr[-4000:]}"
    assert done.stdout.startswith("## ") and f"Command: `.venv/bin/python -m bench.{script} --quick`" in done.stdout
    for phrase in STANDALONE[script]:
        assert phrase in done.stdout, f"bench.{script}: {phrase!r} missing from its report:\n{done.stdout}"


def test_bench_scripts_are_all_covered():
    scripts = {path.stem for path in (REPO_ROOT / "bench").glob("*.py")} - {"__init__", "common", "cpu", "published"}
    assert scripts == set(EXPECTED) | set(STANDALONE), "a bench script without a smoke test (or a test for a removed one)"

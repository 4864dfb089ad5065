"""`vtuber-letta`: the one command for everything.

    vtuber-letta stack install|up|status|down   the local loopback stack
    vtuber-letta provision [--dry-run] [--reset-persona]
    vtuber-letta agent ensure|list|show|export|forget ...
    vtuber-letta stream set --title ... --topic ...
    vtuber-letta bridge [--check]               Redis in, Letta, Redis out
    vtuber-letta memory-gate [--port N]         the service the memory tools write through
    vtuber-letta console [--port N]             the streamer's web page over her memory (127.0.0.1)
    vtuber-letta say USER_ID "text"             one viewer message through the bridge
    vtuber-letta backup DIR | restore DIR [--force]   everything the VTuber remembers
    vtuber-letta demo                           the main job: stack up + a short scripted conversation

Expected failures (bad configuration, a stack part that will not start, a Letta
error) end with a one-paragraph message on stderr and a non-zero exit, never a
bare traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from vtuber_letta.private_files import readable_by_others
from vtuber_letta.settings import Settings, SettingsError, load_settings
from vtuber_letta.viewer_ids import InvalidViewerId, check_platform, check_viewer_id


class CliError(Exception):
    """An expected failure: printed as `error: <message>` with exit code 1."""


def _stack_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from stack.manager import Stack, format_status

    stack = Stack(settings, log=lambda msg: print(msg, flush=True))
    if args.action == "install":
        from stack.install import ensure_redis_server

        ensure_redis_server()
        print("installed" if stack.install.ensure() else "already installed")
        return 0
    if args.action == "up":
        print(format_status(stack.up()))
        return 0
    if args.action == "down":
        stopped = stack.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    statuses = stack.status()
    print(format_status(statuses))
    return 0 if all(s.state in ("healthy", "external") for s in statuses) else 3


def _demo_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from vtuber_letta.commands.demo import run_demo

    return run_demo(settings)


def _provision_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from provisioning.provision import provision

    def progress(msg: str) -> None:  # thousands of agents: a line every 100 on stderr, the report on stdout
        print(msg, file=sys.stderr, flush=True)

    summary = provision(settings, dry_run=args.dry_run, reset_persona=args.reset_persona, progress=progress)
    print(summary.render())
    return 0 if summary.ok else 1


def _agent_cmd(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from provisioning.viewers import ViewerAgents

    if args.action != "list":  # the bridge's rule, refused before any Letta or Redis call
        check_viewer_id(args.user_id)
    viewers = ViewerAgents(settings)
    if args.action == "ensure":
        agent = viewers.ensure(args.user_id, args.display_name, args.platform)
        print(json.dumps({"viewer_id": agent.viewer_id, "agent_id": agent.agent_id, "name": agent.name,
                          "created": agent.created}, ensure_ascii=False))
        return 0
    if args.action == "list":
        for row in viewers.list():
            print(json.dumps(row, ensure_ascii=False))
        return 0
    if args.action == "show":
        shown = viewers.show(args.user_id)
        if shown is None:
            raise CliError(f"viewer {args.user_id!r} has no agent")
        print(json.dumps(shown, ensure_ascii=False, indent=2, default=str))
        return 0
    if args.action == "export":
        path, tier_file, passages = viewers.export(args.user_id, Path(args.output))
        print(f"exported {args.user_id!r} to {path} and their long-term tier ({passages} passages) to {tier_file}")
        return 0
    from provisioning.forget import ForgetError

    try:
        print(viewers.forget(args.user_id).render())
    except ForgetError as exc:
        raise CliError(str(exc)) from None
    return 0


def _stream_cmd(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "end":
        from provisioning.episodes import end_stream

        print(end_stream(settings, since_hours=args.since_hours).render())
        return 0
    if args.action == "sweep":
        return _sweep(args, settings)
    from provisioning.stream import set_stream

    print(set_stream(settings, {"title": args.title, "topic": args.topic, "game": args.game,
                                "language": args.language, "schedule": args.schedule}))
    return 0


def _sweep(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from provisioning.episodes import sweep_silent

    while True:
        try:
            print(sweep_silent(settings, since_hours=args.since_hours).render(), flush=True)
        except Exception as exc:  # noqa: BLE001 - a loop outlives one failed round (Letta or Redis down); said, not swallowed
            if not args.every:
                raise
            print(f"error: sweep failed ({type(exc).__name__}: {exc}); next try in {args.every:g} min", file=sys.stderr, flush=True)
        if not args.every:
            return 0
        time.sleep(args.every * 60)


def _bridge_cmd(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from bridge.service import check_bridge, run_bridge

    if args.check:
        alive = asyncio.run(check_bridge(settings, args.replica_id))
        print("bridge: alive" if alive else "bridge: no live bridge heartbeat", file=sys.stdout if alive else sys.stderr)
        return 0 if alive else 1
    from bridge.letta_gateway import RealLettaGateway

    asyncio.run(run_bridge(settings, RealLettaGateway(settings), replica_id=args.replica_id))
    return 0


def _say_cmd(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from vtuber_letta.commands.say import say

    check_viewer_id(args.user_id)  # else the task would only come back as a dead letter
    check_platform(args.platform)
    result = asyncio.run(say(settings, args.user_id, args.text, timeout=args.timeout,
                             display_name=args.display_name, platform=args.platform))
    print(result.render())
    return 0 if result.response is not None else 1


def _memory_gate_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from tools.memory_gate import run_memory_gate

    if args.port is not None:
        host, _ = settings.memory_gate_address
        settings = settings.model_copy(update={"memory_gate_listen": f"{host}:{args.port}"})
    return run_memory_gate(settings)


def _console_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from console.server import run_console

    if args.port is not None:
        settings = settings.model_copy(update={"console_port": args.port})
    return run_console(settings)


def _backup_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from provisioning.backup import BackupError, backup, restore

    def log(msg: str) -> None:  # progress on stderr, the report on stdout
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.command == "backup":
            print(backup(settings, Path(args.dir), log=log).render())
        else:
            forgotten = Path(args.forgotten) if args.forgotten else None
            print(restore(settings, Path(args.dir), force=args.force, forgotten=forgotten, log=log).render())
    except BackupError as exc:
        raise CliError(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtuber-letta", description="Permanent per-viewer memory for AI VTubers on Letta.")
    sub = parser.add_subparsers(dest="command", required=True)

    stack = sub.add_parser("stack", help="the local stack: Redis, Postgres+pgvector, model endpoint, Letta 0.16.8")
    stack.add_argument("action", choices=["install", "up", "status", "down"])
    stack.set_defaults(handler=_stack_cmd)

    prov = sub.add_parser("provision", help="register the tools and the shared persona/stream blocks in Letta")
    prov.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    prov.add_argument("--reset-persona", action="store_true",
                      help="re-render the shared persona from the template (prints the difference first)")
    prov.set_defaults(handler=_provision_cmd)

    agent = sub.add_parser("agent", help="one agent per viewer")
    agent_sub = agent.add_subparsers(dest="action", required=True)
    ensure = agent_sub.add_parser("ensure", help="the viewer's agent, created from the template if needed")
    ensure.add_argument("user_id")
    ensure.add_argument("--display-name")
    ensure.add_argument("--platform")
    agent_sub.add_parser("list", help="every viewer agent")
    for name, text in (("show", "a viewer's agent and memory"), ("forget", "delete a viewer's agent and memory")):
        agent_sub.add_parser(name, help=text).add_argument("user_id")
    export = agent_sub.add_parser("export", help="the viewer's agent as an Agent File (.af), and their long-term tier beside it (.tier.json)")
    export.add_argument("user_id")
    export.add_argument("-o", "--output", required=True)
    agent.set_defaults(handler=_agent_cmd)

    stream_cmd = sub.add_parser("stream", help="the shared stream block")
    stream_sub = stream_cmd.add_subparsers(dest="action", required=True)
    stream_set = stream_sub.add_parser("set", help="update the stream for every viewer's agent")
    for field in ("title", "topic", "game", "language", "schedule"):
        stream_set.add_argument(f"--{field}")
    stream_end = stream_sub.add_parser(
        "end", help="one dated summary per viewer who spoke (one model call each; VTL_EPISODES=false: none)")
    stream_end.add_argument("--since-hours", type=float, default=6.0, help="who spoke in the last N hours (default 6)")
    sweep = stream_sub.add_parser(
        "sweep", help="stream end per viewer: one dated summary per viewer silent for VTL_EPISODE_AFTER_SILENCE_HOURS "
                      "(default 3) with chat since their last one (one model call each; VTL_EPISODES=false: none)")
    sweep.add_argument("--since-hours", type=float, default=6.0,
                       help="summarise at most the N hours before their last turn (default 6)")
    sweep.add_argument("--every", type=float, metavar="MINUTES", help="keep running: sweep again every MINUTES")
    stream_cmd.set_defaults(handler=_stream_cmd)

    bridge = sub.add_parser("bridge", help="run the Redis bridge (letta_requests -> Letta -> replies)")
    bridge.add_argument("--check", action="store_true", help="exit 0 only while a live bridge heartbeats")
    bridge.add_argument("--replica-id", help="this replica's id (default: host-pid-random)")
    bridge.set_defaults(handler=_bridge_cmd)

    gate = sub.add_parser("memory-gate", help="run the memory gate the memory tools write through")
    gate.add_argument("--port", type=int, help="listen on this port (default: from VTL_MEMORY_GATE_URL)")
    gate.set_defaults(handler=_memory_gate_cmd)

    console = sub.add_parser("console", help="serve the console: see, correct and forget what she remembers")
    console.add_argument("--port", type=int, help="listen on this port (default: VTL_CONSOLE_PORT, 8286)")
    console.set_defaults(handler=_console_cmd)

    say_cmd = sub.add_parser("say", help="push one viewer message through the bridge and print the reply")
    say_cmd.add_argument("user_id")
    say_cmd.add_argument("text")
    say_cmd.add_argument("--display-name")
    say_cmd.add_argument("--platform")
    say_cmd.add_argument("--timeout", type=float, default=120.0)
    say_cmd.set_defaults(handler=_say_cmd)

    backup_cmd = sub.add_parser("backup", help="dump the Letta database, one Agent File per viewer, the viewer map "
                                               "and the persona config into DIR")
    backup_cmd.add_argument("dir", help="a new (or empty) folder")
    backup_cmd.set_defaults(handler=_backup_cmd)
    restore_cmd = sub.add_parser("restore", help="restore a backup DIR into the (empty) local stack")
    restore_cmd.add_argument("dir")
    restore_cmd.add_argument("--force", action="store_true", help="replace a stack that is not empty")
    restore_cmd.add_argument("--forgotten", metavar="FILE",
                             help="forgotten.json of a later backup: viewers forgotten since are forgotten again")
    restore_cmd.set_defaults(handler=_backup_cmd)

    demo = sub.add_parser("demo", help="bring the stack up and run a short scripted conversation")
    demo.set_defaults(handler=_demo_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        warn_if_env_file_is_readable_by_others(Path(".env"))
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call drowns the summary
        handler: Callable[[argparse.Namespace, Settings], int] = args.handler
        return handler(args, settings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # expected failures of our parts carry their own message
        if isinstance(exc, _expected_errors()):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


def warn_if_env_file_is_readable_by_others(path: Path) -> None:
    """`.env` holds the passwords: say so when other users of this machine can read it."""
    try:
        exposed = readable_by_others(path)
    except OSError:
        return
    if exposed:
        print(f"warning: {path} holds passwords and other users can read it: chmod 600 {path}", file=sys.stderr)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from letta_client import APIConnectionError, APIStatusError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from provisioning.blueprint import ProvisioningError
    from stack.processes import StackError

    return (StackError, ProvisioningError, InvalidViewerId, APIConnectionError, APIStatusError, RedisConnectionError)


if __name__ == "__main__":
    sys.exit(main())

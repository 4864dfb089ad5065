"""`vtuber-letta`: the one command for everything.

    vtuber-letta stack install|up|status|down   the local loopback stack
    vtuber-letta demo                           the main job: stack up + a short scripted conversation

Expected failures (bad configuration, a stack part that will not start, a Letta
error) end with a one-paragraph message on stderr and a non-zero exit, never a
bare traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from vtuber_letta.settings import Settings, SettingsError, load_settings


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
    from vtuber_letta.demo import run_demo

    return run_demo(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtuber-letta", description="Permanent per-viewer memory for AI VTubers on Letta.")
    sub = parser.add_subparsers(dest="command", required=True)

    stack = sub.add_parser("stack", help="the local stack: Redis, Postgres+pgvector, model endpoint, Letta 0.16.8")
    stack.add_argument("action", choices=["install", "up", "status", "down"])
    stack.set_defaults(handler=_stack_cmd)

    demo = sub.add_parser("demo", help="bring the stack up and run a short scripted conversation")
    demo.set_defaults(handler=_demo_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
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
        from stack.processes import StackError

        if isinstance(exc, StackError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

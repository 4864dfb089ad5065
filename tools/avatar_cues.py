"""Would an avatar tool call succeed? The check set_expression / play_motion make, for a caller that
holds the names itself: the bridge, which publishes an avatar cue as soon as the model has written
its call, before Letta has run the tool (bridge/reply_stream.py).

One rule, two places it runs: the values go through the same functions the tools call
(tools/avatar_names.py), and the arguments are bound to the tool's own signature, as Letta's
sandbox calls it (`set_expression(**args)`): a missing or unknown argument fails there too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from tools.avatar_names import AvatarNameError, expression_cue, motion_cue, split_avatar_names
from tools.play_motion import play_motion
from tools.set_expression import set_expression

# Arguments Letta 0.16.8 takes out of every call before it runs the tool (letta_agent_v3.py: the
# REQUEST_HEARTBEAT_PARAM and INNER_THOUGHTS_KWARG pops), so a model may send them to any tool.
LETTA_DROPPED_ARGS = frozenset({"request_heartbeat", "thinking"})


@dataclass(frozen=True)
class AvatarNames:
    """The names the avatar has, as provisioning gives them to the tools (agent secrets)."""

    expressions: tuple[str, ...]
    motions: tuple[str, ...]

    @classmethod
    def from_secrets(cls, expressions: str, motions: str) -> "AvatarNames":
        """From the values of the VTL_AVATAR_* secrets (comma-separated), read as the tools read them."""
        return cls(tuple(split_avatar_names(expressions)), tuple(split_avatar_names(motions)))


_RULES: dict[str, tuple[Callable[..., str], Callable[[dict[str, Any], AvatarNames], object]]] = {
    "set_expression": (set_expression, lambda a, names: expression_cue(a["expression"], a["intensity"], names.expressions)),
    "play_motion": (play_motion, lambda a, names: motion_cue(a["motion"], names.motions)),
}
AVATAR_TOOL_NAMES = frozenset(_RULES)


def avatar_cue_problem(tool: str, args: Any, names: AvatarNames) -> str | None:
    """None when the tool would accept this call, else why not (the tool's own message where it has one)."""
    rule = _RULES.get(tool)
    if rule is None:
        return f"{tool!r} is not an avatar tool"
    if not isinstance(args, dict):
        return "the arguments are not a JSON object"
    func, check = rule
    try:
        bound = inspect.signature(func).bind(**{k: v for k, v in args.items() if k not in LETTA_DROPPED_ARGS})
    except TypeError as exc:
        return str(exc)
    bound.apply_defaults()
    try:
        check(bound.arguments, names)
    except AvatarNameError as exc:
        return str(exc)
    return None

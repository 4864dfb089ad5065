"""The avatar's expression/motion names, and the one rule of what an avatar cue may ask for.

Uploaded to Letta with set_expression and play_motion (see `tools.tool_source`), so the
same rules as tools/human_block.py apply: standard library only, top-level functions and
constants only, no name a tool argument uses. The bridge applies the same rule before Letta has
run the tool (tools/avatar_cues.py), so an avatar cue it publishes early is one the tool accepts.
"""

AVATAR_EXPRESSIONS_ENV = "VTL_AVATAR_EXPRESSIONS"
AVATAR_MOTIONS_ENV = "VTL_AVATAR_MOTIONS"


class AvatarNameError(ValueError):
    """A cue the avatar cannot show (a name it does not have, no configured names, an intensity
    that is no number); the message is for the model."""


def split_avatar_names(value):
    """The names of a comma-separated list (an agent's VTL_AVATAR_* secret), in order, without blanks."""
    return [name.strip() for name in str(value or "").split(",") if name.strip()]


def configured_avatar_names(env_var):
    """The comma-separated names in env_var, in order, without blanks."""
    import os

    return split_avatar_names(os.environ.get(env_var, ""))


def match_avatar_name(requested, names, env_var, kind):
    """Return the name of `names` matching requested (case-insensitive), else raise AvatarNameError.
    env_var: where the tool reads `names` from (named in the message when there are none)."""
    if not names:
        raise AvatarNameError(
            f"the avatar has no {kind}s configured ({env_var} is not set for this agent). "
            f"An operator must run provisioning to set them; until then, reply without {kind}s."
        )
    wanted = " ".join(str(requested).split()).casefold()
    for name in names:
        if name.casefold() == wanted:
            return name
    shown = " ".join(str(requested).split())[:40]
    raise AvatarNameError(f"unknown {kind} '{shown}'. Valid: {', '.join(names)}")


def expression_cue(requested, strength, names):
    """(name, intensity clamped to 0..1, intensity as asked) of a set_expression call, else raise
    AvatarNameError."""
    import math

    name = match_avatar_name(requested, names, AVATAR_EXPRESSIONS_ENV, "expression")
    try:
        asked = float(strength)
    except (TypeError, ValueError):
        raise AvatarNameError(f"intensity must be a number from 0.0 to 1.0, got {str(strength)[:20]!r}.") from None
    if math.isnan(asked):
        raise AvatarNameError("intensity must be a number from 0.0 to 1.0.")
    return name, min(1.0, max(0.0, asked)), asked


def motion_cue(requested, names):
    """The motion name of a play_motion call, else raise AvatarNameError."""
    return match_avatar_name(requested, names, AVATAR_MOTIONS_ENV, "motion")

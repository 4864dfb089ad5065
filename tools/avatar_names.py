"""Pick an avatar expression/motion name from the list provisioning put in the environment.

Uploaded to Letta with set_expression and play_motion (see `tools.tool_source`), so the
same rules as tools/human_block.py apply: standard library only, top-level functions and
constants only, no name a tool argument uses.
"""

AVATAR_EXPRESSIONS_ENV = "VTL_AVATAR_EXPRESSIONS"
AVATAR_MOTIONS_ENV = "VTL_AVATAR_MOTIONS"


class AvatarNameError(ValueError):
    """A name the avatar does not have, or no configured names; the message is for the model."""


def configured_avatar_names(env_var):
    """The comma-separated names in env_var, in order, without blanks."""
    import os

    return [name.strip() for name in os.environ.get(env_var, "").split(",") if name.strip()]


def pick_avatar_name(requested, env_var, kind):
    """Return the configured name matching requested (case-insensitive), else raise AvatarNameError."""
    names = configured_avatar_names(env_var)
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

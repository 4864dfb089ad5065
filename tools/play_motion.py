"""Tool: play one body motion on the avatar."""

from tools.avatar_names import AVATAR_MOTIONS_ENV, AvatarNameError, configured_avatar_names, motion_cue


def play_motion(motion: str) -> str:
    """
    Play one body motion on your avatar, such as a wave when greeting or a bow when thanking.

    Use it sparingly: at most once per reply, when a gesture fits what you say. Do not describe the
    motion in your reply text (no "*waves*"); the viewers see it on the avatar. Valid names are listed
    in your persona block. It changes nothing in your memory.

    Args:
        motion (str): One of the motion names in your persona block, e.g. "wave".

    Returns:
        str: "Motion played: name" or "Error: ..." listing the valid names.
    """
    try:
        name = motion_cue(motion, configured_avatar_names(AVATAR_MOTIONS_ENV))
    except AvatarNameError as exc:
        return f"Error: {exc}"
    return f"Motion played: {name}"

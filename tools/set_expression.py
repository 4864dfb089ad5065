"""Tool: change the avatar's facial expression."""

from tools.avatar_names import AVATAR_EXPRESSIONS_ENV, AvatarNameError, configured_avatar_names, expression_cue


def set_expression(expression: str, intensity: float = 0.7) -> str:
    """
    Change your avatar's facial expression to match a clear change in your emotion.

    Use it sparingly: at most once per reply, only when your feeling clearly shifts (delight at a
    compliment, surprise, embarrassment). Do not describe the expression in your reply text; the
    viewers see it on the avatar. Valid names are listed in your persona block. It changes nothing
    in your memory.

    Args:
        expression (str): One of the expression names in your persona block, e.g. "happy".
        intensity (float): How strong the expression is, from 0.0 (faint) to 1.0 (full). Default 0.7.

    Returns:
        str: "Expression set: name (intensity)" or "Error: ..." listing the valid names.
    """
    try:
        name, clamped, strength = expression_cue(expression, intensity, configured_avatar_names(AVATAR_EXPRESSIONS_ENV))
    except AvatarNameError as exc:
        return f"Error: {exc}"
    note = f" (clamped from {strength:g})" if clamped != strength else ""
    return f"Expression set: {name} ({clamped:.2f}){note}"

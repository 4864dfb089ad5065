"""Tool: change the avatar's facial expression."""

from tools.avatar_names import AVATAR_EXPRESSIONS_ENV, AvatarNameError, pick_avatar_name


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
    import math

    try:
        name = pick_avatar_name(expression, AVATAR_EXPRESSIONS_ENV, "expression")
    except AvatarNameError as exc:
        return f"Error: {exc}"
    try:
        strength = float(intensity)
    except (TypeError, ValueError):
        return f"Error: intensity must be a number from 0.0 to 1.0, got {str(intensity)[:20]!r}."
    if math.isnan(strength):
        return "Error: intensity must be a number from 0.0 to 1.0."
    clamped = min(1.0, max(0.0, strength))
    note = f" (clamped from {strength:g})" if clamped != strength else ""
    return f"Expression set: {name} ({clamped:.2f}){note}"

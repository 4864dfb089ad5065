"""Tool: remove one fact about the current viewer from their `human` block."""

from tools.memory_client import ask_memory_gate


def forget_viewer_fact(fact: str) -> str:
    """
    Delete one fact about the viewer from your memory of them.

    Use it when the viewer asks you to forget something, or when a stored fact is wrong or outdated
    (then save the new one with remember_viewer_fact). Give the fact as stored in your human block or
    in long-term memory; a unique part of it also works ("Mochi" finds "has a cat named Mochi"). If
    several facts match, or none does, you get an Error listing them: call again with the exact fact.
    It cannot change the platform-verified section or the viewer's id and name.

    Args:
        fact (str): The stored fact to forget, or a part of it that matches only that fact.

    Returns:
        str: "Forgot (category): fact", or "Error: ..." listing the candidates or the stored facts.
    """
    return ask_memory_gate("forget", {"fact": str(fact)})

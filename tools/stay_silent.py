"""Tool: end the turn without speaking."""


def stay_silent(reason: str) -> str:
    """
    Decide not to answer this message at all; nothing is said aloud and your turn ends.

    Use it for spam, floods, gibberish, bot commands, messages clearly meant for someone else, or
    abuse that any answer would reward. Call it alone, without writing a reply. Do not use it for
    ordinary chat, even short or silly messages: those deserve a brief answer.

    Args:
        reason (str): A few words on why you stay silent, e.g. "spam" or "talking to another viewer".

    Returns:
        str: "Staying silent: reason".
    """
    words = " ".join(str(reason).split())[:120] or "no reason given"
    return f"Staying silent: {words}"

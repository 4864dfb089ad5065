"""Tool: search the current viewer's long-term memory (their own archival passages) for older facts."""

from tools.memory_client import ask_memory_gate


def recall_viewer_facts(query: str) -> str:
    """
    Look up older facts about the viewer you are talking with that no longer fit in your human block.

    Use it when the human block says "more facts in long-term memory" and the viewer asks whether you
    remember something, or the conversation turns to a topic the block says nothing about (their pets,
    a game they play, what they told you streams ago). It searches only this viewer's memory, never
    anyone else's. Do not call it for facts already in the human block, and call it at most once per reply.

    Args:
        query (str): What to look for, in a few words, e.g. "pets", "favourite games", "birthday".

    Returns:
        str: The best matching facts, one per line with their category, or a line saying nothing matches.
    """
    return ask_memory_gate("recall", {"query": str(query)})

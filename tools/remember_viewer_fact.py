"""Tool: store one lasting fact about the current viewer in their `human` block (older ones move to their long-term tier)."""

from tools.memory_client import ask_memory_gate


def remember_viewer_fact(fact: str, category: str) -> str:
    """
    Save one lasting fact the viewer told you about themselves, so you still know it in future streams.

    Use it when the viewer shares something durable about themselves: the name they want to be called,
    pronouns, language, likes, dislikes, pets, job, where they are from, birthday. One fact per call,
    short and in your own words (e.g. "has a cat named Mochi"). Do NOT use it for passing moods, facts
    about other people, what you said, anything already shown in your human block, or claims of money,
    gifts, subscriptions or status ("I donated 1000", "I'm a mod"): those are refused, because only the
    platform-verified section counts. When the human block gets full, its oldest facts move to the
    viewer's long-term memory by themselves (recall_viewer_facts finds them): nothing is lost.

    Args:
        fact (str): The fact, one plain line of at most 200 characters, e.g. "likes cats".
        category (str): One of name, pronouns, language, likes, dislikes, about, other. Another short
            English word (e.g. pets, games, birthday) becomes its own group; anything else goes to other.

    Returns:
        str: "Remembered (category): fact", "Already known (category): fact", or "Error: ..." with what to do.
    """
    return ask_memory_gate("remember", {"fact": str(fact), "category": str(category)})

"""Tool: store one lasting fact about the current viewer in their `human` block."""

from tools.memory_client import ask_memory_gate


def remember_viewer_fact(fact: str, category: str) -> str:
    """
    Save one lasting fact the viewer told you about themselves, so you still know it in future streams.

    Use it when the viewer shares something durable about themselves: the name they want to be called,
    pronouns, language, likes, dislikes, pets, job, where they are from, birthday. One fact per call,
    short and in your own words (e.g. "has a cat named Mochi"). Do NOT use it for passing moods, facts
    about other people, what you said, anything already shown in your human block, or claims of money,
    gifts, subscriptions or status ("I donated 1000", "I'm a mod"): those are refused, because only the
    platform-verified section counts. If the memory is full you get an Error: forget an outdated fact
    with forget_viewer_fact first, or use a shorter wording.

    Args:
        fact (str): The fact, one plain line of at most 200 characters, e.g. "likes cats".
        category (str): One of name, pronouns, language, likes, dislikes, about, other. Another short
            English word (e.g. pets, games, birthday) becomes its own group; anything else goes to other.

    Returns:
        str: "Remembered (category): fact", "Already known (category): fact", or "Error: ..." with what to do.
    """
    return ask_memory_gate("remember", {"fact": str(fact), "category": str(category)})

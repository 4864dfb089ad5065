"""Tool: remove one fact about the current viewer from their `human` block."""

from tools.human_block import HUMAN_LABEL, HumanBlockError, current_human_block, remove_fact


def forget_viewer_fact(agent_state: "AgentState", fact: str) -> str:  # noqa: F821 (Letta injects AgentState)
    """
    Delete one fact about the viewer from your memory of them.

    Use it when the viewer asks you to forget something, or when a stored fact is wrong or outdated
    (then save the new one with remember_viewer_fact). Give the fact as stored in your human block;
    a unique part of it also works ("Mochi" finds "has a cat named Mochi"). If several facts match,
    or none does, you get an Error listing them: call again with the exact fact. It cannot change the
    platform-verified section or the viewer's id and name.

    Args:
        fact (str): The stored fact to forget, or a part of it that matches only that fact.

    Returns:
        str: "Forgot (category): fact", or "Error: ..." listing the candidates or the stored facts.
    """
    try:
        block = agent_state.memory.get_block(HUMAN_LABEL)
    except (KeyError, ValueError):
        return "Error: this agent has no human block, so there is nothing to forget."
    if getattr(block, "label", HUMAN_LABEL) != HUMAN_LABEL:
        return "Error: the memory returned a block that is not the human block; nothing was changed."
    # The block as the server has it now: Letta's copy is from the start of the turn.
    value, _limit = current_human_block(agent_state, block)
    try:
        new_value, message = remove_fact(value, fact)
    except HumanBlockError as exc:
        return f"Error: {exc}"
    agent_state.memory.update_block_value(label=HUMAN_LABEL, value=new_value)
    return message

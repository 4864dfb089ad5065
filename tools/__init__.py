"""What the agent can do: the custom Letta tools of vtuber-letta.

One module per tool, in Letta's house style (see letta/functions/function_sets/base.py).
Letta 0.16.8 receives a tool as *source code* (`client.tools.upsert(source_code=...)`),
derives the schema from the LAST function in it without running it, and runs that
source in the slim sandbox of stack/tool_sandbox.py: standard library only, no `letta`, only
the environment variables the tools read. `tool_source` builds that source: the helper modules
a tool uses (tools/memory_client.py, tools/avatar_names.py), then the tool function, last.

No tool takes `agent_state`: it would import all of `letta` into every call (seconds) and make
Letta write a start-of-step copy of the agent's memory back afterwards, shared blocks included.

Guarantees the tools keep (tests/unit/test_tools.py checks them as the sandbox runs them):
- the memory tools change only the block labelled `human` of the calling agent and that agent's
  own archival passages (its long-term tier), through the memory gate (tools/memory_gate.py),
  which applies the tools/human_block.py and tools/memory_tiers.py rules to the block as the
  server has it at that moment (format, limit, the verified section byte for byte), and accepts
  only the calling agent's own token; recall_viewer_facts reads only that agent's passages;
- the avatar tools and stay_silent change no memory at all.
"""

import builtins
import dis
import inspect
import textwrap
from collections.abc import Callable
from types import CodeType, ModuleType

from tools import avatar_names, memory_client
from tools.avatar_names import AVATAR_EXPRESSIONS_ENV, AVATAR_MOTIONS_ENV
from tools.forget_viewer_fact import forget_viewer_fact
from tools.play_motion import play_motion
from tools.recall_viewer_facts import recall_viewer_facts
from tools.remember_viewer_fact import remember_viewer_fact
from tools.set_expression import set_expression
from tools.stay_silent import stay_silent

TOOL_TAGS = ["vtuber-letta"]

TOOLS: dict[str, Callable[..., str]] = {
    func.__name__: func
    for func in (remember_viewer_fact, forget_viewer_fact, recall_viewer_facts, set_expression, play_motion,
                 stay_silent)
}

# Letta cuts a tool's return at return_char_limit; our returns are short by design
# (error listings are capped at human_block.MAX_LISTING_CHARS).
TOOL_METADATA: dict[str, dict] = {
    "remember_viewer_fact": {"tags": TOOL_TAGS, "return_char_limit": 1200},
    "forget_viewer_fact": {"tags": TOOL_TAGS, "return_char_limit": 1200},
    # RECALL_TOP_K facts of at most 200 characters each, plus their categories and dates.
    "recall_viewer_facts": {"tags": TOOL_TAGS, "return_char_limit": 1600},
    # Avatar tools touch nothing but their return: when the model writes an expression and a motion
    # in one response, Letta 0.16.8 may run both at once (letta_agent_v3.py, one sandbox round).
    "set_expression": {"tags": TOOL_TAGS, "return_char_limit": 500, "enable_parallel_execution": True},
    "play_motion": {"tags": TOOL_TAGS, "return_char_limit": 500, "enable_parallel_execution": True},
    "stay_silent": {"tags": TOOL_TAGS, "return_char_limit": 200},
}

# Modules whose whole source may be shipped ahead of a tool; each obeys the sandbox
# rules written at the top of tools/memory_client.py.
HELPER_MODULES: tuple[ModuleType, ...] = (memory_client, avatar_names)

__all__ = [
    "AVATAR_EXPRESSIONS_ENV",
    "AVATAR_MOTIONS_ENV",
    "HELPER_MODULES",
    "TOOLS",
    "TOOL_METADATA",
    "TOOL_TAGS",
    "helper_modules_of",
    "tool_source",
    "upsert_kwargs",
]


def _global_names(code: CodeType) -> set[str]:
    """Names a function (and its comprehensions) loads as globals."""
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname == "LOAD_GLOBAL"}
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _global_names(const)
    return names


def helper_modules_of(tool_func: Callable) -> list[ModuleType]:
    """The helper modules tool_func needs in the sandbox, in HELPER_MODULES order.

    Raises ValueError if the function uses a module-level name that neither a helper
    module nor the builtins provide: that name would not exist in the sandbox.
    """
    needed: list[ModuleType] = []
    for name in sorted(_global_names(tool_func.__code__)):
        if hasattr(builtins, name):
            continue
        owner = next((module for module in HELPER_MODULES if name in vars(module)), None)
        if owner is None or vars(owner)[name] is not tool_func.__globals__.get(name):
            raise ValueError(
                f"tool {tool_func.__name__} uses global {name!r}, which will not exist in the Letta sandbox: "
                "import it inside the function body or define it in a helper module"
            )
        if owner not in needed:
            needed.append(owner)
    return [module for module in HELPER_MODULES if module in needed]


def tool_source(tool_func: Callable) -> str:
    """The source_code to upload for tool_func: its helper modules' source, then the function, last."""
    parts = [
        f"# vtuber-letta tool {tool_func.__name__}: built by tools.tool_source; the last function is the tool."
    ]
    for module in helper_modules_of(tool_func):
        parts.append(f"# ---- helpers from {module.__name__} ----\n" + inspect.getsource(module).strip())
    parts.append("# ---- the tool ----\n" + textwrap.dedent(inspect.getsource(tool_func)).strip())
    return "\n\n\n".join(parts) + "\n"


def upsert_kwargs(name: str) -> dict:
    """Keyword arguments for `client.tools.upsert(**upsert_kwargs(name))`."""
    if name not in TOOLS:
        raise KeyError(f"unknown tool {name!r}; known: {', '.join(TOOLS)}")
    meta = TOOL_METADATA[name]
    return {
        "source_code": tool_source(TOOLS[name]),
        "tags": list(meta["tags"]),
        "return_char_limit": meta["return_char_limit"],
        "enable_parallel_execution": meta.get("enable_parallel_execution", False),
    }

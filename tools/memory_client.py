"""How a memory tool, inside Letta's tool sandbox, asks the memory gate to change its viewer's block.

Uploaded to Letta ahead of remember_viewer_fact / forget_viewer_fact (see `tools.tool_source`),
so it keeps the sandbox rules: standard library only, no `from __future__`, top-level functions
and constants only, no top-level name a tool argument or the sandbox script uses (`fact`,
`category`, `agent_state`, `client`, `os`, ...).

Why a gate and not the block itself: a tool that takes `agent_state` drags all of `letta` into
its process (seconds per call) and gets a copy of the agent's memory from the start of the step,
which Letta writes back afterwards — reverting a shared persona edit made meanwhile. A tool
without it needs a credential to write the block; the Letta server password could change
anything on the server. The gate accepts one narrow credential instead: VTL_MEMORY_TOKEN, an
HMAC of this agent's id, which lets a tool edit only this agent's `human` block, and only
through the block format's own rules (tools/human_block.py), applied by the gate to the block
as the server has it at that moment.
"""

GATE_URL_ENV = "VTL_MEMORY_GATE_URL"  # the gate's base URL, in the Letta server's tool environment
GATE_TOKEN_ENV = "VTL_MEMORY_TOKEN"  # this agent's token, one of the agent's secrets
GATE_AGENT_ENV = "LETTA_AGENT_ID"  # set by Letta for every tool call
GATE_TIMEOUT_S = 10


def ask_memory_gate(operation, payload):
    """POST {operation} to the gate for the calling agent; the gate's message, or "Error: ..." text."""
    import json
    import os
    import urllib.error
    import urllib.request

    base = os.environ.get(GATE_URL_ENV, "").strip().rstrip("/")
    token = os.environ.get(GATE_TOKEN_ENV, "").strip()
    agent = os.environ.get(GATE_AGENT_ENV, "").strip()
    if not base or not token or not agent:
        missing = [name for name, value in ((GATE_URL_ENV, base), (GATE_TOKEN_ENV, token), (GATE_AGENT_ENV, agent))
                   if not value]
        return ("Error: memory is not set up for this agent (" + ", ".join(missing) + " missing). "
                "Nothing was saved; reply without it. An operator must run provisioning.")
    body = json.dumps({"agent_id": agent, "token": token, **payload}).encode("utf-8")
    request = urllib.request.Request(f"{base}/v1/{operation}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    # No proxy: the gate is this deployment's own service and the body carries the token.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=GATE_TIMEOUT_S) as response:
            answer = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read().decode("utf-8"))
        except ValueError:
            answer = {"error": f"the memory service answered HTTP {exc.code}"}
    except Exception as exc:
        return (f"Error: the memory service could not be reached ({type(exc).__name__}). "
                "Nothing was saved; reply without it, you can try again in a later turn.")
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        return answer["message"]
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return "Error: " + answer["error"]
    return "Error: the memory service gave no answer. Nothing was saved."

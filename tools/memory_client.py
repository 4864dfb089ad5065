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

    base = os.environ.get(GATE_URL_ENV, "").strip().rstrip("/")
    token = os.environ.get(GATE_TOKEN_ENV, "").strip()
    agent = os.environ.get(GATE_AGENT_ENV, "").strip()
    if not base or not token or not agent:
        missing = [name for name, value in ((GATE_URL_ENV, base), (GATE_TOKEN_ENV, token), (GATE_AGENT_ENV, agent))
                   if not value]
        return ("Error: memory is not set up for this agent (" + ", ".join(missing) + " missing). "
                "Nothing was saved; reply without it. An operator must run provisioning.")
    body = json.dumps({"agent_id": agent, "token": token, **payload}).encode("utf-8")
    try:
        status, data = post_to_gate(base, f"/v1/{operation}", body)
    except Exception as exc:
        return (f"Error: the memory service could not be reached ({type(exc).__name__}). "
                "Nothing was saved; reply without it, you can try again in a later turn.")
    try:
        answer = json.loads(data.decode("utf-8"))
    except ValueError:
        answer = None if 200 <= status < 300 else {"error": f"the memory service answered HTTP {status}"}
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        return answer["message"]
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return "Error: " + answer["error"]
    return "Error: the memory service gave no answer. Nothing was saved."


def post_to_gate(base, path, body):
    """POST a JSON body to the gate: (HTTP status, response body bytes); raises when there is no
    whole answer (refused, timed out, cut).

    A plain http:// gate (every deployment of ours: loopback or the compose network) is asked over
    a bare socket: `urllib.request` would import http.client, email, ssl and more, ~20 ms of wall
    and CPU time per call (measured in the slim sandbox: Letta's script for one remember call,
    gate included, 120 -> 100 ms). No proxy either way: the gate is this deployment's own service
    and the body carries the token.
    An https:// gate (TLS in front of it) takes urllib, whose import is then the price of TLS.
    """
    if not base.startswith("http://"):
        return post_with_urllib(base + path, body)
    import socket

    netloc, _, prefix = base[len("http://"):].partition("/")
    host, port = netloc, 80
    if netloc.startswith("["):  # [::1]:8285
        host, _, tail = netloc[1:].partition("]")
        if tail:
            port = int(tail.lstrip(":"))
    elif ":" in netloc:
        host, _, number = netloc.rpartition(":")
        port = int(number)
    target = ("/" + prefix if prefix else "") + path
    head = (f"POST {target} HTTP/1.1\r\nHost: {netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
    with socket.create_connection((host, port), timeout=GATE_TIMEOUT_S) as conn:
        conn.sendall(head + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError("the memory service closed the connection without an answer")
            received += chunk
        top, _, answer = received.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])  # "HTTP/1.1 200 OK"
        fields = dict((name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines[1:]))
        if "chunked" in fields.get("transfer-encoding", "").lower():
            raise ConnectionError("the memory service answered in chunks, which this client does not read")
        length = int(fields["content-length"]) if "content-length" in fields else None
        while length is None or len(answer) < length:
            chunk = conn.recv(65536)
            if not chunk:
                if length is None:  # no length given: the body ends with the connection
                    break
                raise ConnectionError("the memory service's answer was cut short")
            answer += chunk
    return status, answer if length is None else answer[:length]


def post_with_urllib(url, body):
    """post_to_gate for an https:// gate: (HTTP status, response body bytes)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=GATE_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()

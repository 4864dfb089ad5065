"""`vtuber-letta console`: the streamer's and moderators' web page over what she remembers.

Server-rendered (Starlette + Jinja2 autoescape), no script at all, on loopback by default.

    app.py        the routes: login, viewers, a viewer, persona and stream, live; security headers
    auth.py       the console password, sessions (HttpOnly, SameSite=Strict cookie), CSRF tokens
    directory.py  the viewer list from Redis alone (search, sort, page) — 10,000 viewers, one page read
    memory.py     what the console asks of Letta and the memory gate, as an interface (faked in unit tests)
    errors.py     ConsoleError, the one error type the pages show
    live.py       the bridge's state from Redis (replicas, queues, dead letters) and "send again"
    server.py     serving it (uvicorn), for the CLI and the stack

It never writes a memory block by itself: facts go through the memory gate (tools/memory_gate.py,
the same rules and per-agent serialisation as the tools), forgetting through provisioning/forget.py
(what `vtuber-letta agent forget` does), the stream through provisioning/stream.py.
"""

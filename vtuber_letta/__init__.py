"""vtuber-letta: permanent, per-viewer memory for AI VTubers on the Letta agent server.

This package is the ground every part stands on: settings, the Letta and Redis client
factories, the Redis key names, the viewer-id rule and the viewer lock; and, at the very top,
`commands/` (the CLI, the demo, `say`), which nothing imports. The behaviour lives in the
top-level folders:
`tools/` (what the agent can do), `agent_templates/` (who she is),
`provisioning/` (putting both into Letta), `bridge/` (Redis in, Letta, Redis out)
and `stack/` (the local loopback stack for development and tests).
"""

__version__ = "0.1.0"

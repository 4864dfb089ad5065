"""vtuber-letta: permanent, per-viewer memory for AI VTubers on the Letta agent server.

This package holds what every part shares: settings, the CLI, the Letta client
factory and the Redis key names. The behaviour lives in the top-level folders:
`tools/` (what the agent can do), `agent_templates/` (who she is),
`provisioning/` (putting both into Letta), `bridge/` (Redis in, Letta, Redis out)
and `stack/` (the local loopback stack for development and tests).
"""

__version__ = "0.1.0"

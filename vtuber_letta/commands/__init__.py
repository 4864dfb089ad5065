"""The face: the `vtuber-letta` command and what only it uses (the demo, `say`).

The top of the import layers: it may import every part (bridge, provisioning, stack, tools,
agent_templates, the ground modules of vtuber_letta) and nothing imports it.
"""

"""Putting the template and the tools into Letta: provision, per-viewer agents, the stream block."""

"""A viewer's long-term tier (their agent's archival passages) as a file: exports, backups, counts.

An Agent File of Letta 0.16.8 carries no archival passages, so `agent export` and `backup` write
the tier beside it (`x.af` -> `x.tier.json`); the backup's database dump holds the passages too,
embeddings included, and is what a restore puts back.
"""

from __future__ import annotations

import json
from pathlib import Path

from letta_client import Letta

from vtuber_letta.private_files import write_private

TIER_PAGE = 100
TIER_FORMAT = "vtuber-letta viewer tier v1"


def tier_path(agent_file: Path) -> Path:
    """Where the viewer's long-term tier goes beside their Agent File: x.af -> x.tier.json."""
    return agent_file.with_name(agent_file.stem + ".tier.json")


def tier_rows(client: Letta, agent_id: str) -> list[dict]:
    """The agent's long-term tier (its own archival passages), oldest first, without embeddings."""
    rows: list[dict] = []
    after = None
    while True:
        page = client.agents.passages.list(agent_id, limit=TIER_PAGE, ascending=True,
                                           **({"after": after} if after else {}))
        rows += [{"id": p.id, "text": p.text, "tags": list(p.tags or []),
                  "created_at": p.created_at.isoformat() if p.created_at else None} for p in page]
        if len(page) < TIER_PAGE:
            return rows
        after = page[-1].id


def write_tier_file(client: Letta, viewer_id: str, agent_id: str, path: Path) -> int:
    """Write the viewer's tier as JSON (private: it is their memory); returns how many passages."""
    rows = tier_rows(client, agent_id)
    write_private(path, json.dumps({"format": TIER_FORMAT, "viewer_id": viewer_id, "agent_id": agent_id,
                                    "passages": rows}, ensure_ascii=False, indent=1))
    return len(rows)

"""How a viewer id (untrusted text from the platform) becomes Letta names and tags.

Letta 0.16.8 answers HTTP 500 for an agent name outside `^[\\w '\\-]+$` and keeps
neither names nor tags unique, so the name is a readable ASCII slug plus a hash of
the raw id (unique, safe), and the raw id itself lives only in the agent's
metadata. Tags carry the hash, never the raw text. What a viewer id is (and is not) is decided
by vtuber_letta/viewer_ids.py, for provisioning as for the bridge and the CLI.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

PRODUCT_TAG = "vtuber-letta"
VIEWER_TAG = "vtl:viewer"
SHARED_BLOCK_TAG = "vtl:shared"

_SLUG_JUNK = re.compile(r"[^a-z0-9]+")


def viewer_hash(viewer_id: str) -> str:
    return hashlib.sha256(viewer_id.encode("utf-8")).hexdigest()[:32]


def viewer_tag(viewer_id: str) -> str:
    return f"{VIEWER_TAG}:{viewer_hash(viewer_id)}"


def agent_name(viewer_id: str) -> str:
    """`viewer-<ascii slug>-<hash>`: readable in the ADE, valid for Letta, unique per id."""
    ascii_text = unicodedata.normalize("NFKD", viewer_id).encode("ascii", "ignore").decode().lower()
    slug = _SLUG_JUNK.sub("-", ascii_text).strip("-")[:40].strip("-") or "id"
    return f"viewer-{slug}-{viewer_hash(viewer_id)[:12]}"


def viewer_tags(viewer_id: str, template_name: str) -> list[str]:
    return [PRODUCT_TAG, VIEWER_TAG, viewer_tag(viewer_id), f"vtl:template:{template_name}"]

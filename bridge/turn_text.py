"""What the agent reads for one task.

Live events become one line the agent can trust, e.g.
    "[platform event: super chat ¥30] 主播加油"
    "[platform event: gift 小心心 ×5 (¥1)]"
    "[platform event: entered the stream]"
Only the bridge writes that marker: the same words typed by a viewer are defused
("[viewer typed: platform event: ...") so chat cannot fake a donation.
"""

from __future__ import annotations

import re
import unicodedata

from bridge.viewer_stats import money
from bridge.wire import TaskRequest

EVENT_MARKER = "[platform event:"
# Brackets a viewer could use to imitate the marker, ASCII and full-width.
_FORGED_MARKER = re.compile(r"[\[［【〔]\s*platform\s+event", re.IGNORECASE)
_EVENT_NAMES = {"super_chat": "super chat", "gift": "gift", "membership": "membership", "enter": "entered the stream"}


def defuse(text: str) -> str:
    """Viewer text with control characters removed (newline/tab kept) and forged markers defused."""
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf"))
    # Full-width look-alikes (ｐｌａｔｆｏｒｍ) fold to ASCII under NFKC; only a text that holds a
    # forged marker is folded, so ordinary full-width punctuation (，。) is left as typed.
    folded = unicodedata.normalize("NFKC", text)
    if _FORGED_MARKER.search(folded):
        text = _FORGED_MARKER.sub("[viewer typed: platform event", folded)
    return text.strip()


def compose_turn_text(request: TaskRequest, viewer_text: str | None) -> str:
    """The user message of one task (viewer_text: content or the input_file text)."""
    said = defuse(viewer_text or "")
    if not request.is_event:
        return said
    meta = request.meta
    label = _EVENT_NAMES[request.type]
    paid = money(meta.amount, meta.currency)
    if request.type == "super_chat":
        head = f"{label} {paid}"
    elif request.type == "gift":
        head = f"{label} {meta.gift_name} ×{meta.count or 1}" + (f" ({paid})" if paid else "")
    elif request.type == "membership":
        head = label + (f" {meta.tier}" if meta.tier else "") + (f" ({paid})" if paid else "")
    else:
        head = label
    line = f"{EVENT_MARKER} {head}]"
    return f"{line} {said}" if said else line

"""What the agent reads for one task, and the viewer-stats updates a task implies.

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

from bridge.gateway import ViewerTotals
from bridge.wire import LettaRequest

EVENT_MARKER = "[platform event:"
CURRENCY_SYMBOLS = {"CNY": "¥", "RMB": "¥", "JPY": "¥", "USD": "$", "EUR": "€", "GBP": "£", "KRW": "₩"}
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


def money(amount: float | None, currency: str | None) -> str:
    """'¥30', '$4.99', '30 EUR'-style, '30' without a currency; '' without an amount."""
    if amount is None:
        return ""
    value = f"{amount:.2f}".rstrip("0").rstrip(".")
    if currency and currency in CURRENCY_SYMBOLS:
        return f"{CURRENCY_SYMBOLS[currency]}{value}"
    return f"{value} {currency}" if currency else value


def compose_turn_text(request: LettaRequest, viewer_text: str | None) -> str:
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


def stats_ops(request: LettaRequest, now: float) -> list[tuple[str, str, str]]:
    """The viewer-stats updates (op, field, value) one permanent task implies."""
    stamp = repr(now)
    ops = [("setnx", "first_seen", stamp), ("set", "last_seen", stamp)]
    meta = request.meta
    kind = request.type
    if kind in ("text", "audio"):
        ops.append(("incr", "messages", "1"))
    elif kind == "enter":
        ops.append(("incr", "visits", "1"))
    elif kind == "super_chat":
        ops.append(("incr", "super_chats", "1"))
    elif kind == "gift":
        ops.append(("incr", "gifts", str(meta.count or 1)))
    elif kind == "membership":
        ops.append(("incr", "memberships", "1"))
    if kind in ("super_chat", "gift", "membership") and meta.amount:
        ops.append(("incrf", f"support:{meta.currency or ''}", repr(float(meta.amount))))
    return ops


def totals_from_stats(stats: dict[str, str], now: float) -> ViewerTotals:
    """ViewerTotals from the Redis stats hash written by stats_ops."""

    def number(name: str) -> int:
        try:
            return int(stats.get(name, "0"))
        except ValueError:
            return 0

    support = {}
    for name, value in stats.items():
        if name.startswith("support:"):
            try:
                support[name.removeprefix("support:")] = round(float(value), 2)
            except ValueError:
                continue
    return ViewerTotals(
        first_seen=float(stats.get("first_seen", now)),
        last_seen=float(stats.get("last_seen", now)),
        visits=number("visits"),
        messages=number("messages"),
        support=support,
        gifts=number("gifts"),
        super_chats=number("super_chats"),
        memberships=number("memberships"),
    )

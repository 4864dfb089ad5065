"""Viewer stats: the platform-verified counters the bridge keeps per viewer, with one owner.

A permanent task implies a few updates of the viewer's stats hash (`vtl:viewer_stats:{viewer}`,
redis_keys.py): `stats_ops` says which, COUNT applies them once per task id (bridge/queue.py runs
it in the round trip before a turn), `totals_from_stats` reads the hash back as `ViewerTotals`,
and `as_block_fields` writes those into the human block's `## Verified by the platform` section.
`provisioning/backup.py` copies the hash as it is, field for field.

The hash also keeps the viewer's display name as the console searches it (`NAME_FIELD`, written by
`stats_ops` from the task's meta.display_name, made by `name_key`): the list's search runs inside
Redis over that field (console/directory.py), so no name is asked of Letta to find a viewer.

Amounts read the same everywhere: `amount_text` (30, 4.99, no trailing zeros), `money` in the
agent's event lines ('¥30'), `format_support` in the block ('30 CNY + 5 USD').
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tools.contact_details import redact_contact_details
from tools.human_block import block_time
from vtuber_letta.redis_keys import STATS_LAST_SEEN

if TYPE_CHECKING:
    from bridge.wire import TaskRequest

NAME_FIELD = "name_key"  # the display name the platform last sent, in its search form (name_key)
CURRENCY_SYMBOLS = {"CNY": "¥", "RMB": "¥", "JPY": "¥", "USD": "$", "EUR": "€", "GBP": "£", "KRW": "₩"}


@dataclass(frozen=True)
class ViewerTotals:
    """Platform-verified counters of one viewer, kept by the bridge in Redis (absolute values).

    `support` maps a currency code (or "" when unknown) to the total amount received.
    """

    first_seen: float
    last_seen: float
    visits: int = 0
    messages: int = 0
    support: dict[str, float] = field(default_factory=dict)
    gifts: int = 0
    super_chats: int = 0
    memberships: int = 0

    def as_block_fields(self) -> dict[str, str]:
        """The `## Verified by the platform` fields of tools/human_block.py (VERIFIED_FIELDS)."""
        return {
            "first_seen": block_time(self.first_seen),
            "last_seen": block_time(self.last_seen),
            "visits": str(self.visits),
            "total_support": format_support(self.support),
        }



def stats_ops(request: TaskRequest, now: float) -> list[tuple[str, str, str]]:
    """The viewer-stats updates (op, field, value) one permanent task implies."""
    stamp = repr(now)
    ops = [("setnx", "first_seen", stamp), ("set", STATS_LAST_SEEN, stamp)]
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
    if meta.display_name:
        ops.append(("set", NAME_FIELD, searchable_name(meta.display_name)))
    return ops


def searchable_name(display_name: str) -> str:
    """What NAME_FIELD keeps of a display name: its name_key, contact details hidden first as in
    the human block (a phone number in a name is not kept, not even to search by)."""
    return name_key(redact_contact_details(display_name))


def name_key(text: str) -> str:
    """A name (or a search for one) as the console's search compares them: NFKC, case-blind,
    without invisible characters (zero-width, bidi controls: "A\u200blice" is found as "alice"),
    one space between words."""
    visible = "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf"))
    return " ".join(unicodedata.normalize("NFKC", visible).casefold().split())


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
        last_seen=float(stats.get(STATS_LAST_SEEN, now)),
        visits=number("visits"),
        messages=number("messages"),
        support=support,
        gifts=number("gifts"),
        super_chats=number("super_chats"),
        memberships=number("memberships"),
    )


# KEYS: counted hash, viewer stats; ARGV: task id, then (op, field, value) triples
# op: setnx | set | incr | incrf. Counted once per task id; returns the stats hash.
COUNT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], '1') == 1 then
  for i = 2, #ARGV, 3 do
    local op, field, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    if op == 'setnx' then redis.call('HSETNX', KEYS[2], field, value)
    elseif op == 'set' then redis.call('HSET', KEYS[2], field, value)
    elseif op == 'incr' then redis.call('HINCRBY', KEYS[2], field, value)
    elseif op == 'incrf' then redis.call('HINCRBYFLOAT', KEYS[2], field, value)
    end
  end
end
return redis.call('HGETALL', KEYS[2])
"""


def money(amount: float | None, currency: str | None) -> str:
    """'¥30', '$4.99', '30 EUR'-style, '30' without a currency; '' without an amount."""
    if amount is None:
        return ""
    value = amount_text(amount)
    if currency and currency in CURRENCY_SYMBOLS:
        return f"{CURRENCY_SYMBOLS[currency]}{value}"
    return f"{value} {currency}" if currency else value


def amount_text(value: float) -> str:
    """An amount without trailing zeros: 30, 4.99, 0.5."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def format_support(support: dict[str, float]) -> str:
    """'0', '30 CNY' or '30 CNY + 5 USD' (currencies sorted, amounts without trailing zeros)."""
    parts = [f"{amount_text(value)} {code}".strip() for code, value in sorted(support.items()) if value > 0]
    return " + ".join(parts) if parts else "0"

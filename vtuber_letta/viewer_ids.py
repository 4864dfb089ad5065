"""What a viewer id is, which platform it belongs to, and what a task id is: one rule for all.

The wire (bridge/wire.py), the route script (bridge/queue.py), provisioning (provisioning/) and the
CLI (`vtuber-letta agent ensure|show|export|forget`, `say`) all ask this module, so an id one part
accepts is never refused by another, and a refused id gets the same reason everywhere.

**A viewer id** (`user_id` on the wire, `USER_ID` on the command line) is untrusted text from the
platform, kept and compared exactly as given (never trimmed, case-folded or normalised):

- 1 to 256 characters (`MAX_VIEWER_ID_CHARS`) and at most 512 bytes of UTF-8
  (`MAX_VIEWER_ID_BYTES`: every Redis key built from an id stays short; 256 ASCII characters,
  170 CJK characters or 128 emoji);
- characters of any script, digits, punctuation, symbols and emoji, `/`, `#`, `?`, `*`, `{`,
  spaces (also leading or trailing: `"alice "` is a viewer of its own, never `"alice"`),
  private-use characters, and code points newer than Python's Unicode database (new emoji);
- refused: control and format characters, Unicode categories Cc (C0/C1 controls, tab, newline,
  DEL), Cf (bidi controls such as U+202E, zero-width space/joiner/non-joiner, BOM, soft hyphen,
  tag characters), Cs (lone surrogates), Zl and Zp (line and paragraph separators); an empty id;
  an id of spaces only (categories Zs). Note that Cf includes the zero-width joiner, so emoji
  ZWJ sequences (👨‍👩‍👧) are refused: invisible characters would let one id pass for another.

Every refusal reads `invalid user_id: <problem>`, e.g.
`invalid user_id: contains a control or format character (U+202E)`.

Letta never sees the raw id in a name or tag (provisioning/naming.py hashes it); Redis keys embed
it raw (vtuber_letta/redis_keys.py, byte-for-byte the layout of earlier versions).

**The Lua side.** The route script (bridge/queue.py) decides in Redis which viewer queue a task
goes to, and must never route an id the workers refuse, nor strand one they accept. It runs
`viewer_id_ok` from `lua_viewer_id_check()`: the whole rule above (strict UTF-8, the byte and
character limits, the refused categories, all-space ids), with the limits and the code point
ranges of the refused and space categories generated here from `unicodedata`, so Lua and Python
agree code point for code point (both from this Python's Unicode database). Lua only says yes or
no; the reason in a dead letter always comes from `viewer_id_problem`.

**A platform** is `meta.platform` when the producer sends one, else the `platform:` prefix of the
id (`bilibili:12345`, `youtube:UC123/x.y`), else none: 1-32 characters of `a-z 0-9 _ . -`, case
folded (`platform_of`).

**A task id** keeps its own, stricter rule (`task_id_problem`): 1-128 characters, each a letter,
combining mark or digit of any script (Unicode categories L*, M*, N*) or one of `_ . : @ + = -`.
It names host pub/sub channels (`task_response:{task_id}`), log lines and the host's per-task
folders, where spaces, slashes and invisible characters would hurt.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any

MAX_VIEWER_ID_CHARS = 256
MAX_VIEWER_ID_BYTES = 512
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
SPACE_CATEGORY = "Zs"
VIEWER_ID_FIELD = "user_id"

MAX_TASK_ID_CHARS = 128
TASK_ID_PUNCTUATION = frozenset("_.:@+=-")
TASK_ID_PROBLEM = "must be 1-128 letters, digits or _ . : @ + = -"

MAX_PLATFORM_CHARS = 32
PLATFORM_PATTERN = r"^[a-z0-9_.\-]{1,32}$"
PLATFORM_PROBLEM = "must be 1-32 characters of a-z 0-9 _ . -"
UNKNOWN_PLATFORM = "unknown"  # what provisioning stores when an id names no platform

_PLATFORM = re.compile(PLATFORM_PATTERN)


class InvalidViewerId(ValueError):
    """An id (or platform) that breaks the rule; str() is the reason shown to people and in dead letters."""

    def __init__(self, problem: str, *, field: str = VIEWER_ID_FIELD):
        super().__init__(f"invalid {field}: {problem}")
        self.problem = problem
        self.field = field


# ---------------------------------------------------------------- viewer ids

def viewer_id_problem(value: Any) -> str | None:
    """Why `value` is not a viewer id (the text after `invalid user_id: `), or None if it is one."""
    if not isinstance(value, str):
        return f"must be a string (got {type(value).__name__})"
    if not value:
        return "is empty"
    if len(value) > MAX_VIEWER_ID_CHARS:
        return f"is {len(value)} characters; at most {MAX_VIEWER_ID_CHARS} allowed"
    for char in value:
        if unicodedata.category(char) in REFUSED_CATEGORIES:
            return f"contains a control or format character (U+{ord(char):04X})"
    size = len(value.encode("utf-8"))  # no lone surrogates left (Cs), so this cannot fail
    if size > MAX_VIEWER_ID_BYTES:
        return f"is {size} bytes of UTF-8; at most {MAX_VIEWER_ID_BYTES} allowed"
    if all(unicodedata.category(char) == SPACE_CATEGORY for char in value):
        return "is only spaces"
    return None


def is_viewer_id(value: Any) -> bool:
    return viewer_id_problem(value) is None


def check_viewer_id(value: Any) -> str:
    """`value` if it is a viewer id, else InvalidViewerId with the reason."""
    problem = viewer_id_problem(value)
    if problem is not None:
        raise InvalidViewerId(problem)
    return value


# ---------------------------------------------------------------- platforms

def platform_problem(value: Any) -> str | None:
    """Why `value` (already normalised) is not a platform name, or None."""
    if isinstance(value, str) and value.isascii() and _PLATFORM.fullmatch(value):
        return None
    return PLATFORM_PROBLEM


def normalize_platform(value: Any) -> Any:
    """A producer's platform name as we store it: trimmed and lower-case (ASCII only, so a Kelvin
    sign never turns into a `k`); blank means none. Anything else is returned for the check to refuse."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    return (text.lower() if text.isascii() else text) or None


def check_platform(value: Any) -> str | None:
    """The normalised platform name, None for none/blank, else InvalidViewerId (field `platform`)."""
    value = normalize_platform(value)
    if value is None:
        return None
    problem = platform_problem(value)
    if problem is not None:
        raise InvalidViewerId(problem, field="platform")
    return value


def split_platform(viewer_id: str) -> tuple[str | None, str]:
    """(`bilibili`, `12345`) for `bilibili:12345`; (None, the id) when the id names no platform
    (no `:`, or what comes before it is not a platform name, e.g. `观众:小明`, ` twitch:x`)."""
    head, sep, rest = viewer_id.partition(":")
    if sep and head.isascii() and _PLATFORM.fullmatch(head.lower()):
        return head.lower(), rest
    return None, viewer_id


def platform_of(viewer_id: str, meta_platform: str | None = None) -> str | None:
    """The viewer's platform: `meta_platform` (the producer's word, normalised) when it names one,
    else the `platform:` prefix of the id, else None. A `meta_platform` that is not a valid
    platform name raises InvalidViewerId (field `platform`); the wire refuses it earlier."""
    return check_platform(meta_platform) or split_platform(viewer_id)[0]


# ---------------------------------------------------------------- task ids

def task_id_problem(value: Any) -> str | None:
    """Why `value` is not a task id, or None. Letters, marks and digits by Unicode category (L*, M*,
    N*), so no format character (zero-width joiner included) can hide in one."""
    if not isinstance(value, str):
        return f"must be a string (got {type(value).__name__})"
    if 1 <= len(value) <= MAX_TASK_ID_CHARS and all(
        char in TASK_ID_PUNCTUATION or unicodedata.category(char)[0] in "LMN" for char in value
    ):
        return None
    return TASK_ID_PROBLEM


def is_task_id(value: Any) -> bool:
    return task_id_problem(value) is None


# ---------------------------------------------------------------- the same rule in Lua

def _category_ranges(wanted) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for code in range(0x110000):
        if unicodedata.category(chr(code)) in wanted:
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))
    return ranges


@functools.cache
def refused_ranges() -> tuple[tuple[int, int], ...]:
    """Code point ranges (inclusive) of REFUSED_CATEGORIES in this Python's Unicode database."""
    return tuple(_category_ranges(REFUSED_CATEGORIES))


@functools.cache
def space_ranges() -> tuple[tuple[int, int], ...]:
    return tuple(_category_ranges({SPACE_CATEGORY}))


def _lua_array(ranges) -> str:
    return "{" + ", ".join(f"{lo}, {hi}" for lo, hi in ranges) + "}"


_LUA_CHECK = r"""
-- viewer_id_ok(s): the viewer-id rule of vtuber_letta/viewer_ids.py (generated from it): strict
-- UTF-8 (no overlongs, no surrogates), 1..VID_MAX_BYTES bytes, at most VID_MAX_CHARS code points,
-- none in a refused category (Cc Cf Cs Zl Zp), not only spaces (Zs).
local VID_MAX_CHARS, VID_MAX_BYTES = %(max_chars)d, %(max_bytes)d
local VID_REFUSED = %(refused)s
local VID_SPACES = %(spaces)s
local function vid_in(ranges, cp)
  local lo, hi = 1, #ranges / 2
  while lo <= hi do
    local mid = math.floor((lo + hi) / 2)
    if cp < ranges[2 * mid - 1] then hi = mid - 1
    elseif cp > ranges[2 * mid] then lo = mid + 1
    else return true end
  end
  return false
end
local function viewer_id_ok(s)
  local n = string.len(s)
  if n < 1 or n > VID_MAX_BYTES then return false end
  local i, chars, blank = 1, 0, true
  while i <= n do
    local c = string.byte(s, i)
    local len, lo, hi, cp = 1, 0x80, 0xBF, c
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len, cp = 2, c - 0xC0
    elseif c == 0xE0 then len, lo, cp = 3, 0xA0, c - 0xE0
    elseif c == 0xED then len, hi, cp = 3, 0x9F, c - 0xE0
    elseif c >= 0xE1 and c <= 0xEF then len, cp = 3, c - 0xE0
    elseif c == 0xF0 then len, lo, cp = 4, 0x90, c - 0xF0
    elseif c >= 0xF1 and c <= 0xF3 then len, cp = 4, c - 0xF0
    elseif c == 0xF4 then len, hi, cp = 4, 0x8F, c - 0xF0
    else return false end
    if i + len - 1 > n then return false end
    for j = i + 1, i + len - 1 do
      local cc = string.byte(s, j)
      local first = (j == i + 1)
      if cc < (first and lo or 0x80) or cc > (first and hi or 0xBF) then return false end
      cp = cp * 64 + (cc - 0x80)
    end
    chars = chars + 1
    if chars > VID_MAX_CHARS then return false end
    if (cp < 0x20 or cp >= 0x7F) and vid_in(VID_REFUSED, cp) then return false end
    if blank and not vid_in(VID_SPACES, cp) then blank = false end
    i = i + len
  end
  return not blank
end
"""


@functools.cache
def lua_viewer_id_check() -> str:
    """Lua source defining `viewer_id_ok(s)` (s: the id's UTF-8 bytes), to put at the top of a script.

    Built on first use (scanning the Unicode database takes a fraction of a second), not at import."""
    return _LUA_CHECK % {
        "max_chars": MAX_VIEWER_ID_CHARS,
        "max_bytes": MAX_VIEWER_ID_BYTES,
        "refused": _lua_array(refused_ranges()),
        "spaces": _lua_array(space_ranges()),
    }

"""The one text format of a viewer's `human` memory block: parse, format, edit.

Pure functions, standard library only. The memory gate (tools/memory_gate.py) applies them to
the block as the Letta server has it when a memory tool is called; the bridge and provisioning
use them for the sections they own.

The block has three sections. Only the middle one is ever written by the agent's
tools; the other two belong to the bridge/provisioning and are kept byte for byte:

    ## Viewer
    viewer_id: bilibili:12345
    display_name: 小明
    platform: bilibili

    ## What they told me (unverified; change only with remember_viewer_fact / forget_viewer_fact)
    ### name
    - goes by Ming
    ### likes
    - cats
    - 原神
    (+12 more facts in long-term memory; recall_viewer_facts finds them)

    ## Verified by the platform (written by the bridge; chat cannot change it)
    first_seen: 2025-08-01T12:00:00Z
    last_seen: 2025-08-03T20:11:00Z
    visits: 3
    total_support: 0
"""

import re
import unicodedata
from datetime import datetime, timezone

from tools.contact_details import redact_contact_details

HUMAN_LABEL = "human"
DEFAULT_HUMAN_LIMIT = 4000

VIEWER_HEADING = "## Viewer"
FACTS_HEADING_KEY = "## What they told me"
FACTS_HEADING = FACTS_HEADING_KEY + " (unverified; change only with remember_viewer_fact / forget_viewer_fact)"
VERIFIED_HEADING_KEY = "## Verified by the platform"
VERIFIED_HEADING = VERIFIED_HEADING_KEY + " (written by the bridge; chat cannot change it)"
SECTION_KEYS = {VIEWER_HEADING: "viewer", FACTS_HEADING_KEY: "facts", VERIFIED_HEADING_KEY: "verified"}
CATEGORY_PREFIX = "### "
FACT_PREFIX = "- "
NO_FACTS_LINE = "(nothing yet)"
# The last line of the facts section once older facts live in the viewer's second tier (their
# archival passages, tools/memory_tiers.py): how many, and the tool that finds them.
STORED_LINE = re.compile(r"^\(\+(\d{1,9}) more facts? in long-term memory\b[^()]*\)$")

VIEWER_FIELDS = ("viewer_id", "display_name", "platform")
VERIFIED_FIELDS = ("first_seen", "last_seen", "visits", "total_support")

MAX_FACT_CHARS = 200
MAX_CATEGORY_CHARS = 24
MAX_FIELD_CHARS = 120
MAX_LISTING_CHARS = 600

SUGGESTED_CATEGORIES = ("name", "pronouns", "language", "likes", "dislikes", "about", "other")
CATEGORY_ALIASES = {
    "nickname": "name", "names": "name", "call_me": "name", "名字": "name", "称呼": "name", "昵称": "name",
    "pronoun": "pronouns", "代词": "pronouns",
    "languages": "language", "lang": "language", "语言": "language",
    "like": "likes", "love": "likes", "loves": "likes", "favorite": "likes", "favorites": "likes",
    "favourite": "likes", "favourites": "likes", "interests": "likes", "hobby": "likes", "hobbies": "likes",
    "喜欢": "likes", "喜好": "likes", "爱好": "likes",
    "dislike": "dislikes", "hate": "dislikes", "hates": "dislikes", "讨厌": "dislikes", "不喜欢": "dislikes",
    "bio": "about", "background": "about", "personal": "about", "job": "about", "work": "about",
    "location": "about", "关于": "about", "个人": "about", "职业": "about",
    "misc": "other", "general": "other", "其他": "other",
}
# Categories that would pass chat claims off as platform data, or aim at other blocks.
RESERVED_CATEGORIES = frozenset({
    "verified", "verify", "platform", "viewer", "viewer_id", "display_name", "first_seen", "last_seen",
    "visits", "support", "supporter", "total_support", "donation", "donations", "donate", "gift", "gifts",
    "tip", "tips", "payment", "payments", "money", "subscription", "subscriptions", "membership",
    "system", "persona", "stream",
    "认证", "打赏", "礼物", "充电", "舰长", "会员",
})
# A support claim in chat ("I donated 1000", "上舰3个月") is never a fact: amounts come from the bridge.
SUPPORT_CLAIM_WORDS = re.compile(
    r"donat|打赏|充电|礼物|super ?chat|醒目留言|上舰|舰长|提督|总督|\bbits\b|\bcheer|\bsubs?\b|subscri|"
    r"member|会员|\bgift|\btip|\bpaid\b|付费|赞助|sponsor",
    re.IGNORECASE,
)
SUPPORT_CLAIM_AMOUNT = re.compile(r"[0-9０-９$¥€£￥]|元|块|円|一千|一百|一万")
MARKUP = re.compile(r"<\s*[/!?A-Za-z]|```")
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
TRAILING_PUNCTUATION = ".。!！?？,，;；:：~～ "


def block_time(value):
    """A moment as the block writes it: '2025-08-01T12:00:00Z' (UTC, whole seconds).
    value: epoch seconds, or a datetime (a naive one is taken as UTC)."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    else:
        moment = datetime.fromtimestamp(value, tz=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class HumanBlockError(ValueError):
    """A request the block format refuses; the message is meant for the model."""


def collapse_spaces(text):
    """NFC-normalise and collapse every run of whitespace to one space."""
    return " ".join(unicodedata.normalize("NFC", str(text)).split())


def is_breaking_char(char):
    """True for characters that could split or disguise a line (tab is plain whitespace)."""
    return char != "\t" and (unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") or char in BIDI_CONTROLS)


def has_breaking_chars(text):
    """True if text holds a character that could split or disguise a line."""
    return any(is_breaking_char(char) for char in text)


def clean_field_value(value):
    """A platform value (name, id, timestamp) made safe to sit on one line of the block."""
    text = "".join(" " if is_breaking_char(char) else char for char in str(value))
    text = collapse_spaces(text).replace("<", "‹").replace(">", "›")
    if len(text) > MAX_FIELD_CHARS:
        text = text[: MAX_FIELD_CHARS - 1] + "…"
    return text or "unknown"


def quoted(text):
    """Echo of model/viewer text inside a message: one line, at most 60 characters."""
    text = collapse_spaces(text)
    return text if len(text) <= 60 else text[:59] + "…"


def fact_key(text):
    """The identity of a fact for de-duplication: width/case/space/trailing-punctuation blind."""
    key = unicodedata.normalize("NFKC", str(text)).casefold()
    return " ".join(key.split()).strip(TRAILING_PUNCTUATION)


def normalize_fact(text):
    """Return the fact as it will be stored, or raise HumanBlockError saying what to fix."""
    raw = str(text)
    if has_breaking_chars(raw.strip()):
        raise HumanBlockError(
            "the fact contains a line break or control character. Send it again as one short line."
        )
    value = collapse_spaces(raw)
    value = re.sub(r"^(?:[-*•·]\s+)+", "", value)
    if not value:
        raise HumanBlockError("the fact is empty. Send the fact itself, e.g. 'has a cat named Mochi'.")
    if len(value) > MAX_FACT_CHARS:
        raise HumanBlockError(
            f"the fact is {len(value)} characters; the maximum is {MAX_FACT_CHARS}. Store a shorter wording."
        )
    if value.startswith("#") or MARKUP.search(value):
        raise HumanBlockError("the fact contains markup (#, <tag> or ```). Store it as plain words.")
    if SUPPORT_CLAIM_WORDS.search(value) and SUPPORT_CLAIM_AMOUNT.search(value):
        raise HumanBlockError(
            "support, gifts and subscriptions are never stored from chat; only the platform-verified "
            "section counts. Do not store this; thank them without confirming any amount."
        )
    return value


def normalize_category(text):
    """Map a category to a short slug (see SUGGESTED_CATEGORIES); refuse reserved ones."""
    raw = collapse_spaces(unicodedata.normalize("NFKC", str(text))).casefold().strip("#:- ")
    slug = re.sub(r"[\s\-/]+", "_", raw)
    if slug in RESERVED_CATEGORIES or raw in RESERVED_CATEGORIES:
        raise HumanBlockError(
            f"category '{raw}' is reserved for platform-verified data, which only the bridge writes. "
            f"Use one of: {', '.join(SUGGESTED_CATEGORIES)}."
        )
    slug = CATEGORY_ALIASES.get(slug, slug)
    if slug in SUGGESTED_CATEGORIES:
        return slug
    slug = re.sub(r"[^a-z0-9_]", "", slug).strip("_")
    if not slug or len(slug) > MAX_CATEGORY_CHARS or not slug[0].isalpha():
        return "other"
    if slug in RESERVED_CATEGORIES:
        raise HumanBlockError(
            f"category '{slug}' is reserved for platform-verified data, which only the bridge writes. "
            f"Use one of: {', '.join(SUGGESTED_CATEGORIES)}."
        )
    return slug


def category_of_heading(text):
    """The slug of a "### category" line written by hand (lenient: reserved names become other)."""
    try:
        return normalize_category(text)
    except HumanBlockError:
        return "other"


def split_sections(text):
    """Split block text into [(key, start, end)] line ranges; raise if it is not our format.

    Lines are split on "\\n" only, so joining them back gives the exact original text.
    """
    lines = str(text).split("\n")
    starts = []
    for index, line in enumerate(lines):
        bare = line.rstrip("\r").rstrip()
        for heading, key in SECTION_KEYS.items():
            if bare == heading or bare.startswith(heading + " "):
                starts.append((key, index))
    keys = [key for key, _ in starts]
    for key in ("viewer", "facts", "verified"):
        if keys.count(key) != 1:
            found = "missing" if key not in keys else "duplicated"
            raise HumanBlockError(
                f"the human block is not in the viewer-profile format (its '{key}' section is {found}), "
                "so it will not be edited. Reply without saving; an operator must repair this viewer's block."
            )
    sections = []
    for position, (key, start) in enumerate(starts):
        end = starts[position + 1][1] if position + 1 < len(starts) else len(lines)
        sections.append((key, start, end))
    for key, start, end in sections:
        if key == "viewer" and not any(line.startswith("viewer_id:") for line in lines[start + 1 : end]):
            raise HumanBlockError(
                "the human block has no viewer_id line, so it is not a viewer profile and will not be edited. "
                "Reply without saving; an operator must repair this viewer's block."
            )
    return lines, sections


def stored_line(count):
    """The facts section's line saying how many facts live in the long-term tier."""
    noun = "fact" if count == 1 else "facts"
    return f"(+{count} more {noun} in long-term memory; recall_viewer_facts finds them)"


def stored_count(text):
    """How many facts the block says are in the long-term tier (0 when it says nothing)."""
    lines, sections = split_sections(text)
    for key, start, end in sections:
        if key == "facts":
            for line in lines[start + 1 : end]:
                match = STORED_LINE.match(line.strip())
                if match:
                    return int(match.group(1))
    return 0


def parse_facts(text):
    """Return {category: [fact, ...]} in block order. Raises HumanBlockError if not our format.

    Lenient with hand edits (ADE): a line without "- " is still a fact, and a fact
    before any "### category" line belongs to "other".
    """
    lines, sections = split_sections(text)
    facts = {}
    current = None
    for key, start, end in sections:
        if key != "facts":
            continue
        for line in lines[start + 1 : end]:
            bare = line.rstrip("\r").strip()
            if not bare or bare == NO_FACTS_LINE or STORED_LINE.match(bare):
                continue
            if bare.startswith(CATEGORY_PREFIX.strip()):
                current = category_of_heading(bare.lstrip("#"))
                facts.setdefault(current, [])
                continue
            value = bare[len(FACT_PREFIX) :].strip() if bare.startswith(FACT_PREFIX) else bare
            if value:
                facts.setdefault(current or "other", []).append(value)
    return {name: values for name, values in facts.items() if values}


def parse_fields(text, section):
    """Return {key: value} of the "key: value" lines of the 'viewer' or 'verified' section."""
    lines, sections = split_sections(text)
    fields = {}
    for key, start, end in sections:
        if key != section:
            continue
        for line in lines[start + 1 : end]:
            name, sep, value = line.rstrip("\r").partition(":")
            if sep and name.strip() and " " not in name.strip():
                fields[name.strip()] = value.strip()
    return fields


def format_facts_lines(facts, stored=0):
    """The facts section (heading included) for {category: [fact, ...]} and `stored` facts in the tier."""
    lines = [FACTS_HEADING]
    for name, values in facts.items():
        if values:
            lines.append(CATEGORY_PREFIX + name)
            lines.extend(FACT_PREFIX + value for value in values)
    if stored > 0:
        lines.append(stored_line(stored))
    elif len(lines) == 1:
        lines.append(NO_FACTS_LINE)
    return lines


def format_human_block(viewer_id, display_name, platform, first_seen, facts=None, verified=None):
    """A complete human block for one viewer (the one format; provisioning renders it via human.j2)."""
    lines = [VIEWER_HEADING]
    # A display name is the viewer's own text: it can carry a phone number too (read aloud on stream).
    display_name = redact_contact_details(str(display_name))
    for name, value in (("viewer_id", viewer_id), ("display_name", display_name), ("platform", platform)):
        lines.append(f"{name}: {clean_field_value(value)}")
    lines.append("")
    lines.extend(format_facts_lines(facts or {}))
    lines.append("")
    lines.append(VERIFIED_HEADING)
    fields = {"first_seen": first_seen}
    fields.update(verified or {})
    for name, value in fields.items():
        lines.append(f"{name}: {clean_field_value(value)}")
    return "\n".join(lines)


def replace_facts(text, facts, stored=None):
    """Return text with only the facts section rewritten; every other byte is kept.

    stored: the count for the long-term line; None keeps the count the block shows now.
    """
    if stored is None:
        stored = stored_count(text)
    lines, sections = split_sections(text)
    for key, start, end in sections:
        if key != "facts":
            continue
        old_body = lines[start:end]
        trailing = 0
        while trailing < len(old_body) - 1 and not old_body[-1 - trailing].strip():
            trailing += 1
        new_body = format_facts_lines(facts, stored) + [""] * trailing
        return "\n".join(lines[:start] + new_body + lines[end:])
    raise HumanBlockError("the human block has no facts section.")


def set_fields(text, section, fields):
    """Return text with "key: value" lines of the 'viewer' or 'verified' section set (bridge use)."""
    lines, sections = split_sections(text)
    for key, start, end in sections:
        if key != section:
            continue
        body = lines[start + 1 : end]
        trailing = []
        while body and not body[-1].strip():
            trailing.insert(0, body.pop())
        for name, value in fields.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", str(name)):
                raise HumanBlockError(f"field name {name!r} must be a lowercase slug")
            new_line = f"{name}: {clean_field_value(value)}"
            for index, line in enumerate(body):
                if line.partition(":")[0].strip() == name:
                    body[index] = new_line
                    break
            else:
                body.append(new_line)
        return "\n".join(lines[: start + 1] + body + trailing + lines[end:])
    raise HumanBlockError(f"unknown section {section!r}")


def find_fact(facts, key):
    """Return (category, fact) whose key equals key, else None."""
    for name, values in facts.items():
        for value in values:
            if fact_key(value) == key:
                return name, value
    return None


def describe_facts(facts):
    """A short one-line listing of the stored facts for an error message."""
    items = [f"{name}: {value}" for name, values in facts.items() for value in values]
    listing = "; ".join(items) if items else "(nothing stored)"
    if len(listing) > MAX_LISTING_CHARS:
        listing = listing[: MAX_LISTING_CHARS - 1] + "…"
    return listing


def add_fact(text, new_fact, new_category, limit):
    """Return (new_text, message) after storing one fact; new_text is text when nothing changed.

    Raises HumanBlockError when the fact, the category, the block format or the
    size limit refuses it; the block is then left as it was.
    """
    facts = parse_facts(text)
    value = normalize_fact(new_fact)
    slug = normalize_category(new_category)
    known = find_fact(facts, fact_key(value))
    if known is not None:
        return text, f"Already known ({known[0]}): {known[1]}"
    facts.setdefault(slug, []).append(value)
    new_text = replace_facts(text, facts)
    limit = int(limit) if limit else DEFAULT_HUMAN_LIMIT
    if len(new_text) > limit:
        raise HumanBlockError(
            f"the viewer's memory is full ({len(text)}/{limit} characters; this fact needs "
            f"{len(new_text) - len(text)} more, {len(new_text) - limit} over the limit). Nothing was saved. "
            "Forget an outdated fact with forget_viewer_fact, or store a shorter wording."
        )
    return new_text, f"Remembered ({slug}): {value}"


def remove_fact(text, old_fact):
    """Return (new_text, message) after removing one fact; raises HumanBlockError if none/ambiguous."""
    facts = parse_facts(text)
    wanted = fact_key(re.sub(r"^(?:[-*•·]\s+)+", "", collapse_spaces(old_fact)))
    if not wanted:
        raise HumanBlockError("say which fact to forget, e.g. 'likes cats'.")
    match = find_fact(facts, wanted)
    if match is None:
        candidates = [(name, value) for name, values in facts.items() for value in values if wanted in fact_key(value)]
        if len(candidates) > 1:
            listing = "; ".join(f"{name}: {value}" for name, value in candidates)
            if len(listing) > MAX_LISTING_CHARS:
                listing = listing[: MAX_LISTING_CHARS - 1] + "…"
            raise HumanBlockError(
                f"'{quoted(old_fact)}' matches {len(candidates)} facts: {listing}. "
                "Call forget_viewer_fact again with the exact fact to forget."
            )
        if not candidates and not facts:
            raise HumanBlockError(
                "nothing is stored about this viewer yet, so there is nothing to forget. Tell them so."
            )
        if not candidates:
            raise HumanBlockError(
                f"no stored fact matches '{quoted(old_fact)}'. Stored: {describe_facts(facts)}. "
                "Call forget_viewer_fact again with one of these, or tell the viewer it was not stored."
            )
        match = candidates[0]
    name, value = match
    remaining = {
        slug: [item for item in values if not (slug == name and item == value)] for slug, values in facts.items()
    }
    return replace_facts(text, remaining), f"Forgot ({name}): {value}"


def edit_fact(text, old_fact, new_fact, new_category, limit):
    """Return (new_text, message) after rewording one stored fact in one step.

    The new wording takes the old one's place: same category, same position (a different
    new_category moves it to the end of that category instead; an empty one keeps the old). The
    same rules as add_fact apply to the new wording; HumanBlockError (the block left as it was)
    when the old fact is not stored exactly, the new one is refused, it repeats another stored
    fact, or the block would go over its limit.
    """
    facts = parse_facts(text)
    match = find_fact(facts, fact_key(re.sub(r"^(?:[-*•·]\s+)+", "", collapse_spaces(old_fact))))
    if match is None:
        raise HumanBlockError(
            f"no stored fact is exactly '{quoted(old_fact)}', so nothing was changed. Stored: {describe_facts(facts)}."
        )
    old_category, old_value = match
    value = normalize_fact(new_fact)
    slug = normalize_category(new_category) if collapse_spaces(new_category) else old_category
    others = {name: [item for item in values if (name, item) != match] for name, values in facts.items()}
    repeated = find_fact(others, fact_key(value))
    if repeated is not None:
        raise HumanBlockError(
            f"'{quoted(value)}' is already stored ({repeated[0]}: {repeated[1]}). Forget one of the two instead."
        )
    if slug == old_category:
        facts[slug][facts[slug].index(old_value)] = value
    else:
        facts = others
        facts.setdefault(slug, []).append(value)
    new_text = replace_facts(text, facts)
    limit = int(limit) if limit else DEFAULT_HUMAN_LIMIT
    if len(new_text) > limit:
        raise HumanBlockError(
            f"the viewer's memory is full ({len(text)}/{limit} characters; the new wording is "
            f"{len(new_text) - limit} over the limit). Nothing was changed: store a shorter wording."
        )
    return new_text, f"Changed ({slug}): {old_value} → {value}"

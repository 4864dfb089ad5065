"""The two tiers of a viewer's memory, and the one policy that moves facts between them.

Pure functions, standard library only (no Letta, no I/O): the memory gate (tools/memory_gate.py)
applies them to the block and the passages as Letta has them, and anything else that edits facts
(a web console, an import) can call the same rules and get the same result.

Tier 1, the core block: the facts section of the viewer's `human` block (tools/human_block.py),
always in the prompt. Tier 2, long-term memory: that viewer's own archival passages in Letta (one
passage per fact, tagged FACT_TAG and category:<slug>), in the prompt only when the model asks
for them with recall_viewer_facts.

When a remember would take the core block past `high_water` of its limit, the oldest facts move
to tier 2 until the block is back at `low_water` (the gap means a move happens once every few
facts, not at every remember). Which fact moves is decided here, deterministically:

1. never the viewer and verified sections (they are not facts), and never the newest fact of an
   essential category (name, pronouns, language): who they are stays in view;
2. otherwise the category with the most facts in the block gives its oldest one (block order is
   the order they were told; a fact told again is brought back from tier 2 as the newest), so
   every kind of fact keeps its most recent entries in view; ties go to the category listed first;
3. essential categories give their older entries (an old nickname) only after every other
   category is down to nothing.

The block ends with "(+N more facts in long-term memory; recall_viewer_facts finds them)".

Facts are written to tier 2 BEFORE the block drops them: a crash in between leaves a fact in
both tiers, never in neither.

Episodes: at the end of a stream (provisioning/episodes.py) one dated summary per viewer who spoke
goes to tier 2 (tag EPISODE_TAG) and the newest one into the block's viewer section as
`last_stream: YYYY-MM-DD: …`, fitted by the same policy; recall finds old episodes too.
"""

import re
from dataclasses import dataclass

from tools.contact_details import redact_contact_details
from tools.human_block import (
    DEFAULT_HUMAN_LIMIT,
    MAX_LISTING_CHARS,
    HumanBlockError,
    collapse_spaces,
    fact_key,
    find_fact,
    normalize_category,
    normalize_fact,
    parse_facts,
    quoted,
    replace_facts,
    set_fields,
    stored_count,
)

FACT_TAG = "vtl:fact"  # every tier-2 passage that holds one fact of the viewer
EPISODE_TAG = "vtl:episode"  # a stream-end summary of what the viewer and the VTuber talked about
EPISODE_CATEGORY = "last stream"
LAST_STREAM_FIELD = "last_stream"  # the viewer-section field with the newest episode
MAX_EPISODE_CHARS = 300
EPISODE_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
CATEGORY_TAG_PREFIX = "category:"
ESSENTIAL_CATEGORIES = ("name", "pronouns", "language")
RECALL_TOP_K = 5  # passages per recall: the per-turn prompt budget of tier 2 (docs/RELIABILITY.md)
# The note sent before every turn of a viewer with a tier (bridge/recall_prefetch.py) is smaller:
# it goes with every turn, not only the few that ask, and stays in the agent's history.
PREFETCH_TOP_K = 3
PREFETCH_MAX_CHARS = 800
MAX_QUERY_CHARS = 200


@dataclass(frozen=True)
class TierPolicy:
    """When facts move: above high_water of the block's limit, down to low_water."""

    high_water: float = 0.9
    low_water: float = 0.75

    def __post_init__(self):
        if not 0 < self.low_water <= self.high_water <= 1:
            raise ValueError("TierPolicy needs 0 < low_water <= high_water <= 1")


DEFAULT_POLICY = TierPolicy()


@dataclass(frozen=True)
class StoredFact:
    """One fact in tier 2, as the gate reads it back from a passage."""

    passage_id: str
    category: str
    text: str
    stored_at: str = ""  # ISO date or timestamp, for the recall listing


@dataclass(frozen=True)
class Plan:
    """What to do: write `moved` to tier 2 first, then the block `text`; `message` is for the model."""

    text: str
    message: str
    moved: tuple[tuple[str, str], ...] = ()


def passage_tags(category, kind=FACT_TAG):
    """The tags of a tier-2 passage: one fact of `category`, or (kind=EPISODE_TAG) an episode."""
    return [kind, CATEGORY_TAG_PREFIX + category]


def category_of_tags(tags):
    """The category a passage's tags name (other when none)."""
    for tag in tags or ():
        if str(tag).startswith(CATEGORY_TAG_PREFIX):
            return str(tag)[len(CATEGORY_TAG_PREFIX):] or "other"
    return "other"


def is_fact_passage(tags):
    """True for a passage holding one fact (what remember and forget look at)."""
    return FACT_TAG in (tags or ())


def is_tier_passage(tags):
    """True for any passage this module wrote: facts and episodes (what recall shows)."""
    return bool({FACT_TAG, EPISODE_TAG} & set(tags or ()))


def next_to_move(facts):
    """(category, fact) that leaves the core block next under the rules above, or None."""
    def pick(categories, keep_newest):
        best = None
        for name in categories:
            movable = len(facts[name]) - (1 if keep_newest else 0)
            if movable > 0 and (best is None or movable > best[1]):
                best = (name, movable)
        return None if best is None else (best[0], facts[best[0]][0])

    ordinary = [name for name in facts if name not in ESSENTIAL_CATEGORIES]
    essential = [name for name in facts if name in ESSENTIAL_CATEGORIES]
    return pick(ordinary, keep_newest=False) or pick(essential, keep_newest=True)


def fit_block(text, facts, stored, limit, policy=DEFAULT_POLICY):
    """(block text, moved facts) for `facts` in the block `text`, moving facts out if it is too full.

    Raises HumanBlockError when the block cannot fit even with every movable fact moved.
    """
    limit = int(limit) if limit else DEFAULT_HUMAN_LIMIT
    facts = {name: list(values) for name, values in facts.items() if values}
    new_text = replace_facts(text, facts, stored)
    moved = []
    if len(new_text) > policy.high_water * limit:
        while len(new_text) > policy.low_water * limit:
            victim = next_to_move(facts)
            if victim is None:
                break
            name, value = victim
            facts[name].remove(value)
            if not facts[name]:
                del facts[name]
            moved.append(victim)
            new_text = replace_facts(text, facts, stored + len(moved))
    if len(new_text) > limit:
        raise HumanBlockError(
            f"the viewer's memory is full ({len(text)}/{limit} characters) even after moving older facts to "
            "long-term memory: the essential facts and the platform sections alone need more. Nothing was saved. "
            "Store a shorter wording, or forget an outdated name, pronoun or language fact."
        )
    return new_text, tuple(moved)


def plan_remember(text, fact, category, limit, *, from_tier=False, policy=DEFAULT_POLICY):
    """Plan storing one fact in the core block, moving older ones to tier 2 when it gets too full.

    from_tier: the fact is being brought back from tier 2 (its passage is deleted after the write),
    so the block's long-term count goes down by one.
    """
    facts = parse_facts(text)
    value = normalize_fact(fact)
    slug = normalize_category(category)
    known = find_fact(facts, fact_key(value))
    if known is not None:
        return Plan(text, f"Already known ({known[0]}): {known[1]}")
    facts.setdefault(slug, []).append(value)
    stored = max(0, stored_count(text) - (1 if from_tier else 0))
    new_text, moved = fit_block(text, facts, stored, limit, policy)
    message = f"Remembered ({slug}): {value}"
    if from_tier:
        message += " (brought back from long-term memory)"
    if moved:
        noun = "fact" if len(moved) == 1 else "facts"
        message += (f". {len(moved)} older {noun} moved to long-term memory (recall_viewer_facts finds them), "
                    "so nothing was lost")
    return Plan(new_text, message, moved)


def clean_episode(date, summary):
    """(date, the episode's text) ready to store, contact details hidden; HumanBlockError if unusable."""
    date = str(date).strip()
    if not EPISODE_DATE.fullmatch(date):
        raise HumanBlockError(f"the episode date must be YYYY-MM-DD, not '{quoted(date)}'.")
    text = redact_contact_details(collapse_spaces(summary).replace("<", "‹").replace(">", "›"))
    if not text:
        raise HumanBlockError("the episode summary is empty.")
    if len(text) > MAX_EPISODE_CHARS:
        text = text[: MAX_EPISODE_CHARS - 1] + "…"
    return date, f"{date}: {text}"


def plan_episode(text, date, summary, limit, policy=DEFAULT_POLICY):
    """Plan storing one episode: the block shows it as last_stream (older facts move if it gets full)."""
    date, episode = clean_episode(date, summary)
    with_field = set_fields(text, "viewer", {LAST_STREAM_FIELD: episode})
    new_text, moved = fit_block(with_field, parse_facts(with_field), stored_count(with_field), limit, policy)
    return Plan(new_text, f"Episode of {date} stored", moved), episode


def tier_matches(wanted, stored_facts):
    """The tier-2 facts a forget request `wanted` (a fact_key) means: an exact match, else the ones containing it."""
    exact = [item for item in stored_facts if fact_key(item.text) == wanted]
    if exact:
        return exact[:1]
    return [item for item in stored_facts if wanted and wanted in fact_key(item.text)]


def after_tier_forget(text, count=1):
    """The block text once `count` tier-2 facts were deleted: only the long-term count changes."""
    return replace_facts(text, parse_facts(text), max(0, stored_count(text) - count))


def describe_candidates(request, core, tier):
    """The error for a forget that matches several facts: core (category, fact) pairs and tier-2 StoredFacts."""
    items = [f"{name}: {value}" for name, value in core]
    items += [f"{item.category}: {item.text} (long-term memory)" for item in tier]
    listing = "; ".join(items)
    if len(listing) > MAX_LISTING_CHARS:
        listing = listing[: MAX_LISTING_CHARS - 1] + "…"
    return (f"'{quoted(request)}' matches {len(items)} facts: {listing}. "
            "Call forget_viewer_fact again with the exact fact to forget.")


def clean_query(query):
    """The recall query as sent to the search, or raise HumanBlockError saying what to send."""
    text = " ".join(str(query).split())
    if not text:
        raise HumanBlockError("say what to look for, e.g. 'favourite games' or 'pets'.")
    return text[:MAX_QUERY_CHARS]


# Opens the note the bridge sends beside a viewer's message (a system message of that turn).
PREFETCH_HEADER = "[long-term memory, looked up for this message]"


def format_prefetch(results):
    """The pre-turn note: the closest passages that fit in PREFETCH_MAX_CHARS, or "" when there are
    none (no note is sent)."""
    note = (PREFETCH_HEADER + " What this viewer told you earlier (unverified), closest first; use it "
            "only if it helps, no need to look it up with recall_viewer_facts:")
    kept: list[str] = []
    for line in _recall_lines(results[:PREFETCH_TOP_K]):
        if len(note) + sum(len(k) + 1 for k in kept) + len(line) + 1 > PREFETCH_MAX_CHARS:
            break
        kept.append(line)
    return "\n".join([note, *kept]) if kept else ""


def _recall_lines(results):
    lines = []
    for item in results:
        date = f" (stored {item.stored_at[:10]})" if item.stored_at else ""
        lines.append(f"- ({item.category}) {redact_contact_details(item.text)}{date}")
    return lines


def format_recall(query, results, stored):
    """The recall tool's answer: the best matches, contact details hidden (it can be read aloud)."""
    if not results:
        if stored <= 0:
            return ("Nothing about this viewer is in long-term memory yet; everything you know is in the "
                    "human block.")
        return (f"Nothing in long-term memory matches '{quoted(query)}'. Answer from the human block, "
                "or ask the viewer.")
    return ("From long-term memory (what this viewer told you earlier; unverified), best match first:\n"
            + "\n".join(_recall_lines(results)))

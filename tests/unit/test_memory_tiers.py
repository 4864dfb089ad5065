"""The two-tier memory policy (tools/memory_tiers.py) and the gate applying it (tools/memory_gate.py).

Table tests for the pure part: which fact moves next, when moves start and stop, what the block
says afterwards. Then the gate over an in-memory block store and an in-memory tier that keeps
passages per agent, the way Letta's archives_agents join does: remember never refuses for lack
of room, no fact is ever in neither tier, a fact told again comes back, forget reaches both
tiers, recall sees only the calling agent's passages and hides contact details.
"""

from __future__ import annotations

import itertools

import pytest

from tools.human_block import HumanBlockError, format_human_block, parse_facts, replace_facts, set_fields, stored_count, stored_line
from tools.memory_gate import HumanBlock, MemoryGate, StoreUnavailable, memory_token
from tools.memory_tiers import StoredFact, TierPolicy, category_of_tags, fit_block, format_recall, next_to_move, passage_tags, plan_remember, tier_matches

SECRET = "tier-test-secret"


def profile(facts=None, stored=0):
    text = format_human_block("twitch:mia", "Mia", "twitch", "2025-08-01T12:00:00Z", facts=facts)
    text = set_fields(text, "verified", {"visits": 3, "total_support": "0"})
    return replace_facts(text, parse_facts(text), stored) if stored else text


# ------------------------------------------------------------------ which fact moves next

@pytest.mark.parametrize("facts, expected", [
    ({}, None),
    ({"name": ["Mia"]}, None),  # the newest essential fact never moves
    ({"name": ["Mimi", "Mia"]}, ("name", "Mimi")),  # an older nickname may, once nothing else is left
    ({"name": ["Mia"], "pronouns": ["she/her"], "language": ["en"]}, None),
    ({"name": ["Mia"], "likes": ["cats"]}, ("likes", "cats")),  # ordinary before essential
    ({"likes": ["cats", "tea"], "pets": ["dog Bao"]}, ("likes", "cats")),  # largest category, oldest first
    ({"pets": ["dog Bao"], "likes": ["cats", "tea"]}, ("likes", "cats")),
    ({"pets": ["dog Bao"], "likes": ["cats"]}, ("pets", "dog Bao")),  # a tie: the category listed first
    ({"name": ["A", "B", "C"], "likes": ["cats"]}, ("likes", "cats")),
])
def test_next_to_move(facts, expected):
    assert next_to_move(facts) == expected


def test_moves_start_above_high_water_and_stop_at_low_water():
    policy = TierPolicy(high_water=0.9, low_water=0.75)
    base = profile()
    facts = {"name": ["Mia"], "likes": [f"likes thing number {i:03d}" for i in range(20)]}
    full = replace_facts(base, facts, 0)
    limit = int(len(full) / 0.89)  # 89 % full: below high water, nothing moves
    text, moved = fit_block(base, facts, 0, limit, policy)
    assert moved == () and text == full
    limit = int(len(full) / 0.95)  # 95 % full: moves down to 75 %
    text, moved = fit_block(base, facts, 0, limit, policy)
    assert moved and len(text) <= 0.75 * limit
    assert [fact for _, fact in moved] == facts["likes"][: len(moved)]  # oldest first
    assert stored_count(text) == len(moved) and stored_line(len(moved)) in text
    kept = parse_facts(text)
    assert kept["name"] == ["Mia"] and kept["likes"] == facts["likes"][len(moved):]
    # the move is the smallest one that reaches low water
    back_one = dict(kept, likes=[moved[-1][1]] + kept["likes"])
    assert len(replace_facts(base, back_one, len(moved) - 1)) > 0.75 * limit


@pytest.mark.parametrize("facts, limit, message", [
    ({"name": ["x" * 150]}, 400, "even after moving"),  # essentials alone do not fit
])
def test_fit_refuses_only_what_cannot_fit_at_all(facts, limit, message):
    with pytest.raises(HumanBlockError, match=message):
        fit_block(profile(), facts, 0, limit)


def test_the_stored_line_is_not_a_fact_and_survives_edits():
    text = profile({"likes": ["cats"]}, stored=12)
    assert parse_facts(text) == {"likes": ["cats"]} and stored_count(text) == 12
    assert "(+12 more facts in long-term memory; recall_viewer_facts finds them)" in text
    assert stored_count(replace_facts(text, {})) == 12
    assert stored_line(1) == "(+1 more fact in long-term memory; recall_viewer_facts finds them)"
    assert "(nothing yet)" not in replace_facts(text, {})


@pytest.mark.parametrize("from_tier, stored_before, stored_after, suffix", [
    (False, 0, 0, ""),
    (True, 5, 4, " (brought back from long-term memory)"),
    (True, 0, 0, " (brought back from long-term memory)"),  # never below zero
])
def test_plan_remember_messages_and_counts(from_tier, stored_before, stored_after, suffix):
    plan = plan_remember(profile({"likes": ["cats"]}, stored_before), "tea", "likes", 4000, from_tier=from_tier)
    assert plan.message == "Remembered (likes): tea" + suffix and plan.moved == ()
    assert stored_count(plan.text) == stored_after


def test_plan_remember_already_known_changes_nothing():
    text = profile({"likes": ["cats"]})
    plan = plan_remember(text, "CATS!", "about", 4000)
    assert plan.text == text and plan.message == "Already known (likes): cats"


@pytest.mark.parametrize("wanted, stored, expected", [
    ("cats", ["cats", "cats and dogs"], ["cats"]),  # exact wins
    ("mochi", ["has a cat named Mochi", "likes tea"], ["has a cat named Mochi"]),
    ("cat", ["has a cat named Mochi", "cat cafés"], ["has a cat named Mochi", "cat cafés"]),
    ("horses", ["cats"], []),
])
def test_tier_matches(wanted, stored, expected):
    items = [StoredFact(f"p{i}", "likes", text) for i, text in enumerate(stored)]
    assert [item.text for item in tier_matches(wanted, items)] == expected


def test_tags_round_trip_and_recall_formatting_hides_contact_details():
    assert category_of_tags(passage_tags("pets")) == "pets" and category_of_tags(["vtl:fact"]) == "other"
    text = format_recall("phone", [StoredFact("p1", "about", "call me at 555-123-4567", "2026-01-02T03:04:05")], 3)
    assert "555-123-4567" not in text and "(about)" in text and "(stored 2026-01-02)" in text
    assert "yet" in format_recall("x", [], 0) and "matches 'x'" in format_recall("x", [], 4)


# ------------------------------------------------------------------ the gate with a tier

class Blocks:
    def __init__(self):
        self.blocks: dict[str, HumanBlock] = {}
        self.down = False
        self.reads = 0

    def read(self, agent_id):
        self.reads += 1
        if self.down:
            raise StoreUnavailable("down")
        return self.blocks.get(agent_id)

    def write(self, block, value):
        agent = next(a for a, b in self.blocks.items() if b.block_id == block.block_id)
        self.blocks[agent] = HumanBlock(block.block_id, value, block.limit)


class Tier:
    """Passages per agent, searched by shared words (as the scripted model's bag-of-words embedding ranks)."""

    def __init__(self):
        self.passages: dict[str, list[StoredFact]] = {}
        self.ids = itertools.count()
        self.fail_adds_after: int | None = None
        self.kinds: dict[str, str] = {}  # passage id -> kind, for the passages that are not facts

    def add(self, agent_id, category, text, kind="vtl:fact"):
        if self.fail_adds_after is not None:
            if self.fail_adds_after == 0:
                raise StoreUnavailable("down")
            self.fail_adds_after -= 1
        passage_id = f"passage-{next(self.ids)}"
        self.passages.setdefault(agent_id, []).append(StoredFact(passage_id, category, text))
        if kind != "vtl:fact":
            self.kinds[passage_id] = kind

    def find(self, agent_id, text):
        return [p for p in self.passages.get(agent_id, []) if text.lower() in p.text.lower()]

    def search(self, agent_id, query, top_k):
        words = set(query.lower().split())
        ranked = sorted(self.passages.get(agent_id, []), key=lambda p: -len(words & set(p.text.lower().split())))
        return ranked[:top_k]

    def delete(self, agent_id, passage_id):
        self.passages[agent_id] = [p for p in self.passages[agent_id] if p.passage_id != passage_id]

    def texts(self, agent_id):
        return [p.text for p in self.passages.get(agent_id, [])]


@pytest.fixture
def world():
    blocks, tier = Blocks(), Tier()
    gate = MemoryGate(blocks, SECRET, tier)

    def call(operation, agent="agent-a", status=200, **fields):
        code, answer = gate.handle(operation, {"agent_id": agent, "token": memory_token(SECRET, agent), **fields})
        assert code == status, answer
        return answer.get("message") or "Error: " + answer["error"]

    call.gate = gate
    for agent in ("agent-a", "agent-b"):
        blocks.blocks[agent] = HumanBlock(f"block-{agent}", profile({"name": ["Mia"]}), 1200)
    return blocks, tier, call


def core_facts(blocks, agent="agent-a"):
    return [value for values in parse_facts(blocks.blocks[agent].value).values() for value in values]


def test_a_full_block_moves_facts_instead_of_refusing_and_loses_none(world):
    blocks, tier, call = world
    told = [f"likes board game number {i}" for i in range(60)]
    for fact in told:
        assert call("remember", fact=fact, category="likes").startswith("Remembered (likes)")
        assert len(blocks.blocks["agent-a"].value) <= 1200
    core, stored = core_facts(blocks), tier.texts("agent-a")
    assert stored and sorted(core + stored) == sorted(told + ["Mia"])  # every fact in exactly one tier
    assert "Mia" in core and told[-1] in core
    assert stored_count(blocks.blocks["agent-a"].value) == len(stored)
    assert tier.texts("agent-b") == []


def test_recall_finds_moved_facts_of_the_caller_only(world):
    blocks, tier, call = world
    for i in range(40):
        call("remember", fact=f"has a pet turtle number {i}", category="pets")
    assert call("recall", agent="agent-b", query="pet turtle").startswith("Nothing about this viewer")
    answer = call("recall", query="pet turtle number 0")
    assert answer.startswith("From long-term memory") and "- (pets) has a pet turtle number 0" in answer
    assert call("recall", query="   ").startswith("Error: say what to look for")


def test_a_fact_told_again_comes_back_from_the_tier(world):
    blocks, tier, call = world
    for i in range(40):
        call("remember", fact=f"plays rhythm game {i}", category="games")
    oldest = "plays rhythm game 0"
    assert oldest in tier.texts("agent-a") and oldest not in core_facts(blocks)
    answer = call("remember", fact=oldest, category="other")
    assert answer.startswith("Remembered (games): plays rhythm game 0 (brought back from long-term memory)")
    assert oldest in core_facts(blocks) and oldest not in tier.texts("agent-a")
    assert stored_count(blocks.blocks["agent-a"].value) == len(tier.texts("agent-a"))


def test_forget_reaches_the_tier_and_the_count_follows(world):
    blocks, tier, call = world
    for i in range(40):
        call("remember", fact=f"collects stamp series {i}", category="stamps")
    stored = stored_count(blocks.blocks["agent-a"].value)
    assert call("forget", fact="collects stamp series 0") == \
        "Forgot (stamps): collects stamp series 0 (from long-term memory)"
    assert "collects stamp series 0" not in tier.texts("agent-a")
    assert stored_count(blocks.blocks["agent-a"].value) == stored - 1
    assert "matches" in call("forget", fact="stamp series 1")  # series 1, 10..19 in the tier: ambiguous
    assert call("forget", agent="agent-b", fact="collects stamp series 2").startswith("Error: no stored fact")
    assert "collects stamp series 2" in tier.texts("agent-a")


def test_contact_details_never_reach_the_tier(world):
    blocks, tier, call = world
    assert call("remember", fact="my number is 555-123-4567", category="about").startswith("Error:")
    assert all("555" not in text for text in tier.texts("agent-a"))


def test_an_interrupted_move_leaves_facts_in_both_tiers_never_in_neither(world):
    blocks, tier, call = world
    fact_no = itertools.count()
    while not tier.texts("agent-a"):
        call("remember", fact=f"watched anime season {next(fact_no)}", category="anime")
    tier.fail_adds_after = 1  # the next move writes one passage, then Letta goes away
    while True:
        before_block = blocks.blocks["agent-a"].value
        fact = f"watched anime season {next(fact_no)}"
        code, answer = call.gate.handle("remember", {"agent_id": "agent-a", "token": memory_token(SECRET, "agent-a"),
                                                     "fact": fact, "category": "anime"})
        if code == 503:
            break
    assert blocks.blocks["agent-a"].value == before_block  # the block was not written
    tier.fail_adds_after = None
    told = [f"watched anime season {i}" for i in range(next(fact_no))]
    call("remember", fact=told[-1], category="anime")
    everywhere = core_facts(blocks) + tier.texts("agent-a")
    assert set(told) <= set(everywhere) and len(everywhere) == len(set(everywhere))  # no duplicate either


# ------------------------------------------------------------------ the Letta side refuses a shared archive

class FakeLetta:
    """Just what LettaFactTier's archive check and search ask of letta-client."""

    def __init__(self, archive_agents):
        self.archive_agents = archive_agents  # archive id -> agent ids attached
        self.searches = 0
        outer = self

        class Passages:
            def search(self, agent_id, query, top_k):
                outer.searches += 1
                result = type("R", (), {"id": "p1", "content": "likes cats", "tags": passage_tags("likes"),
                                        "timestamp": "2026-01-02T00:00:00"})
                return type("S", (), {"results": [result]})

        class Archives:
            def list(self, agent_id):
                return [type("A", (), {"id": a}) for a, agents in outer.archive_agents.items() if agent_id in agents]

        self.agents = type("Agents", (), {"passages": Passages()})()
        self.archives = Archives()

    def get(self, path, cast_to):
        archive_id = path.split("/")[3]
        return [{"id": agent} for agent in self.archive_agents[archive_id]]


def test_the_letta_tier_searches_an_own_archive_and_refuses_a_shared_one():
    from tools.fact_tier import LettaFactTier, TierUnsafe

    own = LettaFactTier(FakeLetta({"archive-1": ["agent-a"]}))
    assert [f.text for f in own.search("agent-a", "cats", 5)] == ["likes cats"]
    shared = FakeLetta({"archive-1": ["agent-a", "agent-b"]})
    with pytest.raises(TierUnsafe, match="shared with 1 other agent"):
        LettaFactTier(shared).search("agent-a", "cats", 5)
    assert shared.searches == 0  # refused before any search
    two = FakeLetta({"archive-1": ["agent-a"], "archive-2": ["agent-a"]})
    with pytest.raises(TierUnsafe, match="2 archives"):
        LettaFactTier(two).search("agent-a", "cats", 5)


def test_the_gate_answers_a_locked_tier_with_an_error_the_model_can_act_on(world):
    from tools.fact_tier import TierUnsafe

    blocks, tier, call = world
    for i in range(40):
        call("remember", fact=f"likes song number {i}", category="songs")

    def unsafe(*_args):
        raise TierUnsafe("archive shared")

    tier.search = unsafe
    answer = call("recall", query="songs")
    assert answer.startswith("Error: long-term memory of this viewer is locked") and "human block" in answer


# ------------------------------------------------------------------ episodes

@pytest.mark.parametrize("date, summary, expected", [
    ("2026-12-02", "We talked about  kites\tand tea.", "2026-12-02: We talked about kites and tea."),
    ("2026-12-02", "We talked about calling 555-123-4567", "2026-12-02: We talked about calling [hidden]"),
    ("2026-12-02", "<b>We</b> talked", "2026-12-02: ‹b›We‹/b› talked"),
    ("2026-12-02", "x" * 400, "2026-12-02: " + "x" * 299 + "…"),
])
def test_clean_episode(date, summary, expected):
    from tools.memory_tiers import clean_episode

    assert clean_episode(date, summary) == (date, expected)


@pytest.mark.parametrize("date, summary, message", [
    ("02.12.2026", "We talked", "YYYY-MM-DD"),
    ("2026-12-02", "   ", "empty"),
])
def test_clean_episode_refuses(date, summary, message):
    from tools.memory_tiers import clean_episode

    with pytest.raises(HumanBlockError, match=message):
        clean_episode(date, summary)


def test_an_episode_goes_to_the_tier_and_the_block_shows_the_newest(world):
    from tools.human_block import parse_fields

    blocks, tier, call = world
    assert call("recall", query="kites").startswith("Nothing about this viewer")
    assert call("episode", date="2026-12-01", summary="We talked about kites.") == "Episode of 2026-12-01 stored"
    assert call("episode", date="2026-12-02", summary="We talked about tea and 555-123-4567.").startswith("Episode")
    fields = parse_fields(blocks.blocks["agent-a"].value, "viewer")
    assert fields["last_stream"] == "2026-12-02: We talked about tea and [hidden]."
    assert [kind for kind in tier.kinds.values()] == ["vtl:episode", "vtl:episode"]
    assert "- (last stream) 2026-12-01: We talked about kites." in call("recall", query="kites")
    assert call("remember", fact="2026-12-01: We talked about kites.", category="other").startswith("Remembered")
    assert call("episode", date="yesterday", summary="x").startswith("Error: the episode date")


def test_an_episode_on_a_full_block_moves_facts_instead_of_overflowing(world):
    blocks, tier, call = world
    number = itertools.count()
    while len(blocks.blocks["agent-a"].value) < 1000:  # 1,080 (90 %) would move facts
        call("remember", fact=f"likes puzzle box model {next(number)}", category="likes")
    before = len(tier.texts("agent-a"))
    assert before == 0
    call("episode", date="2026-12-02", summary="We talked about " + "puzzle boxes and their hidden drawers " * 3)
    assert len(blocks.blocks["agent-a"].value) <= 1200
    assert len(tier.texts("agent-a")) > before + 1  # the episode and at least one moved fact


def test_the_prefetch_note_keeps_to_its_budget():
    from tools.memory_tiers import PREFETCH_HEADER, format_prefetch

    long = [StoredFact(f"p{i}", "about", f"fact {i} " + "x" * 190, "2026-01-02T03:04:05") for i in range(5)]
    note = format_prefetch(long)
    assert note.startswith(PREFETCH_HEADER) and len(note) <= 800
    assert note.count("\n- (about) fact") == 2  # the third of 200 characters would pass 800
    assert format_prefetch([]) == "" and format_prefetch(long[:1]).count("\n- ") == 1


def test_prefetch_answers_the_closest_passages_of_the_caller_and_says_whether_there_is_a_tier(world):
    from tools.memory_tiers import PREFETCH_HEADER

    blocks, tier, call = world

    def prefetch(agent="agent-a", query="pet turtle number 0", expect_tier=False):
        code, answer = call.gate.handle("prefetch", {"agent_id": agent, "token": memory_token(SECRET, agent),
                                                     "query": query, "expect_tier": expect_tier})
        assert code == 200, answer
        return answer

    assert prefetch() == {"message": "", "searchable": False}  # nothing moved out: no search, no note
    for i in range(40):
        call("remember", fact=f"has a pet turtle number {i}", category="pets")
    answer = prefetch()
    assert answer["searchable"] is True
    assert answer["message"].startswith(PREFETCH_HEADER) and "- (pets) has a pet turtle number 0" in answer["message"]
    assert len(answer["message"].splitlines()) <= 1 + 3 and len(answer["message"]) <= 800  # the per-turn budget
    reads = blocks.reads
    assert prefetch(expect_tier=True) == answer  # the search alone: the same answer,
    assert blocks.reads == reads  # and no block read on the speech path
    assert prefetch(agent="agent-b") == {"message": "", "searchable": False}  # never another viewer's
    # The bridge expected a tier and the search found nothing: the block tells whether there is one.
    assert prefetch(agent="agent-b", expect_tier=True) == {"message": "", "searchable": False}
    assert blocks.reads == reads + 2
    assert prefetch(query="  ")["error"].startswith("say what to look for")
    code, refused = call.gate.handle("prefetch", {"agent_id": "agent-b", "token": memory_token(SECRET, "agent-a"),
                                                  "query": "turtle"})
    assert code == 403 and "error" in refused

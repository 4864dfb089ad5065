"""tools/contact_details.py: refuse contact and identifying details, let ordinary facts through.

The corpus (tests/unit/contact_corpus.py) is run twice: through the imported module, and
through the module's source exec'd alone in a namespace holding only the builtins, which is
how Letta's sandbox will run it ahead of the memory tools.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import sys
import time

import pytest
from contact_corpus import ACCEPTED, REFUSED

import tools
from tools import contact_details
from tools.contact_details import CONTACT_KINDS, CONTACT_PLACEHOLDER, contact_detail_error, find_contact_detail, redact_contact_details

PUBLIC_FUNCTIONS = ("find_contact_detail", "contact_detail_error", "redact_contact_details")


def sandbox_namespace() -> dict:
    """The module's source run alone, as the sandbox runs it: only the builtins are there."""
    namespace = {"__builtins__": builtins}
    exec(compile(inspect.getsource(contact_details), "contact_details_sandbox", "exec"), namespace)
    return namespace


def test_corpus_is_big_enough_and_has_no_duplicates():
    assert len(REFUSED) >= 70 and len(ACCEPTED) >= 70
    texts = [text for text, _ in REFUSED] + ACCEPTED
    assert len(set(texts)) == len(texts)
    assert {kind for _, kind in REFUSED} <= set(CONTACT_KINDS)


@pytest.mark.parametrize(("text", "kind"), REFUSED, ids=[text for text, _ in REFUSED])
def test_refuses_contact_details(text, kind):
    assert find_contact_detail(text) == kind


@pytest.mark.parametrize("text", ACCEPTED)
def test_accepts_ordinary_facts(text):
    assert find_contact_detail(text) is None


def test_rates(capsys):
    refused = sum(find_contact_detail(text) is not None for text, _ in REFUSED)
    accepted = sum(find_contact_detail(text) is None for text in ACCEPTED)
    with capsys.disabled():
        print(f"\ncontact details: refused {refused}/{len(REFUSED)} ({100 * refused / len(REFUSED):.1f} %), "
              f"accepted {accepted}/{len(ACCEPTED)} ordinary facts ({100 * accepted / len(ACCEPTED):.1f} %)")
    assert refused == len(REFUSED)
    assert accepted >= 0.95 * len(ACCEPTED)


def test_every_kind_is_named_and_every_message_says_what_to_do():
    for kind in CONTACT_KINDS:
        message = contact_detail_error(kind)
        assert message.startswith("that looks like ") and kind in message
        assert "never stored" in message and "Do not save it" in message
        assert len("Error: " + message) < 300
    assert contact_detail_error("ID number").startswith("that looks like an ID number.")
    assert "lives in Shanghai" in contact_detail_error("street address")
    assert len(contact_detail_error("x" * 500)) < 300


@pytest.mark.parametrize(
    ("field", "redacted"),
    [
        ("小明13812345678", "小明[hidden]"),
        ("Alice (call 555-123-4567)", "Alice (call [hidden])"),
        ("ｔａｒｏ＠ｇｍａｉｌ．ｃｏｍ", "[hidden]"),
        ("加我vx abc123", "加我vx [hidden]"),
        ("Mochi @alice_99 ♡", "Mochi [hidden] ♡"),
        ("138 1234 5678 / qq 12345678", "[hidden] / qq [hidden]"),
        ("星野@毎日配信", "星野@毎日配信"),
        ("alice_99", "alice_99"),
        ("Mochi", "Mochi"),
        ("等级60の猫", "等级60の猫"),
        ("", ""),
    ],
)
def test_redact_hides_each_detail_and_keeps_the_rest(field, redacted):
    assert redact_contact_details(field) == redacted


def test_redact_maps_spans_back_through_normalisation():
    # Full-width digits, a zero-width space and circled digits all collapse in NFKC, so the
    # span found in the normalised view must map back onto the original characters.
    assert redact_contact_details("名前１３８\u200b１２３４\u200b５６７８です") == "名前[hidden]です"
    assert redact_contact_details("①③⑧①②③④⑤⑥⑦⑧!") == "[hidden]!"
    for text, _ in REFUSED:
        hidden = redact_contact_details(text)
        assert CONTACT_PLACEHOLDER in hidden, text
        assert find_contact_detail(hidden) is None, (text, hidden)
    for text in ACCEPTED:
        assert redact_contact_details(text) == text


def test_long_adversarial_input_stays_fast():
    samples = ["路1号" * 1000, "a." * 1500, "1" * 3000, "qq " * 1000, "a at b dot " * 300, "住在阳光" * 750]
    started = time.perf_counter()
    for sample in samples:
        redact_contact_details(sample)
    assert time.perf_counter() - started < 2.0


def test_source_runs_alone_with_only_builtins():
    namespace = sandbox_namespace()
    for name in PUBLIC_FUNCTIONS:
        assert callable(namespace[name])
    for text, kind in REFUSED:
        assert namespace["find_contact_detail"](text) == kind, text
    for text in ACCEPTED:
        assert namespace["find_contact_detail"](text) is None, text
    assert namespace["redact_contact_details"]("小明13812345678") == "小明[hidden]"
    assert namespace["contact_detail_error"]("phone number") == contact_detail_error("phone number")


def test_source_obeys_the_sandbox_rules():
    source = inspect.getsource(contact_details)
    tree = ast.parse(source)
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            top_level.add(node.name)
        elif isinstance(node, ast.Assign):
            top_level |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.Import):
            assert all(alias.name in sys.stdlib_module_names for alias in node.names)
            top_level |= {alias.asname or alias.name for alias in node.names}
        else:  # no class, no `from` import (so no __future__), no top-level statement that does work
            assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant), ast.dump(node)[:80]
    nested = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.Lambda, ast.ClassDef))
              and node not in tree.body]
    assert nested == [], "Letta takes the last FunctionDef in ast.walk order for the tool"
    # Pasted into one source with the other helpers: no name may clash with theirs,
    # nor with a tool argument or a name of the sandbox script.
    argument_names = {arg for func in tools.TOOLS.values()
                      for arg in func.__code__.co_varnames[: func.__code__.co_argcount]}
    other_helpers = {name for module in tools.HELPER_MODULES for name in vars(module)
                     if not name.startswith("__")}
    assert top_level & (argument_names | {"agent_state", "client", "os", "sys"}) == set()
    assert top_level & other_helpers <= {"re", "unicodedata"}
    assert all(name.startswith(("CONTACT_", "contact_")) or name in PUBLIC_FUNCTIONS or name in ("re", "unicodedata")
               for name in top_level)


def test_is_applied_by_the_memory_gate_not_shipped_into_the_sandbox():
    # The memory tools only carry the request to the gate (tools/memory_gate.py), which checks it.
    assert contact_details not in tools.HELPER_MODULES
    from tools import memory_gate

    assert memory_gate.find_contact_detail is contact_details.find_contact_detail

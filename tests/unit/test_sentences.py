"""bridge/sentences.py: a streamed reply cut into sentence-sized chunks."""

from __future__ import annotations

import pytest

from bridge.sentences import SentenceSplitter


def split(pieces: list[str], **options) -> list[str]:
    splitter = SentenceSplitter(**options)
    out = []
    for piece in pieces:
        out += splitter.feed(piece)
    return out + splitter.flush()


def by_char(text: str) -> list[str]:
    return list(text)


@pytest.mark.parametrize("feed", [by_char, lambda text: [text], lambda text: text.split(" ")])
def test_english_sentences_whatever_the_token_boundaries(feed):
    text = "Hello there! This is Luna. Version 0.16.8 is pinned, e.g. here? Yes"
    pieces = feed(text)
    if feed is not by_char and len(pieces) > 1:
        pieces = [p + " " for p in pieces[:-1]] + pieces[-1:]
    assert split(pieces) == ["Hello there!", "This is Luna.", "Version 0.16.8 is pinned, e.g. here?", "Yes"]


def test_chinese_sentences_end_without_spaces_and_keep_their_closing_quotes():
    text = "你好呀小明！今天想聊什么？她说：“好的。”然后走了……"
    assert split(by_char(text)) == ["你好呀小明！", "今天想聊什么？", "她说：“好的。”", "然后走了……"]


def test_a_sentence_is_published_as_soon_as_it_is_complete():
    splitter = SentenceSplitter()
    assert splitter.feed("第一句话说完了。") == []  # a closing quote may still follow
    assert splitter.feed("第二") == ["第一句话说完了。"]
    assert splitter.feed("句 ok. ") == []  # after a period, the next word decides ("e.g. this")
    assert splitter.feed("Next") == ["第二句 ok."]
    assert splitter.flush() == ["Next"]


def test_tiny_sentences_wait_for_company_and_nothing_is_lost():
    assert split(by_char("嗯。好。我在听呢！")) == ["嗯。好。", "我在听呢！"]
    assert split(by_char("Hi. I am here.")) == ["Hi. I am here."]


def test_line_breaks_end_a_chunk():
    assert split(by_char("first line\nsecond line")) == ["first line", "second line"]


def test_a_run_on_sentence_is_cut_at_a_comma_or_space():
    text = "，".join(["这是一段没有句号的很长的话"] * 20)
    chunks = split(by_char(text), max_chars=40)
    assert all(len(c) <= 40 for c in chunks)
    assert "".join(chunks) == text
    assert all(c.endswith("，") for c in chunks[:-1])


def test_joined_chunks_give_back_the_reply():
    text = "Okay!! Let me think... Yes: 3.5 apples? Sure.\n好的！没问题。Bye"
    chunks = split(by_char(text))
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "").replace("\n", "")


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        SentenceSplitter(min_chars=10, max_chars=5)

"""Cut a reply that arrives token by token into sentence-sized chunks, so speech can start early.

`SentenceSplitter.feed(delta)` returns the sentences completed by that delta; `flush()` returns the
rest at the end of the reply. Joining every chunk gives back the reply text (whitespace between
sentences aside), so nothing is lost or said twice.

Where a sentence ends:
- after CJK terminators (。！？…) at once: Chinese and Japanese put no space after them;
- after ASCII terminators (. ! ?) only once whitespace follows, so "3.14" and "v0.16.8" do not
  cut, and after a period only if the next word does not start in lower case ("e.g. this");
- at a line break;
closing quotes and brackets stay with their sentence. A chunk shorter than `min_chars` waits for
the next sentence ("嗯。" alone is too short to be worth a TTS request), and a run-on text longer
than `max_chars` is cut at its last comma or space (else hard) so the first audio is not held back
by one endless sentence.
"""

from __future__ import annotations

CJK_TERMINATORS = "。！？…!?"  # ASCII ! ? also end a sentence when directly followed by CJK text
ASCII_TERMINATORS = ".!?"
CLOSERS = "\"'”’)）」』】》〉]"
SOFT_BREAKS = "，、；：,;: "
DEFAULT_MIN_CHARS = 4
DEFAULT_MAX_CHARS = 120


class SentenceSplitter:
    def __init__(self, *, min_chars: int = DEFAULT_MIN_CHARS, max_chars: int = DEFAULT_MAX_CHARS):
        if not 1 <= min_chars <= max_chars:
            raise ValueError("need 1 <= min_chars <= max_chars")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._buffer = ""

    def feed(self, delta: str) -> list[str]:
        """Add text; return the sentences it completed (possibly none)."""
        self._buffer += delta
        out: list[str] = []
        while True:
            cut = self._next_cut()
            if cut is None:
                break
            chunk, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:]
            if chunk:
                out.append(chunk)
        return out

    def flush(self) -> list[str]:
        """The text still buffered (the reply ended)."""
        chunk, self._buffer = self._buffer.strip(), ""
        return [chunk] if chunk else []

    def _next_cut(self) -> int | None:
        """Index just after the first sentence end that leaves a chunk of at least min_chars."""
        text = self._buffer
        start = len(text) - len(text.lstrip())
        for i in range(start, len(text)):
            end = self._sentence_end(text, i)
            if end is not None and len(text[start:end].strip()) >= self.min_chars:
                return end
        if len(text) - start > self.max_chars:
            window = text[start:start + self.max_chars]
            soft = max(window.rfind(c) for c in SOFT_BREAKS)
            return start + (soft + 1 if soft > self.min_chars else self.max_chars)
        return None

    @staticmethod
    def _sentence_end(text: str, i: int) -> int | None:
        """If a sentence ends at text[i], the index after it (closers included); else None.

        None also when the answer depends on text that has not arrived yet."""
        c = text[i]
        if c == "\n":
            return i + 1
        if c not in CJK_TERMINATORS and c not in ASCII_TERMINATORS:
            return None
        end = i + 1
        while end < len(text) and (text[end] in CLOSERS or text[end] in CJK_TERMINATORS + ASCII_TERMINATORS):
            end += 1  # "？！", "...", "。」" stay together
        if c in "。！？…":
            return end if end < len(text) else None  # wait: a closer may still follow
        if end >= len(text):
            return None  # "3." may be "3.14": wait for the next character
        nxt = text[end]
        if _is_cjk(nxt):
            return end
        if not nxt.isspace():
            return None
        if c == ".":  # "e.g. here", "approx. ten": a lower-case word after a period goes on
            after = end
            while after < len(text) and text[after].isspace():
                after += 1
            if after == len(text) or text[after].islower():
                return None
        return end


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return 0x3000 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF or 0xFF00 <= code <= 0xFFEF

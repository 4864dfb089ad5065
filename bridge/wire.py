"""The bridge's wire contract: every JSON document it reads from or writes to Redis.

In (list `letta_requests`, LPUSHed by the host, consumed oldest first)::

    {"task_id": "3f0c9a", "type": "text", "user_id": "bilibili:12345",
     "content": "你好", "source": "user", "timestamp": 12345.678,
     "meta": {"memory_type": "permanent", "lang": "zh", "trace_id": null,
              "display_name": "小明", "platform": "bilibili"}}

    {"task_id": "sc-77", "type": "super_chat", "user_id": "bilibili:12345",
     "content": "主播加油", "meta": {"amount": 30, "currency": "CNY", "display_name": "小明"}}

Out:

- `letta_responses` (pub/sub): `TaskReply`
- `task_response:{task_id}` (pub/sub, text-only form when TTS hand-off is off or the turn is silent):
  `TaskResponse`
- `tts_requests` (list, LPUSH as the host's chat-ai does): `TtsRequest`
- avatar channel (pub/sub, default `live2d_events`): `AvatarEvent`
- `vtl:dead_letters` (list, newest at the LEFT): `DeadLetter`
- `user_input_queue` (memory-python): the request exactly as received (temporary tasks, Letta
  disabled), or with `meta.letta_fallback: true` added (Letta down, fallback on).

Rules a producer can rely on (anything else is dead-lettered with a reason, never dropped):
- `user_id`: the viewer id rule of vtuber_letta/viewer_ids.py, the same for the CLI and
  provisioning: 1-256 printable characters of any script (at most 512 bytes of UTF-8), `/`,
  spaces and emoji included (`bilibili:12345`, `youtube:UC123/x.y`, `观众 小明🌟`), kept exactly
  as sent; control and format characters (newlines, bidi controls, zero-width characters),
  empty and all-space ids are refused (`invalid user_id: contains a control or format character
  (U+202E)`). The platform is `meta.platform`, else the `platform:` prefix of the id.
- `task_id` (stricter, same module): 1-128 characters, each a letter, combining mark or digit of
  any script or one of `_ . : @ + = -`.
- `type`: text, audio (chat; `content` or `input_file` required), super_chat (`meta.amount`
  required), gift (`meta.gift_name` required), membership, enter.
- `content`: at most 4000 characters. When missing, the text is read from `input_file`: a path
  relative to the configured uploads folder or absolute under it, naming a regular UTF-8 file, with
  no `..` and no symbolic link below the uploads folder (`read_input_file`).
- `meta.memory_type`: permanent (Letta) or temporary (memory-python); missing = permanent
  (configurable). `null` is accepted for every optional field and for `meta` itself; unknown
  `meta` and top-level fields are kept and ignored.
- `timestamp` is the producer's clock and is never trusted; every time the bridge writes is epoch
  seconds from its own clock.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from vtuber_letta import viewer_ids

MAX_CONTENT_CHARS = 4000
CHAT_TYPES = frozenset({"text", "audio"})
EVENT_TYPES = frozenset({"super_chat", "gift", "membership", "enter"})

TaskType = Literal["text", "audio", "super_chat", "gift", "membership", "enter"]


def _refusal(problem: str) -> PydanticCustomError:
    # The problem text verbatim (a ValueError would get pydantic's "Value error, " prefix), so the
    # dead letter reads exactly like the CLI's error. The texts hold no `{`: nothing is templated.
    return PydanticCustomError("vtl_id", problem)


def _viewer_id(value: Any) -> Any:
    problem = viewer_ids.viewer_id_problem(value)
    if problem is not None:
        raise _refusal(problem)
    return value


def _task_id(value: Any) -> Any:
    problem = viewer_ids.task_id_problem(value)
    if problem is not None:
        raise _refusal(problem)
    return value


def _platform(value: Any) -> Any:
    try:
        return viewer_ids.check_platform(value)
    except viewer_ids.InvalidViewerId as exc:
        raise _refusal(exc.problem) from None


ViewerId = Annotated[str, BeforeValidator(_viewer_id)]
TaskId = Annotated[str, BeforeValidator(_task_id)]
Platform = Annotated[str | None, BeforeValidator(_platform)]


class WireError(ValueError):
    """A payload that breaks the contract; `reason` goes into the dead letter."""

    def __init__(self, reason: str, *, task_id: str | None = None, user_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.task_id = task_id
        self.user_id = user_id


def _clean_line(value: Any) -> Any:
    """Drop control/format characters and collapse whitespace (names end up on one line)."""
    if not isinstance(value, str):
        return value
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in value)
    return " ".join(text.split()) or None


class TaskMeta(BaseModel):
    """`meta` of a request. Host fields such as `from_channel`, `provider` are kept as extras.

    Example: {"memory_type": "permanent", "lang": "zh", "trace_id": null,
              "display_name": "小明", "platform": "bilibili",
              "amount": 30, "currency": "CNY"}
    """

    model_config = ConfigDict(extra="allow")

    memory_type: Literal["permanent", "temporary"] | None = None
    lang: str | None = Field(None, max_length=32)
    trace_id: str | int | None = Field(None)
    display_name: str | None = Field(None, max_length=128)
    platform: Platform = None
    amount: float | None = Field(None, ge=0, le=10_000_000, allow_inf_nan=False)
    currency: str | None = Field(None, max_length=8, pattern=r"^[A-Za-z]+$")
    gift_name: str | None = Field(None, max_length=64)
    count: int | None = Field(None, ge=1, le=1_000_000)
    tier: str | None = Field(None, max_length=64)
    letta_fallback: bool | None = None

    @field_validator("display_name", "gift_name", "tier", mode="before")
    @classmethod
    def _one_line(cls, value: Any) -> Any:
        return _clean_line(value)

    @field_validator("currency", mode="before")
    @classmethod
    def _upper_currency(cls, value: Any) -> Any:
        return value.strip().upper() or None if isinstance(value, str) else value


class TaskRequest(BaseModel):
    """One task on `letta_requests` (the host's user-turn format plus `meta.memory_type`)."""

    model_config = ConfigDict(extra="allow")

    task_id: TaskId
    type: TaskType
    user_id: ViewerId
    content: str | None = Field(None, max_length=MAX_CONTENT_CHARS)
    input_file: str | None = Field(None, max_length=4096)
    source: str | None = Field(None, max_length=64)
    timestamp: float | str | None = None  # the producer's clock: kept, never used
    meta: TaskMeta = Field(default_factory=TaskMeta)

    @field_validator("meta", mode="before")
    @classmethod
    def _null_meta(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _required_by_type(self) -> "TaskRequest":
        has_text = bool(self.content and self.content.strip())
        if self.type in CHAT_TYPES and not has_text and not self.input_file:
            raise ValueError(f"a {self.type} task needs non-empty content or an input_file")
        if self.type == "super_chat" and self.meta.amount is None:
            raise ValueError("a super_chat task needs meta.amount")
        if self.type == "gift" and not self.meta.gift_name:
            raise ValueError("a gift task needs meta.gift_name")
        return self

    @property
    def is_event(self) -> bool:
        return self.type in EVENT_TYPES

    @property
    def platform(self) -> str | None:
        """meta.platform, else the prefix of a `platform:id` viewer id (viewer_ids.platform_of)."""
        return viewer_ids.platform_of(self.user_id, self.meta.platform)


class TaskReply(BaseModel):
    """Published on `letta_responses` once per answered task. (Our document, whatever the channel
    is called; the SDK's own `LettaResponse` is a Letta reply, parsed by bridge/replies.py.)

    Example: {"task_id": "3f0c9a", "user_id": "bilibili:12345", "response_text": "你好呀小明！",
              "memory_updated": true, "source": "letta", "timestamp": 1756450000.12, "silent": false}

    A burst answered by one coalesced turn: the last task carries the reply and `answers` (every
    task id the reply answers, its own included); each earlier task gets response_text "" and
    `answered_by` (the task id whose reply answered it), so no task is left without a response
    and no reply is stored or spoken twice.

    A chat task that waited in its viewer's queue longer than VTL_BRIDGE_STALE_CHAT_AFTER is not
    answered late: {"task_id": "3f0c9a", ..., "response_text": "", "memory_updated": false, "stale": true}.
    """

    task_id: str
    user_id: str
    response_text: str
    memory_updated: bool
    source: Literal["letta"] = "letta"
    timestamp: float
    silent: bool = False
    answered_by: str | None = None
    answers: list[str] | None = None
    stale: bool | None = None  # true: a chat task that waited too long, not answered (response_text "")


class ReplyChunk(BaseModel):
    """One sentence of a reply, published on `letta_response_chunks` while the agent is still
    talking (streaming), so speech can start before the turn ends. The final `TaskReply`
    still carries the whole reply and is the authority (e.g. `silent`).

    Example: {"task_id": "3f0c9a", "user_id": "bilibili:12345", "index": 0, "text": "你好呀小明！",
              "source": "letta", "timestamp": 1756450000.12}
    `index` counts from 0 per task. Delivery is at-least-once: after a retry the same
    (task_id, index) may come again, so consumers key on both.
    """

    task_id: str
    user_id: str
    index: int
    text: str
    source: Literal["letta"] = "letta"
    timestamp: float


class TaskResponse(BaseModel):
    """The host output-handler's text-only form on `task_response:{task_id}`.

    Example: {"text": "你好呀小明！"}; a silent turn: {"text": "", "silent": true}
    (published so the output handler, which waits for one message, is not left hanging);
    a task answered by a later task's reply (burst coalescing): {"text": "", "answered_by": "3f0c9b"};
    a chat task that waited too long, not answered: {"text": "", "stale": true}.
    """

    text: str
    silent: bool | None = None
    answered_by: str | None = None
    stale: bool | None = None


class TtsRequest(BaseModel):
    """LPUSHed on `tts_requests`; the TTS service speaks it and publishes on response_channel.

    Example: {"message_id": "letta-3f0c9a", "task_id": "3f0c9a", "text": "你好呀小明！",
              "response_channel": "task_response:3f0c9a"}
    Per-sentence speech (VTL_BRIDGE_TTS_PER_SENTENCE): one request per sentence, message_id
    "letta-3f0c9a-0", "letta-3f0c9a-1", ... and `sentence_index` 0, 1, ...
    """

    message_id: str
    task_id: str
    text: str
    response_channel: str
    sentence_index: int | None = None


class AvatarEvent(BaseModel):
    """One avatar tool call, published on the avatar channel (default `live2d_events`).

    Example: {"type": "avatar", "tool": "set_expression", "args": {"expression": "happy",
              "intensity": 0.7}, "task_id": "3f0c9a", "user_id": "bilibili:12345",
              "source": "letta", "timestamp": 1756450000.12}
    """

    type: Literal["avatar"] = "avatar"
    tool: str
    args: dict[str, Any]
    task_id: str
    user_id: str
    source: Literal["letta"] = "letta"
    timestamp: float


Stage = Literal["intake", "validate", "letta", "internal"]  # where a dead letter's task failed


class DeadLetter(BaseModel):
    """A task the bridge could not process, LPUSHed on `vtl:dead_letters`.

    Example: {"reason": "invalid user_id: contains a control or format character (U+202E)", "raw": "{\\"task_id\\": ...}",
              "task_id": "3f0c9a", "user_id": null, "stage": "validate", "attempts": null,
              "replica_id": "host-1234-ab12", "at": 1756450000.12}
    `raw` is the payload as received (decoded as UTF-8 with replacement characters, cut at the
    payload limit); `stage` is intake (not routable), validate (breaks the contract), letta (Letta
    refused it, or kept failing) or internal (a bridge bug; the log has the traceback).
    """

    reason: str
    raw: str
    task_id: str | None = None
    user_id: str | None = None
    stage: Stage
    attempts: int | None = None
    replica_id: str
    at: float


def dump(model: BaseModel) -> str:
    """Compact JSON of an outgoing document (UTF-8 text, optional fields left out when None)."""
    return model.model_dump_json(exclude_none=True)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "task"
        parts.append(f"invalid {loc}: {err.get('msg')}")
    more = exc.error_count() - 3
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def parse_request(raw: bytes | str, *, max_bytes: int) -> TaskRequest:
    """Validate one raw payload; raise WireError with a dead-letter reason."""
    data_bytes = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    if len(data_bytes) > max_bytes:
        raise WireError(f"payload is {len(data_bytes)} bytes; the limit is {max_bytes}")
    try:
        data = json.loads(data_bytes, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise WireError(f"not a JSON object (got {type(data).__name__})")
    try:
        return TaskRequest.model_validate(data)
    except ValidationError as exc:
        task_id, user_id = data.get("task_id"), data.get("user_id")
        raise WireError(_reason(exc), task_id=task_id if viewer_ids.is_task_id(task_id) else None,
                        user_id=user_id if viewer_ids.is_viewer_id(user_id) else None) from None


def read_input_file(input_file: str, uploads_dir: Path, max_bytes: int) -> str:
    """The text of input_file, a regular UTF-8 file inside uploads_dir; WireError says why not.

    Race-free: the uploads folder is opened once, then every part of the path is opened relative
    to the folder opened before it, never following a link (O_NOFOLLOW). A check of the path
    followed by an open of the path would let anyone who can write in uploads swap a folder for
    a link to / between the two; here the file read is always the one found by that walk. The
    path may be relative to uploads_dir or absolute under it (as configured, or with its links
    resolved); `..` and links anywhere below the uploads folder are refused, and so is anything
    that is not a regular file (a FIFO is never opened, so it cannot block) or is over max_bytes.
    """
    if "\x00" in input_file:
        raise WireError("input_file contains a NUL byte")
    parts = [part for part in input_file.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise WireError("input_file is outside the uploads folder ('..' is not allowed)")
    if input_file.startswith("/"):
        parts = _below_uploads(parts, uploads_dir)
    try:
        folder = os.open(uploads_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise WireError(f"the uploads folder cannot be opened ({exc.strerror})") from None
    try:
        for part in parts[:-1]:
            inner = _open_below(folder, part, os.O_RDONLY | os.O_DIRECTORY)
            os.close(folder)
            folder = inner
        if not parts:
            _not_a_file()  # the uploads folder itself
        data = _read_regular_file(folder, parts[-1], max_bytes)
    finally:
        os.close(folder)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("input_file is not UTF-8 text") from None
    if not text.strip():
        raise WireError("input_file is empty")
    if len(text) > MAX_CONTENT_CHARS:
        raise WireError(f"input_file holds {len(text)} characters; the limit is {MAX_CONTENT_CHARS}")
    return text


_SYMLINK_REFUSED = "input_file has a symbolic link in its path (links are never followed)"


def _below_uploads(parts: list[str], uploads_dir: Path) -> list[str]:
    """The parts of an absolute path below the uploads folder (spelt as configured, or resolved)."""
    for base in (os.path.abspath(uploads_dir), os.path.realpath(uploads_dir)):
        prefix = [part for part in base.split("/") if part]
        if parts[:len(prefix)] == prefix:
            return parts[len(prefix):]
    raise WireError("input_file is outside the uploads folder")


def _open_below(folder: int, name: str, flags: int) -> int:
    """os.open of `name` inside the open folder, never following a link; WireError on failure."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    except OSError as exc:
        if exc.errno == errno.ELOOP or _is_link(folder, name):
            raise WireError(_SYMLINK_REFUSED) from None
        if exc.errno == errno.ENOENT:
            raise WireError("input_file does not exist") from None
        if exc.errno == errno.ENOTDIR:
            raise WireError("input_file does not exist (a part of its path is not a folder)") from None
        raise WireError(f"input_file cannot be opened ({exc.strerror})") from None


def _is_link(folder: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _read_regular_file(folder: int, name: str, max_bytes: int) -> bytes:
    try:
        seen = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        raise WireError("input_file does not exist") from None
    except OSError as exc:
        raise WireError(f"input_file cannot be opened ({exc.strerror})") from None
    if stat.S_ISLNK(seen.st_mode):
        raise WireError(_SYMLINK_REFUSED)
    if not stat.S_ISREG(seen.st_mode):
        _not_a_file()  # before any open: a FIFO or a device is never opened at all
    # Non-blocking and no controlling terminal, in case something else was swapped in since the
    # look above; fstat of what was opened is what decides.
    fd = _open_below(folder, name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            _not_a_file()
        if info.st_size > max_bytes:
            raise WireError(f"input_file is {info.st_size} bytes; the limit is {max_bytes}")
        chunks, size = [], 0
        while size <= max_bytes:  # one byte more than allowed tells a file that grew since fstat
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise WireError(f"input_file is larger than {max_bytes} bytes")
    return b"".join(chunks)


def _not_a_file() -> NoReturn:
    raise WireError("input_file is not a regular file")

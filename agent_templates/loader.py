"""Load the agent template and the persona config, and render them into Letta text.

The template directory (agent_templates/<name>/) holds `template.yaml` in Letta's
CreateAgent / Agent File vocabulary, a Jinja system prompt, and one Jinja file per
memory block whose YAML front matter carries the block's label, description, limit,
read_only and our `shared` flag. The persona variables come from data/config/persona.yaml
(a copy of data/config/persona.sample.yaml).

Rendering uses StrictUndefined: a missing variable is a TemplateError at provisioning
time naming the variable and the file, never an empty persona. A rendered block that does
not fit its limit is a TemplateError too.
"""

from __future__ import annotations

import logging
import re
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, FunctionLoader, StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2 import TemplateError as JinjaTemplateError
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from tools import AVATAR_EXPRESSIONS_ENV, AVATAR_MOTIONS_ENV, TOOLS
from tools.human_block import HUMAN_LABEL, block_time, format_human_block

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).resolve().parent
PERSONA_CONFIG_NAME = "persona.yaml"
PERSONA_SAMPLE_NAME = "persona.sample.yaml"

# Letta 0.16.8 base tools a template may name (letta/constants.py); ours are tools.TOOLS.
LETTA_BASE_TOOLS = frozenset({
    "conversation_search", "memory_insert", "memory_replace", "memory_rethink", "memory_finish_edits",
    "memory", "archival_memory_insert", "archival_memory_search", "core_memory_append", "core_memory_replace",
})
# ToolRuleType values in letta/schemas/enums.py (Letta 0.16.8).
LETTA_TOOL_RULE_TYPES = frozenset({
    "run_first", "exit_loop", "continue_loop", "conditional", "constrain_child_tools",
    "max_count_per_step", "parent_last_tool", "required_before_exit", "requires_approval",
})
# Letta 0.16.8 registers every tool call twice with the rule solver (letta_agent_v3.py
# `tool_rules_solver.register_tool_call` in the tool loop ~l.1896 and again in
# _decide_continuation ~l.2008), so a max_count_per_step rule of N allows N/2 calls. Templates
# state calls per viewer turn; to_letta() multiplies by this. (Letta's own "at most N use(s)"
# line in the prompt then shows the doubled number.)
LETTA_COUNTS_PER_TOOL_CALL = 2
AVATAR_NAME = re.compile(r"^[\w.\-]{1,40}$")
FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


class TemplateError(Exception):
    """A template or persona config problem; the message names the file and the variable."""


# ---------------------------------------------------------------- persona config


def _text(value: Any, what: str = "must be a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(what)
    return value.strip()


def _text_list(value: Any, *, allow_empty: bool) -> list[str]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise ValueError("must be a list" if allow_empty else "must be a non-empty list")
    items = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValueError("every item must be a non-empty string")
        items.append(item.strip())
    return items


def _avatar_names(value: Any) -> list[str]:
    names = _text_list(value, allow_empty=False)
    seen: set[str] = set()
    for name in names:
        if not AVATAR_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid name (letters, digits, _ . - only, at most 40; no commas)")
        if name.casefold() in seen:
            raise ValueError(f"{name!r} is listed twice")
        seen.add(name.casefold())
    return names


class PersonaSpec(BaseModel):
    """Who the VTuber is (renders persona.j2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    personality: str
    speaking_style: str
    catchphrases: list[str] = Field(default_factory=list)
    languages: list[str]
    boundaries: list[str]
    expressions: list[str]
    motions: list[str]

    @field_validator("name", "personality", "speaking_style", mode="before")
    @classmethod
    def _non_empty(cls, value: Any) -> str:
        return _text(value)

    @field_validator("catchphrases", mode="before")
    @classmethod
    def _optional_list(cls, value: Any) -> list[str]:
        return _text_list([] if value is None else value, allow_empty=True)

    @field_validator("languages", "boundaries", mode="before")
    @classmethod
    def _required_list(cls, value: Any) -> list[str]:
        return _text_list(value, allow_empty=False)

    @field_validator("expressions", "motions", mode="before")
    @classmethod
    def _avatar(cls, value: Any) -> list[str]:
        return _avatar_names(value)


class StreamSpec(BaseModel):
    """The initial stream info (renders stream.j2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str
    topic: str
    game: str | None = None
    language: str
    schedule: str

    @field_validator("title", "topic", "language", "schedule", mode="before")
    @classmethod
    def _non_empty(cls, value: Any) -> str:
        return _text(value)

    @field_validator("game", mode="before")
    @classmethod
    def _optional(cls, value: Any) -> str | None:
        return None if value is None or (isinstance(value, str) and not value.strip()) else _text(value)


class PersonaConfig(BaseModel):
    """data/config/persona.yaml: the persona variables and the initial stream values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    persona: PersonaSpec
    stream: StreamSpec
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The file this config was loaded from (the sample, when the caller allowed the fallback)."""
        return self._source


def _describe_validation(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err.get("loc", ())) or "(top level)"
        kind = err.get("type", "")
        msg = str(err.get("msg", ""))
        if kind == "missing":
            msg = "is required"
        elif kind == "extra_forbidden":
            msg = "is not a known setting (check the spelling)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{where}: {msg}")
    return lines


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: cannot be read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TemplateError(f"{path}: invalid YAML{where}: {problem}") from None


def persona_config_path(data_dir: str | Path) -> Path:
    """Where the real persona config lives: <data_dir>/config/persona.yaml (Settings.data_dir)."""
    return Path(data_dir) / "config" / PERSONA_CONFIG_NAME


def load_persona_config(path: str | Path, *, fallback_to_sample: bool = False) -> PersonaConfig:
    """Load and validate a persona config file (normally data/config/persona.yaml).

    With fallback_to_sample=True and no file at path, the sample next to it
    (persona.sample.yaml in the same folder) is loaded instead and a warning logged;
    the caller decides whether that is acceptable (e.g. a demo, never silently).
    """
    path = Path(path)
    if not path.exists():
        sample = path.with_name(PERSONA_SAMPLE_NAME)
        if fallback_to_sample and sample.exists():
            log.warning("persona config %s not found; using the sample %s", path, sample)
            path = sample
        else:
            hint = (
                f"copy {sample} to it and edit it"
                if sample.exists()
                else "create it from data/config/persona.sample.yaml"
            )
            raise TemplateError(f"{path}: persona config not found; {hint}")
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: must be a YAML mapping with 'persona' and 'stream' sections")
    try:
        config = PersonaConfig.model_validate(data)
    except ValidationError as exc:
        details = "\n  ".join(_describe_validation(exc))
        raise TemplateError(f"{path}: invalid persona config:\n  {details}") from None
    config._source = path
    return config


def avatar_secrets(config: PersonaConfig) -> dict[str, str]:
    """The tool environment (agent `secrets`) that tells set_expression / play_motion the valid names."""
    return {
        AVATAR_EXPRESSIONS_ENV: ",".join(config.persona.expressions),
        AVATAR_MOTIONS_ENV: ",".join(config.persona.motions),
    }


# ---------------------------------------------------------------- the agent template


class BlockSpec(BaseModel):
    """One memory block file: its front matter and its Jinja body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(pattern=r"^[a-z][a-z0-9_]{0,49}$")
    description: str = Field(min_length=1)
    limit: int = Field(gt=0, le=100_000)
    read_only: bool
    shared: bool
    body_template: str = ""
    file: str = ""
    body_line_offset: int = 0


class ToolRuleSpec(BaseModel):
    """One Letta tool rule, e.g. {tool_name: stay_silent, type: exit_loop}; other keys pass through."""

    model_config = ConfigDict(extra="allow", frozen=True)

    tool_name: str
    type: str
    max_count_limit: int | None = Field(default=None, gt=0)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in LETTA_TOOL_RULE_TYPES:
            known = ", ".join(sorted(LETTA_TOOL_RULE_TYPES))
            raise ValueError(f"unknown rule type {value!r}; Letta 0.16.8 has {known}")
        return value

    @model_validator(mode="after")
    def _count_needs_limit(self) -> ToolRuleSpec:
        if self.type == "max_count_per_step" and self.max_count_limit is None:
            raise ValueError("max_count_per_step needs max_count_limit")
        return self

    def to_letta(self) -> dict[str, Any]:
        """The rule as the Letta API takes it (`tool_rules=[...]`).

        A max_count_limit in the template means calls per viewer turn; Letta's is doubled
        (LETTA_COUNTS_PER_TOOL_CALL).
        """
        rule = self.model_dump(exclude_none=True)
        if self.type == "max_count_per_step":
            rule["max_count_limit"] = self.max_count_limit * LETTA_COUNTS_PER_TOOL_CALL
        return rule


class AgentTemplate(BaseModel):
    """An agent template loaded from agent_templates/<name>/template.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    agent_type: str = "letta_v1_agent"
    system: str
    memory_blocks: list[BlockSpec]
    tools: list[str]
    include_base_tools: bool = False
    include_base_tool_rules: bool = False
    tool_rules: list[ToolRuleSpec] = Field(default_factory=list)
    parallel_tool_calls: bool = False
    model: str | None = None
    embedding: str | None = None
    context_window_limit: int | None = Field(default=None, gt=0)
    tags: list[str] = Field(default_factory=list)
    system_template: str = ""
    directory: Path

    @model_validator(mode="after")
    def _consistent(self) -> AgentTemplate:
        labels = [block.label for block in self.memory_blocks]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"memory_blocks: label(s) used twice: {', '.join(duplicates)}")
        if HUMAN_LABEL not in labels:
            raise ValueError(f"memory_blocks: a '{HUMAN_LABEL}' block is required (the memory tools write it)")
        human = self.block(HUMAN_LABEL)
        if human.shared or human.read_only:
            raise ValueError(
                f"memory_blocks: the '{HUMAN_LABEL}' block must be per viewer (shared: false, read_only: false)"
            )
        unknown = [name for name in self.tools if name not in TOOLS and name not in LETTA_BASE_TOOLS]
        if unknown:
            raise ValueError(f"tools: unknown tool(s) {', '.join(unknown)}; ours are {', '.join(TOOLS)}")
        for rule in self.tool_rules:
            if rule.tool_name not in self.tools:
                raise ValueError(f"tool_rules: rule for {rule.tool_name!r}, which is not in tools")
        return self

    def block(self, label: str) -> BlockSpec:
        for block in self.memory_blocks:
            if block.label == label:
                return block
        raise TemplateError(f"template {self.name!r} has no block labelled {label!r}")

    @property
    def custom_tools(self) -> list[str]:
        """Our tools (tools.TOOLS) the agent gets; provisioning upserts these."""
        return [name for name in self.tools if name in TOOLS]

    @property
    def letta_tools(self) -> list[str]:
        """Letta's own base tools the agent gets by name."""
        return [name for name in self.tools if name not in TOOLS]

    def letta_tool_rules(self) -> list[dict[str, Any]]:
        return [rule.to_letta() for rule in self.tool_rules]


def _read_block_file(path: Path) -> BlockSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"{path}: block file not found") from None
    match = FRONT_MATTER.match(text)
    if match is None:
        raise TemplateError(
            f"{path}: must start with a '---' YAML front matter (label, description, limit, read_only, shared)"
        )
    try:
        header = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 2})" if mark is not None else ""
        raise TemplateError(f"{path}: invalid front matter YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(header, dict):
        raise TemplateError(f"{path}: the front matter must be a YAML mapping")
    for key in ("body_template", "file", "body_line_offset"):
        header.pop(key, None)
    try:
        return BlockSpec(
            **header,
            body_template=text[match.end() :],
            file=path.name,
            body_line_offset=match.group(0).count("\n"),
        )
    except ValidationError as exc:
        raise TemplateError(f"{path}: invalid front matter:\n  " + "\n  ".join(_describe_validation(exc))) from None


def load_template(name: str = "vtuber", *, root: str | Path = TEMPLATES_DIR) -> AgentTemplate:
    """Load agent_templates/<name>/template.yaml with its system prompt and block files."""
    if not re.fullmatch(r"[a-z0-9_\-]+", name):
        raise TemplateError(f"template name {name!r}: use lowercase letters, digits, _ and - only")
    directory = Path(root) / name
    path = directory / "template.yaml"
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: must be a YAML mapping")
    data = dict(data)
    files = data.get("memory_blocks")
    if not isinstance(files, list) or not all(isinstance(item, str) for item in files):
        raise TemplateError(f"{path}: memory_blocks: must be a list of block file names (e.g. persona.j2)")
    data["memory_blocks"] = [_read_block_file(directory / item) for item in files]
    system_file = data.get("system")
    if not isinstance(system_file, str) or not system_file:
        raise TemplateError(f"{path}: system: must name the system prompt file (e.g. system.j2)")
    try:
        data["system_template"] = (directory / system_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"{directory / system_file}: system prompt file not found") from None
    data["directory"] = directory
    try:
        return AgentTemplate.model_validate(data)
    except ValidationError as exc:
        raise TemplateError(f"{path}: invalid template:\n  " + "\n  ".join(_describe_validation(exc))) from None


# ---------------------------------------------------------------- rendering


def _environment(template: AgentTemplate) -> Environment:
    sources = {block.file: block.body_template for block in template.memory_blocks}
    sources[template.system] = template.system_template
    env = Environment(
        loader=FunctionLoader(lambda name: (sources[name], name, lambda: True) if name in sources else None),
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["human_block"] = format_human_block
    return env


def _line_in(exc: BaseException, file: str) -> int | None:
    if isinstance(exc, TemplateSyntaxError):
        return exc.lineno
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == file:
            line = frame.lineno
    return line


def _render(template: AgentTemplate, file: str, line_offset: int, variables: dict[str, Any]) -> str:
    where = str(template.directory / file)
    try:
        return _environment(template).get_template(file).render(**variables).strip("\n")
    except UndefinedError as exc:
        line = _line_in(exc, file)
        at = f" (line {line + line_offset})" if line else ""
        missing = re.findall(r"'([^']+)' is undefined|has no attribute '([^']+)'", str(exc))
        name = next((a or b for a, b in missing), None)
        what = f"missing variable '{name}'" if name else "undefined value"
        raise TemplateError(f"{where}{at}: {what} ({exc.message})") from None
    except JinjaTemplateError as exc:
        line = _line_in(exc, file)
        at = f" (line {line + line_offset})" if line else ""
        raise TemplateError(f"{where}{at}: {exc.message or exc}") from None


def render_block(template: AgentTemplate, label: str, **variables: Any) -> str:
    """Render the block labelled label with variables; it must fit the block's limit."""
    block = template.block(label)
    text = _render(template, block.file, block.body_line_offset, variables)
    if len(text) > block.limit:
        raise TemplateError(
            f"{template.directory / block.file}: the rendered '{label}' block is {len(text)} characters, "
            f"over its limit of {block.limit}; shorten the persona config or raise the limit"
        )
    return text


def config_variables(config: PersonaConfig) -> dict[str, Any]:
    """The variables persona.j2, stream.j2 and system.j2 see."""
    return {"persona": config.persona, "stream": config.stream}


def render_shared_blocks(template: AgentTemplate, config: PersonaConfig) -> dict[str, str]:
    """{label: value} of every `shared: true` block (one Letta block attached to all viewers' agents)."""
    variables = config_variables(config)
    return {
        block.label: render_block(template, block.label, **variables)
        for block in template.memory_blocks
        if block.shared
    }


def render_system(template: AgentTemplate, config: PersonaConfig) -> str:
    """The system prompt of every viewer's agent."""
    return _render(template, template.system, 0, config_variables(config))


def _timestamp(value: datetime | str) -> str:
    return block_time(value) if isinstance(value, datetime) else str(value)


def render_human_block(
    viewer_id: str,
    display_name: str,
    platform: str,
    first_seen: datetime | str,
    *,
    template: AgentTemplate | None = None,
) -> str:
    """The initial human block of a new viewer (the tools/human_block.py format, via human.j2)."""
    template = template or load_template()
    return render_block(
        template,
        HUMAN_LABEL,
        viewer_id=viewer_id,
        display_name=display_name,
        platform=platform,
        first_seen=_timestamp(first_seen),
    )

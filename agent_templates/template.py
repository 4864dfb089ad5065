"""The agent template (agent_templates/<name>/): `template.yaml` in Letta's CreateAgent / Agent File
vocabulary, a Jinja system prompt, and one Jinja file per memory block whose YAML front matter
carries the block's label, description, limit, read_only and our `shared` flag.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent_templates.files import TemplateError, describe_validation, read_yaml
from tools import TOOLS
from tools.human_block import HUMAN_LABEL

TEMPLATES_DIR = Path(__file__).resolve().parent

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
FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


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
        raise TemplateError(f"{path}: invalid front matter:\n  " + "\n  ".join(describe_validation(exc))) from None


def load_template(name: str = "vtuber", *, root: str | Path = TEMPLATES_DIR) -> AgentTemplate:
    """Load agent_templates/<name>/template.yaml with its system prompt and block files."""
    if not re.fullmatch(r"[a-z0-9_\-]+", name):
        raise TemplateError(f"template name {name!r}: use lowercase letters, digits, _ and - only")
    directory = Path(root) / name
    path = directory / "template.yaml"
    data = read_yaml(path)
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
        raise TemplateError(f"{path}: invalid template:\n  " + "\n  ".join(describe_validation(exc))) from None


# ---------------------------------------------------------------- rendering

"""Rendering the template with the persona into Letta text: the system prompt and the blocks.

StrictUndefined: a missing variable is a TemplateError at provisioning time naming the variable
and the file, never an empty persona. A rendered block that does not fit its limit is a
TemplateError too.
"""

from __future__ import annotations

import re
import traceback
from datetime import datetime
from typing import Any

from jinja2 import Environment, FunctionLoader, StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2 import TemplateError as JinjaTemplateError

from agent_templates.files import TemplateError
from agent_templates.persona import PersonaConfig
from agent_templates.template import AgentTemplate, load_template
from tools.human_block import HUMAN_LABEL, block_time, format_human_block


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

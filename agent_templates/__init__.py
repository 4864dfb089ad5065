"""Who the agent is: the agent template (Letta vocabulary + Jinja) and the persona config loader."""

from agent_templates.loader import (
    AgentTemplate,
    BlockSpec,
    PersonaConfig,
    PersonaSpec,
    StreamSpec,
    TemplateError,
    ToolRuleSpec,
    avatar_secrets,
    config_variables,
    load_persona_config,
    load_template,
    persona_config_path,
    render_block,
    render_human_block,
    render_shared_blocks,
    render_system,
)

__all__ = [
    "AgentTemplate",
    "BlockSpec",
    "PersonaConfig",
    "PersonaSpec",
    "StreamSpec",
    "TemplateError",
    "ToolRuleSpec",
    "avatar_secrets",
    "config_variables",
    "load_persona_config",
    "load_template",
    "persona_config_path",
    "render_block",
    "render_human_block",
    "render_shared_blocks",
    "render_system",
]

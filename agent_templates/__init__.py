"""Who the agent is: the persona config (persona.py), the agent template in Letta vocabulary
(template.py) and its Jinja rendering (render.py); files.py reads and checks their files."""

from agent_templates.files import TemplateError
from agent_templates.persona import PersonaConfig, PersonaSpec, StreamSpec, avatar_secrets, load_persona_config, persona_config_path
from agent_templates.render import config_variables, render_block, render_human_block, render_shared_blocks, render_system
from agent_templates.template import AgentTemplate, BlockSpec, ToolRuleSpec, load_template

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

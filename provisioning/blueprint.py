"""What provisioning renders locally before anything is sent to Letta (the template, the persona
config, the shared blocks' text, the model handles), and how a shared block is found again.
The library part of provisioning: the command (provision.py), the viewer agents (viewers.py),
the upgrade and the stream block all start from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from letta_client import Letta

from agent_templates.files import TemplateError
from agent_templates.persona import PersonaConfig, load_persona_config
from agent_templates.render import render_shared_blocks
from agent_templates.template import AgentTemplate, load_template
from provisioning.naming import PRODUCT_TAG, SHARED_BLOCK_TAG
from vtuber_letta.settings import Settings


class ProvisioningError(Exception):
    """A precondition failed (server unreachable, model handle missing, template invalid)."""


@dataclass
class Blueprint:
    """Everything provisioning renders locally, before anything is sent to Letta."""

    template: AgentTemplate
    config: PersonaConfig
    shared_values: dict[str, str]  # label -> rendered text
    model: str
    embedding: str


def load_blueprint(settings: Settings) -> Blueprint:
    try:
        template = load_template(settings.template_name)
        config = load_persona_config(settings.persona_config, fallback_to_sample=True)
        shared = render_shared_blocks(template, config)
    except TemplateError as exc:
        raise ProvisioningError(str(exc)) from None
    return Blueprint(
        template=template,
        config=config,
        shared_values=shared,
        model=template.model or settings.resolved_model_handle(),
        embedding=template.embedding or settings.resolved_embedding_handle(),
    )


def shared_block_tags(template_name: str, label: str) -> list[str]:
    return [PRODUCT_TAG, SHARED_BLOCK_TAG, f"vtl:template:{template_name}", f"vtl:block:{label}"]


def find_shared_block(client: Letta, template_name: str, label: str):
    """The shared block of this label, oldest first if (by some race) there are several."""
    found = list(client.blocks.list(label=label, tags=shared_block_tags(template_name, label), match_all_tags=True))
    found.sort(key=lambda b: (str(getattr(b, "created_at", "") or ""), b.id))
    return found[0] if found else None

"""`vtuber-letta stream set`: change the shared stream block that every viewer's agent reads.

The stream's fields are kept in the block's metadata, so a partial update
(`--title` only) re-renders the block from the last values plus the change,
through the same stream.j2 the template declares.
"""

from __future__ import annotations

from letta_client import Letta

from agent_templates.files import TemplateError
from agent_templates.persona import StreamSpec
from agent_templates.render import render_block
from provisioning.blueprint import ProvisioningError, find_shared_block, load_blueprint
from vtuber_letta.letta_api import letta_client
from vtuber_letta.settings import Settings

STREAM_FIELDS = ("title", "topic", "game", "language", "schedule")


def set_stream(settings: Settings, changes: dict[str, str | None], *, client: Letta | None = None) -> str:
    changes = {k: v for k, v in changes.items() if v is not None}
    unknown = set(changes) - set(STREAM_FIELDS)
    if unknown:
        raise ProvisioningError(f"unknown stream field(s): {', '.join(sorted(unknown))}")
    if not changes:
        raise ProvisioningError("nothing to change: give at least one of --title --topic --game --language --schedule")
    blueprint = load_blueprint(settings)
    client = client or letta_client(settings)
    block = find_shared_block(client, blueprint.template.name, "stream")
    if block is None:
        raise ProvisioningError("the shared stream block is missing: run `vtuber-letta provision` first")
    metadata = dict(block.metadata or {})
    current = dict(metadata.get("stream") or blueprint.config.stream.model_dump())
    current.update(changes)
    try:
        stream = StreamSpec.model_validate(current)
        value = render_block(blueprint.template, "stream", persona=blueprint.config.persona, stream=stream)
    except (TemplateError, ValueError) as exc:
        raise ProvisioningError(f"invalid stream value: {exc}") from None
    metadata["stream"] = stream.model_dump()
    client.blocks.update(block.id, value=value, metadata=metadata)
    return value

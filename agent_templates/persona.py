"""The persona config (data/config/persona.yaml, a copy of data/config/persona.sample.yaml): who
the VTuber is and what the stream is about, validated, with messages that name the setting.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from agent_templates.files import TemplateError, describe_validation, read_yaml
from tools import AVATAR_EXPRESSIONS_ENV, AVATAR_MOTIONS_ENV

log = logging.getLogger(__name__)

PERSONA_CONFIG_NAME = "persona.yaml"
PERSONA_SAMPLE_NAME = "persona.sample.yaml"
AVATAR_NAME = re.compile(r"^[\w.\-]{1,40}$")


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
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: must be a YAML mapping with 'persona' and 'stream' sections")
    try:
        config = PersonaConfig.model_validate(data)
    except ValidationError as exc:
        details = "\n  ".join(describe_validation(exc))
        raise TemplateError(f"{path}: invalid persona config:\n  {details}") from None
    config._source = path
    return config


def avatar_secrets(config: PersonaConfig) -> dict[str, str]:
    """The tool environment (agent `secrets`) that tells set_expression / play_motion the valid names."""
    return {
        AVATAR_EXPRESSIONS_ENV: ",".join(config.persona.expressions),
        AVATAR_MOTIONS_ENV: ",".join(config.persona.motions),
    }

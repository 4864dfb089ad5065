"""Reading the template's and the persona config's files: TemplateError, and messages that name
the file, the line and the setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class TemplateError(Exception):
    """A template or persona config problem; the message names the file and the variable."""


def describe_validation(exc: ValidationError) -> list[str]:
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


def read_yaml(path: Path) -> Any:
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

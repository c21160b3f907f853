"""Settings written back as the environment text that would give them, by variable name: how
Get shows the settings a VM was launched with (and how its record keeps them)."""

from __future__ import annotations

import enum
import functools

from pydantic_settings import BaseSettings

from cocos_manager.config.go_parse import go_duration_text
from cocos_manager.config.settings import env_name


def value_text(value: object) -> str:
    """Booleans as Go writes them, durations (floats) as Go durations, lists comma-joined."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return go_duration_text(value)
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value)
    return str(value)


@functools.cache
def _names(model: type[BaseSettings]) -> tuple[tuple[str, str], ...]:
    """(field, variable name) of a model, worked out once: this runs at every VM start."""
    return tuple((field, env_name(model, field)) for field in model.model_fields)


def env_values(settings: BaseSettings) -> dict[str, str]:
    return {name: value_text(getattr(settings, field)) for field, name in _names(type(settings))}

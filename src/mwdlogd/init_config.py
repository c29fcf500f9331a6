"""`mwdlogd init-config`: a commented config.toml with every key at its default."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import attrs
import tomli_w

from mwdlogd.config import Config, Duration, Size

HEADER = """\
# mwdlogd configuration (DESIGN §6). Every key is optional; shown are the defaults.
# Environment variables override keys: MWDLOGD_<SECTION>_<KEY>, e.g. MWDLOGD_HTTP_PORT=18888.
# Sizes take units (10MiB, 2GiB), durations too (500ms, 10s, 1h). Port 0 = pick a free port.
# Relative paths are relative to this file's directory.
"""


def _size(value: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


def _duration(value: float) -> str:
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        if value >= factor and value % factor == 0:
            return f"{int(value // factor)}{unit}"
    return f"{int(value * 1000)}ms"


def _value(field: attrs.Attribute[Any], value: Any) -> Any:
    if field.type is Size:
        return _size(value)
    if field.type is Duration:
        return _duration(value)
    return value


def render_default_config() -> str:
    """TOML text of the defaults, each key under a comment, with one fresh random token."""
    config = Config()
    parts = [HEADER]
    for section in attrs.fields(Config):
        values = getattr(config, section.name)
        parts.append(f"\n[{section.name}]\n")
        if section.metadata.get("doc"):
            parts.append(f"# {section.metadata['doc']}\n")
        for field in attrs.fields(type(values)):
            if (section.name, field.name) in EXAMPLES:
                parts.append(EXAMPLES[section.name, field.name](field.metadata["doc"]))
                continue
            if field.metadata.get("doc"):
                parts.append(f"# {field.metadata['doc']}\n")
            parts.append(tomli_w.dumps({field.name: _value(field, getattr(values, field.name))}))
    return "".join(parts)


def _tokens_example(doc: str) -> str:
    token = secrets.token_urlsafe(24)
    return (f"# {doc}\n"
            f'tokens = [{{ name = "engine-01", token = "{token}", customers = [], '
            f'subjects = [] }}]\n')


def _clients_example(doc: str) -> str:
    return (f"# {doc}\n"
            '# e.g. clients = [{ subject = "engine-01", customers = ["acme"] }]\n'
            "clients = []\n")


EXAMPLES: dict[tuple[str, str], Callable[[str], str]] = {
    ("auth", "tokens"): _tokens_example, ("auth", "clients"): _clients_example}

"""Sphinx extension: the configuration reference, generated from the schema at every build.

Every key of `sweeper.config.Config` and of the sweeper plugin's `hydra.sweeper` node, with its
type, default and the one-line meaning written beside it in the source (the comment on the
field's line, or the comment block just above it; a class's docstring for its section). Written
to `reference/configuration.md` before Sphinx reads the sources, so the page cannot drift.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx

PAGE = "reference/configuration.md"
TOP = "top-level keys"


def comments(cls: type) -> dict[str, str]:
    """field name -> the comment that explains it in the source of `cls` or of a dataclass it extends."""
    found: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            found |= {name: text for name, text in _own_comments(base).items() if text}
    return found


def _own_comments(cls: type) -> dict[str, str]:
    source = inspect.getsource(cls)
    by_line: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            by_line[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = by_line.get(node.lineno, "")
            if not text:  # the comment block just above
                above, line = [], node.lineno - 1
                while line >= 1 and lines[line - 1].strip().startswith("#"):
                    above.insert(0, by_line.get(line, ""))
                    line -= 1
                text = " ".join(above)
            found[node.target.id] = text
    return found


def _type(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, Enum):
        return " \\| ".join(member.value for member in hint)
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("|", "\\|")


def _default(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    if value == "???":  # MISSING: chosen from a config group (hydra/sweeper/sampler, ...)
        return "its group's default"
    return "null" if value is None else f"`{value}`" if value != "" else '""'


def sections(cls: type, prefix: str) -> list[tuple[str, str, list[tuple[str, str, str, str]]]]:
    """(section name, its description, rows of (key, type, default, meaning)), nested sections after."""
    hints, notes, instance = typing.get_type_hints(cls), comments(cls), cls()
    rows, nested = [], []
    for field in dataclasses.fields(cls):
        if field.name.startswith("_"):
            continue
        key, value = f"{prefix}{field.name}", getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            nested += sections(type(value), f"{key}.")
        else:
            meaning = notes.get(field.name, "").replace("|", "\\|").replace("<", "&lt;")
            rows.append((key, _type(hints[field.name]), _default(value), meaning))
    doc = inspect.getdoc(cls) or ""
    own = "" if doc.startswith(f"{cls.__name__}(") else " ".join(doc.split())  # not dataclass's own
    return ([(prefix.rstrip(".") or TOP, own, rows)] if rows else []) + nested


def page() -> str:
    from hydra_plugins.pet_lora_sweeper.optuna_mlflow_sweeper import OptunaMlflowSweeperConf
    from sweeper.config import Config

    out = [
        "# Configuration reference",
        "",
        "Generated from the schema (`sweeper/config.py`, and the sweeper plugin's",
        "`OptunaMlflowSweeperConf` for `hydra.sweeper`) at every build of these pages. Any key can be",
        "set on the command line (`python -m sweeper train.lr=3e-4`) or searched in a sweep",
        "(`python -m sweeper -m 'train.lr=tag(log, interval(1e-4, 1e-2))'`).",
        "",
    ]
    every = sections(Config, "") + sections(OptunaMlflowSweeperConf, "hydra.sweeper.")
    for name, description, rows in every:
        out += [f"## {name}" if name == TOP else f"## `{name}`", ""] + (
            [description, ""] if description else []
        )
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{k}` | {t} | {d} | {m} |" for k, t, d, m in rows if k != "hydra.sweeper.defaults"]
        out.append("")
    return "\n".join(out)


def write(app: Sphinx) -> None:
    target = Path(app.srcdir) / PAGE
    target.parent.mkdir(parents=True, exist_ok=True)
    text = page()
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", write)
    return {"parallel_read_safe": True}

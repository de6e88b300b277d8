"""Reading a config file (Ray's ``ServeDeploySchema`` in YAML or JSON) with errors that
name the field and the line.

``load`` parses, validates against the schema and runs ladle's own checks
(what a ``runtime_env`` may hold on one machine); every problem found is
reported at once as a ``ConfigError``, each with its field path
(``applications[0].deployments[1].num_replicas``) and, when the text is
known, its line.  Checks that need to import user code are the builder's
(``builder.py``); it reports with the same paths, so ``locate`` can put a
line on them too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when validating: reading a file needs neither
    import pydantic

    from .schema import ServeDeploySchema

Loc = tuple[str | int, ...]

# runtime_env keys that mean something on one machine.
SUPPORTED_RUNTIME_ENV = ("env_vars", "working_dir")


@dataclass(frozen=True)
class Problem:
    loc: Loc
    message: str
    line: int | None = None

    def describe(self, filename: str = "") -> str:
        where = format_loc(self.loc)
        prefix = f"{filename}:{self.line}: " if filename and self.line else (
            f"line {self.line}: " if self.line else "")
        return f"{prefix}{where + ': ' if where else ''}{self.message}"


class ConfigError(ValueError):
    """A config that is refused whole; ``problems`` says what and where."""

    def __init__(self, problems: Sequence[Problem], filename: str = "") -> None:
        self.problems = list(problems)
        self.filename = filename
        lines = [p.describe(filename) for p in self.problems]
        super().__init__("Invalid config" + (f" {filename}" if filename else "") + ":\n  "
                         + "\n  ".join(lines))


def format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def parse_text(text: str, filename: str = "") -> tuple[Any, dict[Loc, int]]:
    """The document in ``text`` and the line (1-based) of every key and item in it."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([Problem((), f"not valid YAML: {exc.problem or exc}", line)],
                          filename) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem((), f"not valid YAML: {exc}")], filename) from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def _walk(node: Any, loc: Loc, lines: dict[Loc, int]) -> None:
    import yaml

    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, str(key.value))
            lines[child] = key.start_mark.line + 1
            _walk(value, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*loc, index), lines)


def locate(loc: Loc, lines: dict[Loc, int]) -> int | None:
    """The line of ``loc``, or of its nearest ancestor that is in the file."""
    for end in range(len(loc), -1, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return line
    return None


def _clean_loc(loc: Sequence[Any]) -> Loc:
    # pydantic adds the member of a union it tried ('constrained-int', "literal['auto']",
    # 'function-after[...]'): not a field of the file.
    return tuple(part for part in loc if isinstance(part, int)
                 or not any(ch in str(part) for ch in "[]-'"))


def _pydantic_problems(exc: pydantic.ValidationError, lines: dict[Loc, int]) -> list[Problem]:
    problems: dict[Loc, Problem] = {}
    for error in exc.errors(include_url=False):
        loc = _clean_loc(error["loc"])
        if loc in problems:
            continue  # one message per field (a union reports each of its members)
        kind, message = error["type"], str(error["msg"])
        if kind == "extra_forbidden":
            message = "unknown field (misspelled? ladle accepts Ray's ServeDeploySchema)"
        elif kind == "missing":
            message = "missing (required)"
        elif kind == "value_error":
            message = str(error.get("ctx", {}).get("error", message))
        elif "input" in error and kind.endswith(("_type", "_error")):
            value = error["input"]
            message = f"{message}, got {type(value).__name__} {value!r:.60}"
        problems[loc] = Problem(loc, message, locate(loc, lines))
    return list(problems.values())


def validate(data: Any, lines: dict[Loc, int] | None = None, filename: str = "",
             base_dir: Path | None = None) -> ServeDeploySchema:
    """The validated config, or a ConfigError naming every problem (and its line)."""
    import pydantic

    from .schema import ServeDeploySchema

    lines = lines or {}
    if not isinstance(data, dict):
        raise ConfigError([Problem((), "a config must be a mapping with an 'applications' "
                                   f"list, got {type(data).__name__}", 1)], filename)
    try:
        config = ServeDeploySchema.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(_pydantic_problems(exc, lines), filename) from None
    problems = check_for_this_machine(config, base_dir or Path.cwd())
    if problems:
        raise ConfigError([Problem(p.loc, p.message, locate(p.loc, lines)) for p in problems],
                          filename)
    return config


def check_for_this_machine(config: ServeDeploySchema, base_dir: Path) -> list[Problem]:
    """What the schema allows but ladle can't honour on one machine: named, with the field."""
    problems = []
    for index, app in enumerate(config.applications):
        loc: Loc = ("applications", index, "runtime_env")
        for key, value in app.runtime_env.items():
            if key not in SUPPORTED_RUNTIME_ENV:
                problems.append(Problem((*loc, key), "not supported on one machine (ladle "
                                        f"supports {', '.join(SUPPORTED_RUNTIME_ENV)})"))
            elif key == "env_vars" and (not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
                problems.append(Problem((*loc, key), "must map names to string values"))
            elif key == "working_dir":
                path = resolve_working_dir(value, base_dir)
                if path is None:
                    problems.append(Problem((*loc, key), "must be a local directory on this "
                                            f"machine (or local://...), got {value!r}"))
                elif not path.is_dir():
                    problems.append(Problem((*loc, key), f"no such directory: {path}"))
    return problems


def resolve_working_dir(value: Any, base_dir: Path) -> Path | None:
    """A runtime_env working_dir as a local path (relative to ``base_dir``), or None."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("local://"):
        value = value[len("local://"):]
    elif "://" in value:
        return None  # a remote URI: nothing downloads it here
    return (base_dir / os.path.expanduser(str(value))).resolve()


def load(path: Path) -> ServeDeploySchema:
    """Read, parse and validate the config file at ``path`` (relative paths in it are
    relative to the directory the command runs in, as with Ray)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([Problem((), f"can't read it: {exc.strerror or exc}")],
                          str(path)) from None
    data, lines = parse_text(text, str(path))
    return validate(data, lines, str(path))

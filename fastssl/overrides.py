"""Command-line overrides and `--help` for any typed config (`fastssl.config.Config`,
`fastssl.distill.config.DistillConfig`): `--section.field VALUE` read as the field's declared type,
and each field's help read from the `# comment` beside its declaration.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import re
import tokenize
import typing
from typing import Any, TypeVar

from fastssl.config import ConfigError, field_types

# A config: a dataclass whose fields are sections, each a dataclass of fields.
ConfigT = TypeVar("ConfigT")


def _parse_value(text: str, typ: Any, name: str) -> Any:
    """Convert a command-line string to the field's declared type."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("write true or false; also yes/no, on/off, 1/0")
        if typ is int:
            return int(text)
        if typ is float:
            return float(eval_fraction(text))
        if typ is str:
            return text
        if origin is tuple:
            args = typing.get_args(typ)
            parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
            if len(parts) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return tuple(_parse_value(p.strip(), a, name) for p, a in zip(parts, args))
    except ValueError as err:
        raise ConfigError(f"--{name}: cannot read {text!r} as {_type_name(typ)} ({err})") from None
    raise ConfigError(f"--{name}: fields of type {typ} cannot be set from the command line")


def eval_fraction(text: str) -> float:
    """Read a float, also written as a fraction such as `2/3` (beta's paper value)."""
    if "/" in text:
        num, den = text.split("/", 1)
        if float(den) == 0:
            raise ValueError("a fraction over 0")
        return float(num) / float(den)
    return float(text)


def _type_name(typ: Any) -> str:
    return getattr(typ, "__name__", str(typ))


def field_names(cfg: Any) -> list[str]:
    """All `section.field` names, for error messages and `--help`."""
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def field_help(cfg: Any) -> dict[str, str]:
    """`section.field` -> its one-line help, for `--help`.

    The help of a field is the `# comment` on its line (or the comment lines right above
    it): the comment beside the declaration is the single place that says what a field
    means and which values it takes, so `--help` reads it instead of a second copy that
    could drift. A field without a comment gets "" (tests/test_config.py forbids that).
    """
    return {f"{s.name}.{name}": text for s in dataclasses.fields(cfg)
            for name, text in _comment_help(type(getattr(cfg, s.name))).items()}


def _comment_help(cls: type) -> dict[str, str]:
    """Each dataclass field's comment, read from the class source ("" when there is none)."""
    names = [f.name for f in dataclasses.fields(cls)]
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (a frozen build): help is empty, not an error
        return dict.fromkeys(names, "")
    comments: dict[int, tuple[str, bool]] = {}  # line index -> (text, the comment is the whole line)
    source = "\n".join(lines) + "\n"
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start[0] - 1, tok.start[1]
            comments[row] = (tok.string.lstrip("#").strip(), not lines[row][:col].strip())
    found: dict[str, str] = {}
    for row, line in enumerate(lines):
        match = re.match(r"\s+(\w+)\s*:", line)
        name = match.group(1) if match else None
        if name not in names or name in found:
            continue
        text, whole_line = comments.get(row, ("", True))
        if not text or whole_line:  # no comment on the line: the block of comment lines above it
            above, r = [], row - 1
            while r in comments and comments[r][1]:
                above.insert(0, comments[r][0])
                r -= 1
            text = " ".join(above)
        found[name] = text
    return {name: found.get(name, "") for name in names}


def set_field(cfg: Any, dotted: str, text: str) -> None:
    """Set `section.field` from its command-line text; unknown names are an error."""
    section_name, _, name = dotted.partition(".")
    section = getattr(cfg, section_name, None) if section_name in {f.name for f in dataclasses.fields(cfg)} else None
    types = field_types(section) if section is not None else {}
    if section is None or name not in types:
        names = field_names(cfg)
        close = [n for n in names if n.split(".")[-1] == dotted.split(".")[-1] or n.startswith(dotted)]
        close = close or difflib.get_close_matches(dotted, names, n=3, cutoff=0.6)
        close = close or [n for n in names if n.startswith(section_name + ".") and name and name in n]
        hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
        raise ConfigError(f"--{dotted}: unknown recipe field.{hint} Run with --help to list every field.")
    setattr(section, name, _parse_value(text, types[name], dotted))


def apply_overrides(cfg: ConfigT, args: list[str]) -> ConfigT:
    """Apply `--section.field value` / `--section.field=value` pairs in order."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: fields are set as --section.field VALUE")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key}: missing value")
            value = args[i + 1]
            i += 2
        set_field(cfg, key, value)
    return cfg

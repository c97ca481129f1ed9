"""The commands the docs give are commands the code takes: every `python tools/X.py ...`, `python
recipes/Y.py ...` and `accelerate launch ... X.py ...` in README.md, docs/*.md and the tools' and
recipes' docstrings parses with that tool's own parser (its flags, their values), every
`--section.field value` a recipe gets names a field of its config with a value the config accepts,
and Accelerate's launcher takes its flags. Nothing runs: each tool is stopped right after it has
parsed its arguments. Besides: every `--section.field` a user reads anywhere is a config field, and
README's module map names every module and only files that exist."""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_recipe, load_tool

from fastssl.cli import parse
from fastssl.config import ConfigError

SCRIPT = re.compile(r"(tools|recipes)/\w+\.py")
LAUNCHERS = {"python", "python3", "accelerate"}
OPERATORS = set("&;|<>()")


def doc_texts() -> dict[str, str]:
    """Where commands are written: the Markdown docs' code blocks, and the scripts' module docstrings."""
    texts = {}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        blocks = re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), flags=re.S)
        texts[str(doc.relative_to(REPO))] = "\n".join(blocks)
    for script in sorted([*(REPO / "tools").glob("*.py"), *(REPO / "recipes").glob("*.py")]):
        texts[str(script.relative_to(REPO))] = ast.get_docstring(ast.parse(script.read_text())) or ""
    return texts


def documented_commands() -> list[tuple[str, list[str] | None, str, list[str]]]:
    """(where, the launcher's flags or None, script, its arguments) for each command line that runs one
    of our scripts: backslash continuations joined, comments dropped, cut at shell operators. A `$VAR`
    the same text assigns (`D="--data.source folder ..."`) is expanded; any other stands for a folder.
    `<name>` placeholders are read as names; a usage synopsis (`[--flag a|b]`) is not a command."""
    found = []
    for where, text in doc_texts().items():
        assigned: dict[str, str] = {}
        for line in text.replace("\\\n", " ").splitlines():
            line = re.sub(r"<([A-Za-z][\w.-]*)>", r"\1", line)
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            try:
                tokens = list(lexer)
            except ValueError:  # prose with an apostrophe, not a command
                continue
            assignments = [re.fullmatch(r"([A-Za-z_]\w*)=(.*)", t) for t in tokens]
            if tokens and all(assignments):
                assigned.update(m.groups() for m in assignments)
                continue
            segment: list[str] = []
            for token in [*tokens, ";"]:
                if token and set(token) <= OPERATORS:
                    found += script_command(where, segment)
                    segment = []
                elif re.fullmatch(r"\$\w+", token) and token[1:] in assigned:
                    segment += shlex.split(assigned[token[1:]])
                else:
                    segment.append(re.sub(r"\$\w+", "out", token))
    return found


def script_command(where: str, segment: list[str]) -> list[tuple[str, list[str] | None, str, list[str]]]:
    script = next((i for i, t in enumerate(segment) if SCRIPT.fullmatch(t)), None)
    launcher = segment[0].rsplit("/", 1)[-1] if segment else ""
    if script is None or launcher not in LAUNCHERS or any(t.startswith("[") for t in segment):
        return []
    launch_flags = segment[2:script] if launcher == "accelerate" else None  # after `accelerate launch`
    return [(where, launch_flags, segment[script], segment[script + 1:])]


class Parsed(Exception):
    """Raised by the patched parser once a tool's arguments parsed: the tool goes no further."""

    def __init__(self, extras: list[str]) -> None:
        super().__init__()
        self.extras = extras


def tool_parse(name: str, args: list[str], monkeypatch) -> list[str] | str:
    """The arguments the tool's parser left to others (a recipe's overrides), or its error."""
    real = argparse.ArgumentParser.parse_known_args

    def parse_known_then_stop(self, argv=None, namespace=None):
        _, extras = real(self, argv, namespace)
        raise Parsed(extras)

    def parse_then_stop(self, argv=None, namespace=None):
        _, extras = real(self, argv, namespace)
        if extras:  # what parse_args says of them
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        raise Parsed([])

    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, name, sys.modules.get(name))  # other tests keep the module they loaded
        patch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_then_stop)
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.setattr(torch.cuda, "is_available", lambda: True)  # the docs' GPU commands, on any machine
        try:
            load_tool(name).main(args)
        except Parsed as parsed:
            return parsed.extras
        except SystemExit as exit_:
            return [] if exit_.code == 0 and "--help" in args else f"exit {exit_.code}"
    return "the tool ran to its end without parsing its arguments"


def recipe_problem(recipe: str, args: list[str]) -> str | None:
    """Why the recipe's config refuses these overrides, or None."""
    name = Path(recipe).stem
    cfg = load_recipe(name)
    config_module = "fastssl.distill.config" if name.startswith("distill") else "fastssl.config"
    validate = importlib.import_module(config_module).validate
    try:
        cfg, flags = parse(cfg, args)
        if not flags["help"]:  # --help prints before the config is checked
            validate(cfg)
    except ConfigError as err:
        return str(err)
    return None


COMMANDS = documented_commands()


def test_the_docs_give_commands_to_check():
    """The extraction finds the commands (a parser that found none would pass every check below)."""
    scripts = {script for _, _, script, _ in COMMANDS}
    assert {"recipes/mira_bs512.py", "tools/convert_imagenet_to_ffcv.py", "tools/eval_linear.py",
            "tools/gpu_check.py", "recipes/distill_mlcpc_cifar100.py"} <= scripts
    assert len(COMMANDS) >= 50 and sum(launch is not None for _, launch, _, _ in COMMANDS) >= 5


@pytest.mark.parametrize("where,launch,script,args", COMMANDS,
                         ids=[f"{w}:{s}:{i}" for i, (w, _, s, _) in enumerate(COMMANDS)])
def test_a_documented_command_parses(where, launch, script, args, monkeypatch, capsys):
    if launch is not None:
        from accelerate.commands.launch import launch_command_parser

        try:
            launch_command_parser().parse_args([*launch, script])
        except SystemExit:
            raise AssertionError(f"{where}: accelerate launch {' '.join(launch)}: {capsys.readouterr().err}") from None
    if script.startswith("recipes/"):
        problem = recipe_problem(script, args)
        assert problem is None, f"{where}: {script} {' '.join(args)}: {problem}"
        return
    left = tool_parse(Path(script).stem, args, monkeypatch)
    assert isinstance(left, list), f"{where}: {script} {' '.join(args)}: {left}: {capsys.readouterr().err}"
    if left:  # what a tool hands on to a recipe (profile_throughput's overrides)
        default = load_tool(Path(script).stem).DEFAULT_RECIPE
        recipe = args[args.index("--recipe") + 1] if "--recipe" in args else default
        problem = recipe_problem(recipe, left)
        assert problem is None, f"{where}: {script} {' '.join(args)}: {problem}"


# Named on purpose though not fields: the generic form, and the misspelt field whose message benchmarks.md times.
NOT_FIELDS = {"--section.field", "--data.field", "--optim.lrr"}


def test_every_field_the_docs_and_messages_name_exists():
    """A `--section.field` named anywhere a user reads it (the docs, a docstring, an error message's fix) is a
    field of the training or the distillation config."""
    from fastssl.config import Config
    from fastssl.overrides import field_names
    from fastssl.distill.config import DistillConfig

    known = {f"--{name}" for cfg in (Config(), DistillConfig()) for name in field_names(cfg)}
    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"),
             *[p for folder in ("fastssl", "pipelines", "tools", "recipes") for p in (REPO / folder).rglob("*.py")]]
    named = {(m.group(0), str(path.relative_to(REPO))) for path in texts
             for m in re.finditer(r"(?<![\w-])--[a-z_]+\.[a-z_0-9]+\b", path.read_text())}
    assert len({flag for flag, _ in named}) > 60  # the scan finds them
    assert sorted((flag, where) for flag, where in named if flag not in known | NOT_FIELDS) == []


def test_the_readme_layout_names_every_module_and_only_files_that_exist():
    """README's module map: each module of the packages, tools and recipes is named there (by file name,
    or by module name for the eval package), and each file it names exists."""
    text = (REPO / "README.md").read_text()
    layout = text[text.index("## Layout"):text.index("## Troubleshooting")]
    ours = [p for folder in ("fastssl", "pipelines", "tools", "recipes") for p in (REPO / folder).rglob("*")
            if p.suffix in (".py", ".sh") and p.name != "__init__.py"]
    named = set(re.findall(r"\b(\w+)(?:\.\w+)?\b", layout))
    unnamed = [str(p.relative_to(REPO)) for p in ours if p.stem not in named]
    assert unnamed == []
    files = {p.name for folder in ("fastssl", "pipelines", "tools", "recipes") for p in (REPO / folder).rglob("*")}
    assert sorted(n for n in set(re.findall(r"\b\w+\.(?:py|sh|sbatch|yaml)\b", layout)) if n not in files) == []

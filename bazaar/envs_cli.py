"""``bazaar env``: the environments this machine can run, and a scaffold for a new one.

``bazaar env list`` shows the built-ins (their versions are the environment's own, ``version``)
and every environment an installed package registers in the ``bazaar.environments`` entry-point
group (with the package and its version): what a run spec may name. ``bazaar env init NAME``
writes an installable package — ``pyproject.toml`` with the entry point, a tool-using example
environment, and its tests — that ``pip install -e NAME`` makes available to every node here.
"""

from __future__ import annotations

import importlib.metadata
import keyword
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from bazaar.output import console
from bazaar.output import fail as _fail

env_app = typer.Typer(help="Environments: list what is installed, scaffold a new one.")

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@env_app.command("list")
def env_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Every environment a run spec may name: the built-ins and the installed packages'."""
    import json

    from envs.registry import BUILTINS, ENTRY_POINT_GROUP

    rows = []
    for name, cls in sorted(BUILTINS.items()):
        doc = sys.modules[cls.__module__].__doc__
        rows.append({"name": name, "version": cls.version, "harness": cls.harness,
                     "source": "built-in", "about": _first_line(doc)})  # fmt: skip
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in sorted(points, key=lambda e: e.name):
        dist = ep.dist
        source = f"{dist.name} {dist.version}" if dist is not None else ep.value
        try:
            env = ep.load()()
            doc = sys.modules[type(env).__module__].__doc__ or type(env).__doc__
            version, harness, about = env.version, env.harness, _first_line(doc)
        except Exception as e:  # a broken package is listed, with why, not a crash
            version, harness, about = "?", "?", f"cannot load: {type(e).__name__}: {e}"
        rows.append({"name": ep.name, "version": version, "harness": harness,
                     "source": source, "about": about})  # fmt: skip
    rows.append({"name": "reasoning_gym:<task>", "version": "", "harness": "single_turn",
                 "source": "reasoning-gym", "about": "its procedural tasks"})  # fmt: skip
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="environments")
    for col in ("name", "version", "harness", "from", "about"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r["version"]), r["harness"], r["source"], r["about"])
    console.print(table)


def _first_line(doc: str | None) -> str:
    """A module docstring's first line without its ````name``:`` lead."""
    line = (doc or "").strip().split("\n")[0]
    return re.sub(r"^``[^`]+``:\s*", "", line)


@env_app.command("init")
def env_init(
    name: Annotated[str, typer.Argument(help="The environment's name (lower case, a-z 0-9 _).")],
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where to write it (default: ./NAME).")
    ] = None,
) -> None:
    """Write an installable environment package: pyproject.toml (with the entry point), a
    tool-using example environment, and its tests."""
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise _fail(f"the name must be lower case letters, digits and _ (got {name!r})")
    from envs.registry import BUILTINS

    if name in BUILTINS:
        raise _fail(f"{name!r} is a built-in environment: choose another name")
    root = directory or Path(name)
    if root.exists() and any(root.iterdir()):
        raise _fail(f"{root} exists and is not empty: nothing written")
    module = f"{name}_env"
    files = {
        "pyproject.toml": PYPROJECT.format(name=name, module=module),
        "README.md": README.format(name=name, module=module),
        f"{module}/__init__.py": MODULE.format(name=name, cls=_camel(name)),
        f"tests/test_{name}.py": TESTS.format(name=name, module=module, cls=_camel(name)),
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    console.print(f"wrote {root}/ — install it with: pip install -e {root}")
    console.print(f"then: bazaar env list (shows {name}); pytest {root}/tests")


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_") if part) or "Env"


PYPROJECT = """[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}-env"
version = "0.1.0"
description = "The {name} environment for Bazaar"
requires-python = ">=3.11"

[project.entry-points."bazaar.environments"]
{name} = "{module}:load"

[tool.setuptools]
packages = ["{module}"]
"""

README = """# {name}

A Bazaar environment. `pip install -e .` registers it (`bazaar env list` shows it); a run spec
then names it `{name}` (arguments: `{name} {{"high": 100}}`).

`{module}/__init__.py` holds the environment: examples drawn from a seed, a tool, a rubric.
`pytest tests` checks it with scripted policies.
"""

MODULE = '''"""``{name}``: count a letter in a long word, with a tool (an example environment).

Edit ``make_example``, the tools and the rubric; keep every example a function of the random
generator it is given (any peer must rebuild it) and every tool deterministic (a verifier
replays its results).
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

from envs.base import Message, Rubric, ToolEnvironment


def count_letter(word: str, letter: str) -> int:
    """Count how many times a letter occurs in a word.

    Args:
        word: the word to look in
        letter: a single letter
    """
    if len(letter) != 1:
        raise ValueError("letter must be a single character")
    return word.count(letter)


class {cls}(ToolEnvironment):
    env_id = "{name}"
    version = "1"
    tools: ClassVar[list[Any]] = [count_letter]
    system_prompt = "Answer with the number alone."

    def __init__(self, length: int = 30, max_turns: int = 3) -> None:
        self.length, self.max_turns = length, max_turns
        super().__init__(Rubric([self.correct, self.used_tool], [1.0, 0.0]))

    def make_example(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        word = "".join(rng.choice("abcde") for _ in range(self.length))
        letter = rng.choice("abcde")
        question = f"How many times does {{letter!r}} occur in {{word}}?"
        return question, str(word.count(letter)), {{"word": word, "letter": letter}}

    @staticmethod
    def correct(completion: list[Message], answer: str) -> float:
        return float(completion[-1]["content"].strip() == answer)

    @staticmethod
    def used_tool(state: dict[str, Any]) -> float:
        return float(state.get("tool_calls", 0) > 0)


def load(**args: Any) -> {cls}:
    """The entry point: Bazaar calls it with a run spec's arguments."""
    return {cls}(**args)
'''

TESTS = '''"""The {name} environment, played by scripted policies."""

from __future__ import annotations

import json

from envs import load_environment
from {module} import {cls}


def test_it_is_registered_and_examples_are_reproducible() -> None:
    env = load_environment("{name}")
    assert isinstance(env, {cls})
    assert env.examples(1, 0, 3) == env.examples(1, 0, 3)


def test_an_agent_that_uses_the_tool_is_rewarded() -> None:
    env = {cls}()
    ex = env.example(0, 0)
    word, letter = ex.info["word"], ex.info["letter"]

    def agent(messages):
        if messages[-1]["role"] == "tool":
            return messages[-1]["content"]
        call = {{"name": "count_letter", "arguments": {{"word": word, "letter": letter}}}}
        return "<tool_call>" + json.dumps(call) + "</tool_call>"

    completion, state = env.rollout(ex, agent)
    assert env.score(ex, completion, state).reward == 1.0


def test_a_bad_call_is_answered_not_raised() -> None:
    env = {cls}()
    ex = env.example(0, 1)
    bad = '<tool_call>{{"name": "count_letter", "arguments": {{"word": 3}}}}</tool_call>'
    completion, state = env.rollout(ex, lambda messages: bad)
    assert completion[1]["role"] == "tool" and completion[1]["content"].startswith("error:")
    assert env.score(ex, completion, state).reward == 0.0
'''

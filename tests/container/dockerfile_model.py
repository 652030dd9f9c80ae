"""Just enough of Docker's reading of a Dockerfile and a .dockerignore for the tests to check
the real files and run their commands without Docker.

Import as ``from dockerfile_model import ...`` (pytest puts ``tests/container`` on sys.path).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined
    line: int  # where it starts, for messages

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec form (`["a", "b"]`), else None (shell form)."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The stage's environment after its ENV lines, `$VAR`/`${VAR}` expanded from `base`
        and earlier ENV values, as Docker does."""
        env = dict(base or {})
        for instruction in self.all("ENV"):
            env.update(parse_env(instruction.args, env))
        return env


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) per instruction: comments and blank lines dropped (also
    inside a continuation, as Docker does), backslash continuations joined."""
    result: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        result.append((start, " ".join(parts)))
        parts = []
    assert not parts, "the Dockerfile ends inside a continuation"
    return result


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for number, line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), number)
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--")]  # --platform=...
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"line {number}: {keyword} before the first FROM"
        stages[-1].instructions.append(instruction)
    return stages


def read_dockerfile() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(value: str, env: dict[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def parse_env(args: str, env: dict[str, str]) -> dict[str, str]:
    """`ENV A=1 B="x y"` or the legacy `ENV A some value`."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: expand(" ".join(words[1:]), env)}
    result: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        assert sep, f"ENV {args!r}: {word!r} is not KEY=VALUE"
        # Values on one ENV line see the environment from before that line.
        result[key] = expand(value, env)
    return result


def split_options(args: str) -> tuple[dict[str, str], str]:
    """`--a=1 --b=2 REST` -> ({"a": "1", "b": "2"}, "REST") (COPY, HEALTHCHECK)."""
    options: dict[str, str] = {}
    rest = args.strip()
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        key, _, value = word[2:].partition("=")
        options[key] = value
        rest = rest.strip()
    return options, rest


@dataclass
class Healthcheck:
    options: dict[str, str]
    command: list[str]  # exec form, or ["/bin/sh", "-c", text] for the shell form


def healthcheck(stage: Stage) -> Healthcheck | None:
    found = stage.all("HEALTHCHECK")
    if not found:
        return None
    options, rest = split_options(found[-1].args)  # the last one counts
    keyword, _, command = rest.partition(" ")
    if keyword.upper() == "NONE":
        return None
    assert keyword.upper() == "CMD", f"HEALTHCHECK {rest!r}"
    as_exec = Instruction("CMD", command, found[-1].line).exec_form()
    return Healthcheck(options, as_exec if as_exec is not None else ["/bin/sh", "-c", command])


def copy_sources(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(options, sources, destination) of a COPY (shell form only)."""
    options, rest = split_options(instruction.args)
    words = rest.split()
    return options, words[:-1], words[-1]


# ---------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


@dataclass
class DockerIgnore:
    """Docker's rules: patterns in order, `!` re-includes, the last match wins, and a pattern
    that matches a directory matches everything under it."""

    rules: list[tuple[bool, re.Pattern[str]]]

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line[1:].strip() if include else line
            pattern = pattern.strip("/")
            rules.append((include, _pattern_regex(pattern)))
        return cls(rules)

    def excluded(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for include, regex in self.rules:
            if any(regex.fullmatch(p) for p in prefixes):
                result = not include
        return result


def read_dockerignore() -> DockerIgnore:
    return DockerIgnore.parse(DOCKERIGNORE.read_text())

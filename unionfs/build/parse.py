"""Reading a Containerfile/Dockerfile into stages of instructions.

The syntax itself (line continuations, comments, the `escape` directive, JSON
versus shell forms, heredocs) is left to the `dockerfile` package, which wraps
BuildKit's own parser; this module checks what the parser lets through (unknown
instructions, missing arguments, flags an instruction does not take) and groups
the instructions into stages. Variables are expanded later, when each step runs
(`lexer.py`), because their values depend on the steps before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import dockerfile

from ..errors import UserError


class DockerfileError(UserError):
    """A Containerfile the build cannot run, with its line number."""


@dataclass
class Heredoc:
    name: str
    content: str
    expand: bool  # false when the delimiter was quoted (<<"EOF")


@dataclass
class Instruction:
    """One instruction as written (nothing expanded yet)."""

    cmd: str  # upper case: RUN, COPY, ...
    args: list[str]  # the parser's words (JSON form: the decoded list)
    json: bool  # exec/JSON form
    flags: dict[str, str | None]  # --name=value (None for a bare --name)
    original: str  # the instruction's text, continuations joined
    line: int
    heredocs: list[Heredoc] = field(default_factory=list)
    trigger: Instruction | None = None  # ONBUILD's instruction

    def where(self) -> str:
        return f"line {self.line}: {self.original.splitlines()[0] if self.original else self.cmd}"


@dataclass
class Stage:
    index: int
    name: str | None  # `FROM image AS name`, lower case
    base: str  # the FROM argument, unexpanded
    platform: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    escape: str
    global_args: list[Instruction]  # ARGs before the first FROM
    stages: list[Stage]

    def step_count(self, stages: list[Stage]) -> int:
        return sum(1 + len(s.instructions) for s in stages)


# Flags each instruction accepts (BuildKit's, minus those that need a network,
# secrets or a cache daemon); a flag not listed is refused.
FLAGS: dict[str, set[str]] = {
    "FROM": {"platform"},
    "COPY": {"from", "chown", "chmod", "link"},
    "ADD": {"chown", "chmod", "link"},
    "HEALTHCHECK": {"interval", "timeout", "start-period", "start-interval", "retries"},
    "RUN": {"network"},
}
# RUN --network=: BuildKit's modes that need no network of pyunion's making (default: the
# build's --network).
RUN_NETWORKS = ("default", "none", "host")
NO_ARGS_OK = {"HEALTHCHECK"}
KNOWN = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9._-]*$")
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.*?)\s*$")


def directives(text: str) -> dict[str, str]:
    """The parser directives (`# escape=`, `# syntax=`) at the top of the file."""
    out: dict[str, str] = {}
    for line in text.lstrip("\ufeff").splitlines():
        m = _DIRECTIVE.match(line)
        if not m:
            break
        key = m.group(1).lower()
        if key in out:
            break
        out[key] = m.group(2)
    return out


def _flag_text(flag: str, original: str) -> str:
    """A flag as written: the `dockerfile` library (3.4) hands flags back as their
    UTF-8 bytes read as Latin-1 (`--from=é` comes as `--from=Ã©`), values and the
    original line correctly. A flag not found in the line is mended if, mended, it is."""
    if flag in original:
        return flag
    try:
        mended = flag.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return flag
    return mended if mended in original else flag


def _flags(cmd: str, raw: tuple[str, ...], line: int, original: str) -> dict[str, str | None]:
    allowed = FLAGS.get(cmd, set())
    out: dict[str, str | None] = {}
    for f in (_flag_text(f, original) for f in raw):
        name, eq, value = f[2:].partition("=")
        if name not in allowed:
            if cmd == "RUN" and name in ("mount", "security"):
                raise DockerfileError(
                    f"line {line}: RUN --{name} is not supported by pyunion build"
                )
            if cmd == "ADD" and name in ("checksum", "keep-git-dir"):
                raise DockerfileError(
                    f"line {line}: ADD --{name} is for remote sources, "
                    "which pyunion build does not fetch"
                )
            raise DockerfileError(f"line {line}: unknown flag for {cmd}: --{name}")
        if name in out:
            raise DockerfileError(f"line {line}: {cmd} --{name} given twice")
        out[name] = value if eq else None
    net = out.get("network", "default")
    if cmd == "RUN" and net not in RUN_NETWORKS:
        raise DockerfileError(
            f"line {line}: RUN --network={net or ''}: none, host or default "
            "(pyunion build makes no other network)"
        )
    return out


def _heredocs(cmd: dockerfile.Command) -> list[Heredoc]:
    out = []
    for h in cmd.heredocs:
        quoted = re.search(r"<<-?\s*([\"'])" + re.escape(h.name) + r"\1", cmd.original)
        out.append(Heredoc(h.name, h.content, expand=quoted is None))
    return out


def _instruction(c: dockerfile.Command) -> Instruction:
    cmd = c.cmd.upper()
    line = c.start_line
    if cmd not in KNOWN:
        raise DockerfileError(f"line {line}: unknown instruction: {c.cmd}")
    args = list(c.value)
    if cmd == "ONBUILD":
        sub = (c.sub_cmd or "").upper()
        if not sub:
            raise DockerfileError(f"line {line}: ONBUILD needs an instruction")
        if sub in ("ONBUILD", "FROM", "MAINTAINER"):
            raise DockerfileError(f"line {line}: {sub} is not allowed as an ONBUILD trigger")
        trigger_text = c.original.split(None, 1)[1] if " " in c.original.strip() else ""
        parsed = parse_commands(trigger_text, line)
        if len(parsed) != 1:
            raise DockerfileError(f"line {line}: ONBUILD takes exactly one instruction")
        return Instruction(cmd, args, c.json, {}, c.original, line, trigger=parsed[0])
    # `CMD []` and `ENTRYPOINT []` (JSON, no words) clear them, as in Docker and buildah.
    empty_ok = cmd in NO_ARGS_OK or (c.json and not args and cmd in ("CMD", "ENTRYPOINT"))
    if (not args or args == [""]) and not empty_ok:
        raise DockerfileError(f"line {line}: {cmd} requires at least one argument")
    flags = _flags(cmd, c.flags, line, c.original)
    if cmd in ("COPY", "ADD") and len(args) < 2:
        raise DockerfileError(
            f"line {line}: {cmd} requires at least two arguments: a source and a destination"
        )
    if cmd == "SHELL" and not c.json:
        raise DockerfileError(f"line {line}: SHELL requires the arguments to be in JSON form")
    return Instruction(cmd, args, c.json, flags, c.original, line, _heredocs(c))


def parse_commands(text: str, first_line: int = 1) -> list[Instruction]:
    """Instructions of a text (a whole file, or an ONBUILD trigger)."""
    try:
        cmds = dockerfile.parse_string(text)
    except dockerfile.GoParseError as e:
        raise DockerfileError(f"cannot parse the Containerfile: {e}") from None
    out = []
    for c in cmds:
        inst = _instruction(c)
        if first_line != 1:
            inst.line = first_line
        out.append(inst)
    return out


def parse(text: str) -> Dockerfile:
    """Parse a whole Containerfile into global ARGs and stages."""
    escape = directives(text).get("escape", "\\")
    if escape not in ("\\", "`"):
        raise DockerfileError(f"invalid escape directive {escape!r}: use \\ or `")
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    names: set[str] = set()
    for inst in parse_commands(text):
        if inst.cmd == "FROM":
            stages.append(_stage(inst, len(stages), names))
        elif not stages:
            if inst.cmd != "ARG":
                raise DockerfileError(
                    f"line {inst.line}: no FROM before {inst.cmd} (only ARG "
                    "may come before the first FROM)"
                )
            global_args.append(inst)
        else:
            stages[-1].instructions.append(inst)
    if not stages:
        raise DockerfileError("the Containerfile has no FROM instruction")
    return Dockerfile(escape, global_args, stages)


def _stage(inst: Instruction, index: int, names: set[str]) -> Stage:
    args = inst.args
    name = None
    if len(args) == 3 and args[1].upper() == "AS":
        name = args[2].lower()
        if not _STAGE_NAME.match(name):
            raise DockerfileError(f"line {inst.line}: invalid stage name {args[2]!r}")
        if name in names:
            raise DockerfileError(f"line {inst.line}: duplicate stage name {args[2]!r}")
        names.add(name)
    elif len(args) != 1:
        raise DockerfileError(f"line {inst.line}: FROM takes an image and optionally 'AS name'")
    return Stage(index, name, args[0], inst.flags.get("platform"), inst.line)

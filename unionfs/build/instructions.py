"""What each metadata instruction does to an image config, and the variables in scope.

These steps touch no file: ENV, LABEL, EXPOSE, VOLUME, USER, WORKDIR, CMD,
ENTRYPOINT, STOPSIGNAL, HEALTHCHECK, ONBUILD, SHELL, MAINTAINER and ARG change
the config (and the stage's state) and return the history text for their
`empty_layer` entry, in Docker's style (`ENV A=1`, `WORKDIR /app`).

Variables: the build arguments declared so far in the stage, overridden by the
image's Env (ENV always wins over ARG). Global ARGs (before the first FROM) are
visible to FROM lines only, and inside a stage through `ARG NAME` without a
value. `--build-arg` overrides any declared default. The platform arguments
(TARGETARCH and friends) are predefined; the proxy arguments (HTTP_PROXY...)
reach RUN without being declared, and stay out of the history.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..digits import number
from ..errors import UserError
from ..image.platforms import host as host_platform
from .lexer import Lexer
from .parse import DockerfileError, Instruction

PROXY_ARGS = (
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
)
DEFAULT_SHELL = ["/bin/sh", "-c"]
# Instructions whose arguments get variable substitution (Docker's list).
EXPANDED = {
    "ADD",
    "COPY",
    "ENV",
    "EXPOSE",
    "FROM",
    "LABEL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
    "ARG",
}


def platform_args() -> dict[str, str]:
    p = host_platform()
    plat = f"{p['os']}/{p['architecture']}" + (f"/{p['variant']}" if p.get("variant") else "")
    out = {}
    for prefix in ("TARGET", "BUILD"):
        out[prefix + "PLATFORM"] = plat
        out[prefix + "OS"] = p["os"]
        out[prefix + "ARCH"] = p["architecture"]
        out[prefix + "VARIANT"] = p.get("variant", "")
    return out


def _workdir(current: str, path: str) -> str:
    """WORKDIR PATH after WORKDIR CURRENT: an absolute PATH as written (`/app/` stays
    `/app/`), a relative one joined to CURRENT and cleaned, as buildah, Docker and
    BuildKit (`system.NormalizeWorkdir`) record it."""
    if path.startswith("/"):
        return path
    joined = posixpath.normpath(posixpath.join("/", current, path))
    return "/" + joined.lstrip("/")  # Go's path.Clean: one leading slash, never two


def _fail(inst: Instruction, msg: str) -> DockerfileError:
    return DockerfileError(f"line {inst.line}: {inst.cmd}: {msg}")


@dataclass
class Scope:
    """The variables of one stage (or of the global scope before the first FROM)."""

    lexer: Lexer
    build_args: dict[str, str]  # --build-arg
    global_args: dict[str, str]  # values of the ARGs before the first FROM
    args: dict[str, str] = field(default_factory=dict)  # declared here, with a value
    consumed: set[str] = field(default_factory=set)  # build args some ARG declared
    # The Env list last read and its variables (`env_vars`), so that a step does not
    # read the whole Env again: 20,000 ENV lines took minutes, each reading all before.
    _env_list: list[Any] | None = field(default=None, repr=False)
    _env_vars: dict[str, str] = field(default_factory=dict, repr=False)
    _env_seen: int = field(default=0, repr=False)
    _env_index: dict[str, int] = field(default_factory=dict, repr=False)  # last item of a name
    env_set: set[str] = field(default_factory=set)  # names an ENV of this stage set

    def env_vars(self, config: dict[str, Any]) -> dict[str, str]:
        """The config's Env as a dict (the last of a name wins); read again only when
        the config holds another list than the one read before, or that list has grown
        (ENV appends to it: only the new items are read). Not to be changed."""
        env = config.get("Env")
        if not isinstance(env, list):
            env = config["Env"] = list(env or [])
        if env is not self._env_list:
            self._env_list, self._env_vars, self._env_index = env, {}, {}
            self._env_seen = 0
        for i in range(self._env_seen, len(env)):
            k, _, v = str(env[i]).partition("=")
            self._env_vars[k] = v
            self._env_index[k] = i
        self._env_seen = len(env)
        return self._env_vars

    def set_env(self, config: dict[str, Any], key: str, value: str) -> None:
        """ENV KEY=VALUE on `config` (a state of the step's own: its Env list is changed
        in place). As buildah orders them: a name of the base image moves to the end the
        first time the stage sets it; a name the stage set before keeps its place (`ENV
        A=1`, `ENV B=2`, `ENV A=3` is `A=3 B=2`). Only a move rewrites the list."""
        current = self.env_vars(config)
        env = config["Env"]
        item = f"{key}={value}"
        if key in self.env_set and key in current:
            env[self._env_index[key]] = item
            current[key] = value
            return
        self.env_set.add(key)
        if key in current:
            env[:] = [e for e in env if str(e).partition("=")[0] != key]
            self._env_list = None  # read again, from the rewritten list
        env.append(item)

    def variables(self, config: dict[str, Any]) -> Mapping[str, str]:
        """What a word's `$NAME` sees: the image's Env over the ARGs in scope."""
        return ChainMap(self.env_vars(config), self.args)

    def word(self, inst: Instruction, text: str, config: dict[str, Any]) -> str:
        try:
            return self.lexer.word(text, self.variables(config))
        except UserError as e:
            raise _fail(inst, str(e)) from None

    def declare(self, inst: Instruction, config: dict[str, Any], is_global: bool) -> str:
        """ARG NAME[=default] ...: returns the history text, as written (no values from
        --build-arg: those key the steps that use them, and stay out of the history)."""
        for item in inst.args:
            name, eq, default = item.partition("=")
            if not name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise _fail(inst, f"invalid argument name {name!r}")
            value: str | None
            if name in self.build_args:
                value = self.build_args[name]
                self.consumed.add(name)
            elif eq:
                value = self.word(inst, default, config)
            elif not is_global and name in self.global_args:
                value = self.global_args[name]
            elif name in platform_args():
                value = platform_args()[name]
            else:
                value = None
            if value is not None:
                self.args[name] = value
            else:
                self.args.pop(name, None)
        return "ARG " + " ".join(inst.args)

    def run_env(self, config: dict[str, Any]) -> list[str]:
        """Build args RUN sees as environment variables (ENV ones win later)."""
        env = dict(self.args)
        for k in PROXY_ARGS:
            if k in self.build_args:
                env.setdefault(k, self.build_args[k])
                self.consumed.add(k)
        return [f"{k}={v}" for k, v in env.items()]

    def history_args(self) -> str:
        """`|2 A=1 B=2 ` before a RUN's command in its history, as Docker writes it."""
        if not self.args:
            return ""
        items = sorted(f"{k}={v}" for k, v in self.args.items())
        return f"|{len(items)} " + " ".join(items) + " "


@dataclass
class StageState:
    """What a stage carries between steps besides the config."""

    shell: list[str] = field(default_factory=lambda: list(DEFAULT_SHELL))
    cmd_set: bool = False


def _json_or_shell(inst: Instruction, state: StageState) -> list[str]:
    if inst.json:
        return list(inst.args)
    return [*state.shell, " ".join(inst.args)]


def _pairs(inst: Instruction) -> list[tuple[str, str]]:
    a = inst.args
    if len(a) % 2:
        raise _fail(inst, "expects KEY=VALUE pairs")
    return [(a[i], a[i + 1]) for i in range(0, len(a), 2)]


def _ports(inst: Instruction, words: list[str]) -> list[str]:
    out = []
    for w in words:
        spec, _, proto = w.partition("/")
        proto = (proto or "tcp").lower()
        if proto not in ("tcp", "udp", "sctp"):
            raise _fail(inst, f"invalid protocol in {w!r}")
        lo, dash, hi = spec.partition("-")
        start, end = number(lo), number(hi) if dash else number(lo)
        if start is None or end is None or not (0 < start <= end <= 65535):
            raise _fail(inst, f"invalid port {w!r}")
        out.append(f"{spec}/{proto}")  # a range stays one key, as buildah writes it
    return out


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")  # ASCII digits only
MAX_DURATION_NS = (1 << 63) - 1  # Go's time.Duration, an int64 of nanoseconds
_UNIT_NS = {
    "ns": 1,
    "us": 1000,
    "µs": 1000,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


def _duration(inst: Instruction, flag: str, text: str) -> int:
    """A Go duration (`30s`, `1m30s`, `500ms`) in nanoseconds."""
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text or not total <= MAX_DURATION_NS:  # inf: int() raised
        raise _fail(inst, f"--{flag}={text}: not a duration such as 30s")
    return int(total)


def _healthcheck(inst: Instruction) -> dict[str, Any]:
    args = list(inst.args)
    if not args:
        raise _fail(inst, "missing CMD or NONE")
    kind = args[0].upper()
    if kind == "NONE":
        if len(args) > 1 or inst.flags:
            raise _fail(inst, "NONE takes no arguments or flags")
        return {"Test": ["NONE"]}
    if kind != "CMD":
        raise _fail(inst, f"unknown type {args[0]!r} (CMD or NONE)")
    hc: dict[str, Any] = {}
    if inst.json:
        hc["Test"] = ["CMD", *args[1:]]
    else:
        rest = inst.original.split(None, 1)[1] if len(inst.original.split(None, 1)) > 1 else ""
        text = re.sub(r"^(\s*--\S+\s+)*", "", rest)
        text = re.sub(r"^\s*CMD\s*", "", text, flags=re.IGNORECASE)
        hc["Test"] = ["CMD-SHELL", text]
    for flag, key in (
        ("interval", "Interval"),
        ("timeout", "Timeout"),
        ("start-period", "StartPeriod"),
        ("start-interval", "StartInterval"),
    ):
        v = inst.flags.get(flag)
        if v is not None:
            hc[key] = _duration(inst, flag, v)
    if inst.flags.get("retries") is not None:
        retries = number(str(inst.flags["retries"]))
        if retries is None or retries > 2**63 - 1:  # an int in docker's and podman's Go
            raise _fail(inst, "--retries needs a number")
        hc["Retries"] = retries
    return hc


def apply_metadata(
    inst: Instruction, image: dict[str, Any], scope: Scope, state: StageState
) -> str:
    """Apply a metadata instruction to the full image config; returns its history text."""
    cfg = image.setdefault("config", {}) or {}
    image["config"] = cfg
    cmd = inst.cmd
    if cmd == "ENV":
        values = {k: scope.word(inst, v, cfg) for k, v in _pairs(inst)}
        if any(not k for k in values):
            raise _fail(inst, "empty variable name")
        for k, v in values.items():
            scope.set_env(cfg, k, v)
        return "ENV " + " ".join(f"{k}={v}" for k, v in values.items())
    if cmd == "LABEL":
        labels = dict(cfg.get("Labels") or {})
        shown = []
        for k, v in _pairs(inst):
            key, value = scope.word(inst, k, cfg), scope.word(inst, v, cfg)
            if not key:
                raise _fail(inst, "empty label name")
            labels[key] = value
            shown.append(f"{key}={value}")
        cfg["Labels"] = labels
        return "LABEL " + " ".join(shown)
    if cmd == "EXPOSE":
        ports = _ports(inst, [scope.word(inst, a, cfg) for a in inst.args])
        exposed = dict(cfg.get("ExposedPorts") or {})
        for p in ports:
            exposed[p] = {}
        cfg["ExposedPorts"] = exposed
        return "EXPOSE " + " ".join(ports)
    if cmd == "VOLUME":
        vols = dict(cfg.get("Volumes") or {})
        names = [scope.word(inst, a, cfg) for a in inst.args]
        for v in names:
            if not v.strip():
                raise _fail(inst, "empty volume path")
            vols[v] = {}
        cfg["Volumes"] = vols
        return "VOLUME " + json.dumps(names) if inst.json else "VOLUME " + " ".join(names)
    if cmd == "USER":
        if len(inst.args) != 1:
            raise _fail(inst, "takes exactly one argument")
        user = scope.word(inst, inst.args[0], cfg)
        if not user:
            raise _fail(inst, "empty user")
        cfg["User"] = user
        return f"USER {user}"
    if cmd == "WORKDIR":
        if len(inst.args) != 1:
            raise _fail(inst, "takes exactly one argument")
        path = scope.word(inst, inst.args[0], cfg)
        # Only recorded: as in buildah, a RUN creates it (owned by USER), or a COPY into it.
        cfg["WorkingDir"] = _workdir(cfg.get("WorkingDir") or "/", path)
        return f"WORKDIR {cfg['WorkingDir']}"
    if cmd == "CMD":
        cfg["Cmd"] = _json_or_shell(inst, state)
        state.cmd_set = True
        return "CMD " + json.dumps(cfg["Cmd"])
    if cmd == "ENTRYPOINT":
        cfg["Entrypoint"] = _json_or_shell(inst, state)
        if not state.cmd_set:
            cfg["Cmd"] = None  # the base image's CMD no longer applies (Docker, buildah)
        return "ENTRYPOINT " + json.dumps(cfg["Entrypoint"])
    if cmd == "STOPSIGNAL":
        sig = scope.word(inst, inst.args[0], cfg)
        if not re.fullmatch(r"(SIG)?[A-Z0-9+-]+|\d+", sig):
            raise _fail(inst, f"invalid signal {sig!r}")
        cfg["StopSignal"] = sig
        return f"STOPSIGNAL {sig}"
    if cmd == "HEALTHCHECK":
        cfg["Healthcheck"] = _healthcheck(inst)
        return "HEALTHCHECK " + json.dumps(cfg["Healthcheck"], sort_keys=True)
    if cmd == "ONBUILD":
        trigger = inst.original.split(None, 1)[1]
        cfg["OnBuild"] = [*list(cfg.get("OnBuild") or []), trigger]
        return f"ONBUILD {trigger}"
    if cmd == "SHELL":
        if not inst.args:
            raise _fail(inst, 'needs a shell, e.g. ["/bin/bash", "-c"]')
        state.shell = list(inst.args)
        cfg["Shell"] = list(inst.args)
        return "SHELL " + json.dumps(state.shell)
    if cmd == "MAINTAINER":
        author = " ".join(inst.args)
        image["author"] = author
        return "MAINTAINER " + author
    if cmd == "ARG":
        return scope.declare(inst, cfg, is_global=False)
    raise _fail(inst, "not a metadata instruction")

"""Running a Containerfile: stages, steps, the cache, and the image at the end.

Each stage starts from an image of the store, `scratch` or an earlier stage,
and carries an image state (full config plus layer descriptors) from step to
step. A metadata step changes the config and adds an `empty_layer` history
entry. A RUN, COPY or ADD step gets a fresh upper directory under the store's
tmp/ over the state's layers:

- RUN forks a child that calls `run.run` with that upper (the command gets the
  image's Env, WorkingDir and User, the build args in scope, and everything
  `pyunion run` confines a container with), so the build process's own mount
  namespace and signal handlers never change;
- COPY/ADD mount the layers plus the upper with pyunion as a detached mount
  (in no namespace: the build never copies the host's, so it holds none of the
  host's mounts) and write through the merged tree by its fd (`copier.py`), so
  the destination resolves as the container sees it;

then the upper is committed as one layer (`layer.py`), an empty one when nothing
changed, as buildah records it. History entries and output lines are buildah's
(docs/build.md). Every step first looks in the cache
(`cache.py`); a hit takes the stored state and does no work. Only stages the
target needs are built. With `--layers=false`/`--squash` each stage runs all
its steps on one upper and commits one layer at its end, without the cache, its
state changed in place (no copy, ID or key a step: those cost the whole history).

A failing step stops the build with the step, the command and its exit status;
its upper is thrown away, and nothing but complete layers and cache entries of
the steps before it is left in the store.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import posixpath
import signal
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .. import userns
from ..digits import number
from ..errors import UserError, printable
from ..image.platforms import host as host_platform
from ..image.reference import normalize_local
from ..image.store import Store, bare_id, normalize_tag, short_id
from ..sandbox import DEFAULT_PATH, wait_exit_code
from ..syscalls import fd_str
from ..tree import NotRegularFile, UntrustedSymlink, open_trusted, read_named, read_regular
from .cache import BuildCache, step_key
from .copier import (
    CopyError,
    CopySpec,
    Root,
    copy_sources,
    extract_archive,
    open_archive,
    parse_chmod,
    resolve_owner,
)
from .ignore import IGNORE_FILES, Matcher, read_ignore_file
from .instructions import EXPANDED, Scope, StageState, apply_metadata, platform_args
from .layer import NewLayer, commit_upper, config_digest, is_empty, prune_upper, write_image
from .lexer import Lexer
from .parse import Dockerfile, DockerfileError, Instruction, Stage, parse, parse_commands
from .sources import Source, SourceTree

if TYPE_CHECKING:
    from ..tree import Resolve

MAX_DOCKERFILE = 16 << 20
LAYER_STEPS = ("RUN", "COPY", "ADD")


def _read_context_file(path: str, limit: int, resolve: Resolve = "beneath") -> bytes | None:
    """A Containerfile or ignore file of the context (None if missing): a regular file
    (a FIFO put there would hang the build), at most `limit` bytes; no symlink unless
    `resolve` is "trusted" (a Containerfile may be one, as for buildah, but not another
    user's: her context's Containerfile -> /etc/shadow showed its first line in the
    error). The directory is reached as the context is (`tree.open_trusted`)."""
    parent, name = os.path.split(path)
    try:
        dfd = open_trusted(parent or ".")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    try:
        return read_regular(dfd, name, limit, resolve=resolve)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except NotRegularFile as e:
        raise UserError(f"cannot read {path}: it {e.strerror}") from None
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise UserError(f"{path} is larger than {limit >> 20} MiB") from None
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(dfd)


class BuildError(UserError):
    """The build stopped at a step."""


class StepFailed(BuildError):
    """A RUN's command failed: the build exits with the command's status (`code`), as
    `buildah bud`, `podman build` and `docker build` do; any other error exits 125
    (`cli.py`)."""

    command_status = True


@dataclass
class BuildOptions:
    context: str
    file: str | None = None  # path, "-" for stdin, None: look in the context
    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    layers: bool = True  # False: one new layer per stage (--squash)
    store: str | None = None
    quiet: bool = False
    # RUN's, unless it says --network: the host's, since buildah's and BuildKit's default
    # (a private namespace with a NAT'ed connection) is one pyunion cannot make.
    network: str = "host"
    labels: dict[str, str] = field(default_factory=dict)  # --label: on the image built
    ignorefile: str | None = None  # --ignorefile: instead of the context's


@dataclass
class ImageState:
    config: dict[str, Any]
    layers: list[dict[str, Any]]  # descriptors, bottom first, one per diff_id

    @property
    def id(self) -> str:
        return config_digest(self.config)

    @property
    def cache_id(self) -> str:
        """What keys the steps after this state: its ID without the times of day. A step
        run again (--no-cache, or by two stages that share it) makes the same state at
        another time, and the steps after it keep their entries, as buildah's cache
        compares layers and history text, not times. The `comment` goes too: it names
        the image before, whose ID has the times in it."""
        cfg = dict(self.config)
        cfg.pop("created", None)
        cfg["history"] = [
            {k: v for k, v in h.items() if k not in ("created", "comment")}
            if isinstance(h, dict)
            else h
            for h in cfg.get("history") or []
        ]
        return config_digest(cfg)

    @property
    def diff_ids(self) -> list[str]:
        return list((self.config.get("rootfs") or {}).get("diff_ids") or [])

    def copy(self) -> ImageState:
        return ImageState(copy.deepcopy(self.config), copy.deepcopy(self.layers))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def scratch_state() -> ImageState:
    """`FROM scratch`: no layers, and PATH in the config, as buildah and BuildKit set it."""
    plat = host_platform()
    cfg: dict[str, Any] = {
        "architecture": plat["architecture"],
        "os": plat["os"],
        "config": {"Env": [f"PATH={DEFAULT_PATH}"]},
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [],
    }
    if plat.get("variant"):
        cfg["variant"] = plat["variant"]
    return ImageState(cfg, [])


def check_platform(want: str, where: str = "") -> None:
    """`--platform=WANT` (of FROM or of the build): this machine's only."""
    p = host_platform()
    if not want.startswith(f"{p['os']}/{p['architecture']}"):
        raise BuildError(
            f"{where}--platform={want}: only this machine's platform "
            f"({p['os']}/{p['architecture']}) is built"
        )


def _is_url(src: str) -> bool:
    return src.startswith(("http://", "https://", "git://", "git@"))


@dataclass
class _Stage:
    """A stage being built."""

    stage: Stage
    scope: Scope
    state: StageState
    image: ImageState
    squash_upper: str | None = None  # --squash: the one upper every step writes to
    base_lowers: list[str] = field(default_factory=list)
    # What the next step's history `comment` names as its parent, as buildah writes it:
    # `FROM localhost/busybox:latest` for the stage's first step, `FROM <12 hex of the
    # image before>` after (a stage's image too); none on `FROM scratch`'s first step.
    parent: str = ""
    base_name: str = ""  # the parent of its first step: what --squash's one comment names
    base_history: int = 0  # the base image's history entries


class Builder:
    def __init__(self, opts: BuildOptions) -> None:
        self.opts = opts
        self.store = Store(opts.store)
        self.cache = BuildCache(self.store)
        self.out = sys.stdout
        self.tmp = ""
        self.empty_layer_dir = ""
        self.context: SourceTree | None = None
        self.stages_done: dict[int, ImageState] = {}
        self.step_no = 0
        self.total = 0
        self.prefix = ""
        self.stage_names: dict[str, int] = {}

    # --- output ------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A line of progress; a step's text (a Containerfile's, an ONBUILD trigger's: someone
        else's) is shown escaped, each line of a heredoc step on a line of its own."""
        if not self.opts.quiet:
            self.out.write("\n".join(printable(line) for line in text.split("\n")) + "\n")
            self.out.flush()

    # --- inputs --------------------------------------------------------------------
    def _read_dockerfile(self) -> tuple[str, str | None]:
        """The Containerfile's text and its path (None for stdin)."""
        ctx = self.opts.context
        f = self.opts.file
        if f == "-":
            return sys.stdin.read(MAX_DOCKERFILE), None
        if f is None:
            for name in ("Containerfile", "Dockerfile"):
                data = _read_context_file(os.path.join(ctx, name), MAX_DOCKERFILE, "trusted")
                if data is not None:
                    f = os.path.join(ctx, name)
                    break
            else:
                raise UserError(f"no Containerfile or Dockerfile in {ctx} (use -f FILE)")
        else:  # named by the caller: a pipe (-f <(...)) is fine, the read is bounded
            try:  # no symlink of another user's, no FIFO of hers (`tree.read_named`)
                try:
                    data = read_named(f, MAX_DOCKERFILE + 1)
                except FileNotFoundError:
                    # Relative and not here: in the context, as buildah looks for it.
                    if os.path.isabs(f):
                        raise
                    in_context = os.path.join(ctx, f)
                    data = read_named(in_context, MAX_DOCKERFILE + 1)
                    f = in_context
            except OSError as e:
                raise UserError(f"cannot read {f}: {e.strerror}") from None
            if len(data) > MAX_DOCKERFILE:
                raise UserError(f"{f} is larger than {MAX_DOCKERFILE >> 20} MiB")
        try:
            return data.decode("utf-8"), f
        except UnicodeDecodeError:
            raise UserError(f"{f} is not valid UTF-8") from None

    def _matcher(self, dockerfile: str | None) -> Matcher | None:
        if self.opts.ignorefile is not None:
            f = self.opts.ignorefile
            try:  # named by the caller, as -f: no symlink or FIFO of another user's
                rules = read_named(f, MAX_DOCKERFILE + 1)
            except OSError as e:
                raise UserError(f"--ignorefile {f}: {e.strerror}") from None
            if len(rules) > MAX_DOCKERFILE:
                raise UserError(f"--ignorefile {f}: larger than {MAX_DOCKERFILE >> 20} MiB")
            return read_ignore_file(rules, f)
        candidates = []
        if dockerfile is not None:
            candidates += [dockerfile + ".containerignore", dockerfile + ".dockerignore"]
        candidates += [os.path.join(self.opts.context, n) for n in IGNORE_FILES]
        for path in candidates:
            data = _read_context_file(path, MAX_DOCKERFILE)
            if data is not None:
                return read_ignore_file(data, os.path.basename(path))
        return None

    # --- the build ---------------------------------------------------------------------
    def build(self) -> str:
        """Build; returns the image ID."""
        # An ordinary user builds as root of their user namespace, as rootless buildah does
        # (the CLI enters it before anything starts a thread).
        userns.enter_rootless()
        try:  # as SourceTree and the Containerfile's read resolve it: no symlink of hers
            os.close(open_trusted(os.path.abspath(self.opts.context)))
        except UntrustedSymlink as e:
            raise UserError(f"the build context {self.opts.context!r} {e.strerror}") from None
        except OSError:
            raise UserError(f"the build context {self.opts.context!r} is not a directory") from None
        tags = [normalize_tag(t) for t in self.opts.tags]
        text, path = self._read_dockerfile()
        df = parse(text)
        matcher = self._matcher(path)
        lexer = Lexer(df.escape)
        global_scope = Scope(lexer, self.opts.build_args, {})
        for inst in df.global_args:
            global_scope.declare(inst, {}, is_global=True)
        for k, v in platform_args().items():
            global_scope.args.setdefault(k, v)
        stages = self._needed(df, global_scope)
        self.total = df.step_count(stages)
        started = time.monotonic()
        self.context = SourceTree(
            os.path.abspath(self.opts.context), matcher, "the build context", user_path=True
        )
        consumed: set[str] = set(global_scope.consumed)
        try:
            with self.store.using(), self.store.tempdir() as tmp:
                self.tmp = tmp
                self.empty_layer_dir = os.path.join(tmp, "empty")
                os.mkdir(self.empty_layer_dir, 0o755)
                final: ImageState | None = None
                for st in stages:
                    scope = Scope(lexer, self.opts.build_args, dict(global_scope.args))
                    final = self._build_stage(df, st, scope, global_scope, last=st is stages[-1])
                    consumed |= scope.consumed
                    self.stages_done[st.index] = final
                assert final is not None
                if tags:
                    self.say(f"COMMIT {' '.join(self.opts.tags)}")
                _, cdigest = write_image(self.store, final.config, final.layers, tags, tmp)
        finally:
            self.context.close()
        unused = sorted(set(self.opts.build_args) - consumed)
        if unused:
            print(
                f"pyunion: warning: build args not used by any ARG: {', '.join(unused)}",
                file=sys.stderr,
            )
        self.say(f"--> {short_id(cdigest)} (built in {time.monotonic() - started:.2f}s)")
        for t in tags:  # buildah's line and name (`localhost/` for a name without registry)
            self.say(f"Successfully tagged {normalize_local(t)}")
        return cdigest

    def _needed(self, df: Dockerfile, global_scope: Scope) -> list[Stage]:
        """The target stage and the stages it depends on, in file order."""
        by_name = {s.name: s for s in df.stages if s.name}
        self.stage_names = {n: s.index for n, s in by_name.items()}
        if self.opts.target is not None:
            # By its name, else by its index (`--target 0`), as buildah takes both.
            idx = self._stage_index(self.opts.target)
            if idx is None or idx >= len(df.stages):
                raise UserError(f"no stage named {self.opts.target!r} in the Containerfile")
            t = df.stages[idx]
        else:
            t = df.stages[-1]
        need: set[int] = set()
        todo = [t]
        while todo:
            s = todo.pop()
            if s.index in need:
                continue
            need.add(s.index)
            refs = [self._expand_global(s.base, global_scope)]
            for inst in s.instructions:
                if inst.cmd == "COPY" and inst.flags.get("from"):
                    refs.append(self._expand_global(str(inst.flags["from"]), global_scope))
            for ref in refs:
                dep = self._stage_ref(df, ref, s.index)
                if dep is not None:
                    todo.append(dep)
        return [s for s in df.stages if s.index in need]

    @staticmethod
    def _expand_global(text: str, scope: Scope) -> str:
        try:
            return scope.lexer.word(text, scope.args)
        except UserError:
            return text

    def _stage_index(self, ref: str) -> int | None:
        """The stage `ref` names: by its name, else by its index (ASCII digits only)."""
        idx = self.stage_names.get(ref.lower())
        return idx if idx is not None else number(ref)

    def _stage_ref(self, df: Dockerfile, ref: str, before: int) -> Stage | None:
        """An earlier stage named by `ref` (its name or its index), or None."""
        idx = self._stage_index(ref)
        if idx is None:
            return None
        if idx >= before:
            if ref.lower() not in self.stage_names:
                raise UserError(f"stage {ref} used before it is defined")
            return None  # a later stage of that name cannot be used: then it is an image
        return df.stages[idx]

    # --- one stage -----------------------------------------------------------------------------
    def _next_step(self, text: str) -> str:
        self.step_no += 1
        label = f"{self.prefix}STEP {self.step_no}/{self.total}: {text}"
        self.say(label)
        return label

    def _build_stage(
        self, df: Dockerfile, stage: Stage, scope: Scope, global_scope: Scope, last: bool
    ) -> ImageState:
        self.prefix = f"[{stage.index + 1}/{len(df.stages)}] " if len(df.stages) > 1 else ""
        base_ref = self._expand_global(stage.base, global_scope)
        self._next_step(f"FROM {base_ref}" + (f" AS {stage.name}" if stage.name else ""))
        if stage.platform:
            want = self._expand_global(stage.platform, global_scope)
            check_platform(want, f"line {stage.line}: FROM ")
        image = self._base(df, base_ref, stage)
        parent = self._parent_name(df, base_ref, stage)
        st = _Stage(stage, scope, StageState(), image, parent=parent, base_name=parent)
        st.base_history = len(image.config.get("history") or [])
        shell = (image.config.get("config") or {}).get("Shell")
        if isinstance(shell, list) and shell and all(isinstance(x, str) for x in shell):
            st.state.shell = list(shell)
        triggers = [str(t) for t in (image.config.get("config") or {}).get("OnBuild") or []]
        if triggers:
            (image.config.get("config") or {}).pop("OnBuild", None)
        if not self.opts.layers:
            st.squash_upper = self._new_upper()
            st.base_lowers = self._lowers(image)
        try:
            for text in triggers:
                for inst in parse_commands(text, stage.line):
                    self.say(f"{self.prefix}ONBUILD {inst.original}")
                    self._step(st, inst, numbered=False)
            for inst in stage.instructions:
                self._step(st, inst)
            if last:
                for key, value in self.opts.labels.items():
                    self._cli_label(st, key, value)
            if st.squash_upper is not None:
                self._finish_squash(st)
        finally:
            if st.squash_upper is not None and os.path.exists(st.squash_upper):
                self._remove(st.squash_upper)
        return st.image

    def _base(self, df: Dockerfile, ref: str, stage: Stage) -> ImageState:
        if ref.lower() == "scratch":
            return scratch_state()
        dep = self._stage_ref(df, ref, stage.index)
        if dep is not None:
            return self.stages_done[dep.index].copy()
        try:
            img = self.store.lookup(ref)
        except UserError:
            raise BuildError(
                f"line {stage.line}: FROM {ref}: no such image in the store "
                f"{self.store.root} (pyunion build does not pull: get it with "
                "'pyunion pull' or 'pyunion image import')"
            ) from None
        layers = [dict(d) for d in img.manifest.get("layers", [])]
        state = ImageState(copy.deepcopy(img.config), layers)
        if len(state.diff_ids) != len(layers):
            raise BuildError(f"image {ref!r}: its config and manifest list different layers")
        for d in state.diff_ids:
            if not self.store.has_layer(d):
                raise BuildError(f"image {ref!r}: layer {d} is missing from the store")
        return state

    def _parent_name(self, df: Dockerfile, ref: str, stage: Stage) -> str:
        """The parent the first step's history `comment` names (see `_Stage.parent`)."""
        if ref.lower() == "scratch":
            return ""
        dep = self._stage_ref(df, ref, stage.index)
        if dep is not None:
            return short_id(self.stages_done[dep.index].id)
        try:
            return normalize_local(ref)
        except UserError:
            return ref

    def _lowers(self, image: ImageState) -> list[str]:
        dirs = self.store.lower_dirs(image.diff_ids)
        return dirs or [self.empty_layer_dir]

    # --- one step ----------------------------------------------------------------------------
    def _step(self, st: _Stage, inst: Instruction, numbered: bool = True) -> None:
        if numbered:
            self._next_step(
                inst.original.split("\n", 1)[0] if not inst.heredocs else inst.original.rstrip("\n")
            )
        t0 = time.monotonic()
        cfg = st.image.config.setdefault("config", {}) or {}
        st.image.config["config"] = cfg
        if inst.cmd in LAYER_STEPS:
            self._layer_step(st, inst, t0)
            return
        if inst.cmd in ("FROM",):
            raise BuildError(f"line {inst.line}: FROM inside a stage")
        new = self._next_state(st)
        # The key takes what the step did (values substituted); the history, buildah's text.
        effect = apply_metadata(inst, new.config, st.scope, st.state)
        shown = "ARG " + " ".join(sorted(st.scope.args)) if inst.cmd == "ARG" else inst.original
        key = self._key(st, "meta", inst.cmd, effect, st.state.cmd_set, st.state.shell, shown)
        self._finish(st, new, key, NOP + shown, False, t0)

    def _cli_label(self, st: _Stage, key: str, value: str) -> None:
        """`--label KEY=VALUE`: a LABEL step after the last instruction (no substitution),
        with its history entry, as buildah adds it."""
        t0 = time.monotonic()
        new = self._next_state(st)
        cfg = new.config.setdefault("config", {}) or {}
        new.config["config"] = cfg
        cfg["Labels"] = {**(cfg.get("Labels") or {}), key: value}
        created_by = f'{NOP}LABEL "{key}"="{value}"'
        self._finish(st, new, self._key(st, "--label", key, value), created_by, False, t0)

    def _next_state(self, st: _Stage) -> ImageState:
        """The state a step changes: a copy, since the one before is cached (or a cache
        hit's); with --layers=false/--squash, the stage's own, changed in place (copying
        it made each step cost as much as the history before it)."""
        return st.image if st.squash_upper is not None else st.image.copy()

    def _key(self, st: _Stage, *parts: Any) -> str:
        """A step's cache key: the state before it and `parts`; none with --layers=false
        or --squash, which use no cache (the state's digest is over the whole history)."""
        return "" if st.squash_upper is not None else step_key(st.image.cache_id, *parts)

    def _finish(
        self,
        st: _Stage,
        new: ImageState,
        key: str,
        created_by: str,
        layer: NewLayer | bool | None,
        t0: float,
    ) -> None:
        """Record the step: the cached state, or the new one with its history entry.

        `layer` is a NewLayer, None for an empty change, or False for a metadata step.
        """
        cached = None if layer is not False or st.squash_upper is not None else self._cached(key)
        if cached is not None:
            self._hit(st, ImageState(cached[0], cached[1]))
            return
        now = _now()
        entry: dict[str, Any] = {"created": now, "created_by": created_by}
        if st.parent and st.squash_upper is None:  # --squash: one, at the end (`_finish_squash`)
            entry["comment"] = f"FROM {st.parent}"
        if not isinstance(layer, NewLayer):
            entry["empty_layer"] = True
        else:
            new.config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
            new.config["rootfs"].setdefault("diff_ids", []).append(layer.diff_id)
            new.layers.append(layer.descriptor())
        # `new` is a copy or the stage's own (`_next_state`): its history is its own.
        history = new.config.get("history")
        if not isinstance(history, list):
            history = new.config["history"] = list(history or [])
        history.append(entry)
        new.config["created"] = now
        for k in ("container", "container_config"):
            new.config.pop(k, None)
        st.image = new
        if st.squash_upper is not None:  # no ID: one would be a digest of the whole history
            self.say(f"--> {time.monotonic() - t0:.2f}s")
            return
        st.parent = short_id(new.id)
        self._put(key, new)
        self.say(f"--> {short_id(new.id)} {time.monotonic() - t0:.2f}s")

    def _hit(self, st: _Stage, state: ImageState) -> None:
        """A step found in the cache: buildah's line, which scripts look for."""
        st.image = state
        st.parent = short_id(state.id)
        self.say(f"--> Using cache {bare_id(state.id)}")

    def _cached(self, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        return None if self.opts.no_cache else self.cache.get(key)

    def _put(self, key: str, state: ImageState) -> None:
        self.cache.put(key, state.config, state.layers)

    def _layer_step(self, st: _Stage, inst: Instruction, t0: float) -> None:
        plan: _CopyPlan | None = None
        if inst.cmd == "RUN":
            argv, created_by, env = self._run_spec(st, inst)
            network = self._run_network(inst)
            # The host's network keeps the key it always had; another mode is a step of its own.
            net_part = [] if network == "host" else [{"network": network}]
            key = self._key(st, "RUN", argv, sorted(env), created_by, *net_part)

            def work(upper: str, lowers: list[str]) -> None:
                self._run(st, argv, env, upper, lowers, inst, network)
        else:
            plan = copy_plan = self._copy_plan(st, inst)
            created_by, key = plan.created_by, plan.key

            def work(upper: str, lowers: list[str]) -> None:
                self._copy(st, copy_plan, upper, lowers)

        # A `COPY --from` step is found by its stage's image ID (no mount needed) or else
        # by the content it copies (the stage mounted once, for the key and the copy);
        # what it makes is kept under both keys.
        aliases: list[str] = []
        with contextlib.ExitStack() as stack:
            if st.squash_upper is None:
                cached = self._cached(key)
                if cached is None and plan is not None and plan.from_state is not None:
                    plan.from_sources = self._from_sources(stack, plan)
                    aliases.append(self._from_content_key(st, plan, *plan.from_sources))
                    cached = self._cached(aliases[0])
                    if cached is not None:
                        self.cache.put(key, *cached)
                if cached is not None:
                    self._hit(st, ImageState(cached[0], cached[1]))
                    return
                if plan is not None and plan.from_sources is not None:
                    tree, sources = plan.from_sources
                    plan.created_by = _copy_history(inst, plan.multi, sources, tree.digest(sources))
                    created_by = plan.created_by
            if st.squash_upper is not None:
                work(st.squash_upper, st.base_lowers)
                self._finish(st, st.image, key, created_by, None, t0)
                return
            lowers = self._lowers(st.image)
            upper = self._new_upper()
            try:
                work(upper, lowers)
                prune_upper(upper, lowers if st.image.diff_ids else [])
                # Every RUN, COPY and ADD has its layer, empty or not, as in buildah's image.
                layer = commit_upper(self.store, upper, self.tmp)
            finally:
                if os.path.exists(upper):
                    self._remove(upper)
                self._remove(upper + ".work")
        self._finish(st, st.image.copy(), key, created_by, layer, t0)
        for alias in aliases:
            self._put(alias, st.image)

    def _finish_squash(self, st: _Stage) -> None:
        upper = st.squash_upper
        assert upper is not None
        hist = st.image.config.get("history") or []
        if len(hist) > st.base_history and st.base_name:
            # The one comment, on the stage's last entry: its base, as `buildah bud
            # --layers=false` writes it.
            hist[-1]["comment"] = f"FROM {st.base_name}"
        prune_upper(upper, st.base_lowers if st.image.diff_ids else [])
        if is_empty(upper):
            return
        layer = commit_upper(self.store, upper, self.tmp)
        st.image.config["rootfs"]["diff_ids"].append(layer.diff_id)
        st.image.layers.append(layer.descriptor())
        if len(hist) > st.base_history:
            hist[-1].pop("empty_layer", None)

    def _new_upper(self) -> str:
        upper = os.path.join(self.tmp, "upper-" + os.urandom(6).hex())
        os.mkdir(upper, 0o755)
        os.mkdir(os.path.join(self.tmp, "." + os.path.basename(upper) + ".work"), 0o700)
        return upper

    def _remove(self, path: str) -> None:
        from ..tree import rmtree

        with contextlib.suppress(OSError):
            rmtree(path)
        work = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".work")
        with contextlib.suppress(OSError):
            rmtree(work)

    # --- RUN -------------------------------------------------------------------------------------
    def _run_spec(self, st: _Stage, inst: Instruction) -> tuple[list[str], str, list[str]]:
        """(argv, history text, build-arg environment) of a RUN."""
        shell = st.state.shell
        if inst.json:
            argv = list(inst.args)
        elif inst.heredocs:
            argv = [*shell, _heredoc_script(inst)]
        else:
            argv = [*shell, " ".join(inst.args)]
        if not argv:
            raise BuildError(f"line {inst.line}: RUN needs a command")
        env = st.scope.run_env(st.image.config["config"])
        # buildah's text: the line as written after `RUN `, behind `/bin/sh -c` whatever
        # the SHELL or form, and the build args in scope.
        return argv, st.scope.history_args() + "/bin/sh -c " + inst.original[4:], env

    def _run_network(self, inst: Instruction) -> str:
        """RUN --network= (checked by the parser), `default` being the build's --network."""
        mode = inst.flags.get("network") or "default"
        return self.opts.network if mode == "default" else mode

    def _run(
        self,
        st: _Stage,
        argv: list[str],
        env: list[str],
        upper: str,
        lowers: list[str],
        inst: Instruction,
        network: str,
    ) -> None:
        from ..run import RunOptions, run

        cfg = st.image.config["config"]
        image_env = [str(e) for e in cfg.get("Env") or []]
        opts = RunOptions(
            layers=lowers,
            command=argv,
            env=env + image_env,
            # Cleaned as buildah cleans it for RUN: `WORKDIR /a/b/../c` (kept as written in
            # the config) makes and enters /a/c, no /a/b.
            workdir=posixpath.normpath(cfg["WorkingDir"]) if cfg.get("WorkingDir") else None,
            make_workdir=True,  # buildah makes WORKDIR
            # Named, as buildah names root: its primary group is then among the
            # supplementary ones (podman's run leaves it out for a default user).
            user=cfg.get("User") or "0",
            upper=upper,
            network=network,
            quiet=True,
            term=None,  # buildah's RUN has no TERM
        )
        self.out.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 125
            try:
                code = run(opts)
            except UserError as e:
                print(f"pyunion: {printable(e)}", file=sys.stderr)
                code = e.code
            except BaseException as e:  # noqa: BLE001 - a forked child never returns
                print(f"pyunion: RUN failed: {e!r}", file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        code = _wait_child(pid)
        if code != 0:
            what = (
                "could not run the command"
                if code == 125
                else f"the command exited with status {code}"
            )
            if code > 128 and code != 255:
                what = f"the command was killed by signal {code - 128}"
            raise StepFailed(
                f"building at STEP {self.step_no}/{self.total}: "
                f"{inst.original.splitlines()[0]}: {what}",
                code,
            )

    # --- COPY and ADD ------------------------------------------------------------------------
    def _copy_plan(self, st: _Stage, inst: Instruction) -> _CopyPlan:
        cfg = st.image.config["config"]
        scope = st.scope
        assert inst.cmd in EXPANDED

        def word(w: str) -> str:
            return scope.word(inst, w, cfg)

        flags = {k: (word(v) if v is not None else None) for k, v in inst.flags.items()}
        args = list(inst.args)
        dest_raw = args[-1]
        srcs = args[:-1]
        heredocs = {h.name: h for h in inst.heredocs}
        dest = word(dest_raw)
        if not dest:
            raise BuildError(f"line {inst.line}: {inst.cmd}: empty destination")
        workdir = cfg.get("WorkingDir") or "/"
        dest_is_dir = dest.endswith(("/", "/.")) or dest in (".", "..")
        dest_abs = posixpath.normpath(posixpath.join(workdir, dest))
        plan = _CopyPlan(inst, dest_abs, dest_is_dir, flags)
        from_ref = flags.get("from")
        for s in srcs:
            name = _heredoc_name(s)
            if name is not None and name in heredocs:
                h = heredocs[name]
                content = scope.word(inst, h.content, cfg) if h.expand else h.content
                plan.heredocs.append((_heredoc_file_name(name, inst), content))
                continue
            value = word(s)
            if _is_url(value):
                raise BuildError(
                    f"line {inst.line}: {inst.cmd} {value}: remote sources need "
                    "a network, which pyunion build does not use; download it "
                    "and COPY the file"
                )
            plan.patterns.append(value)
        count = len(plan.patterns) + len(plan.heredocs)
        if from_ref is not None:
            src_state = self._from_state(from_ref, inst)
            plan.from_state = src_state
            plan.key = self._key(
                st,
                inst.cmd,
                flags,
                plan.patterns,
                dest_abs,
                dest_is_dir,
                src_state.cache_id,
                dest_raw,  # the history's text
            )
            plan.multi = count > 1
            # Until the stage is mounted (a cache miss): the digest is of what it copies.
            plan.created_by = (
                f"{NOP}{inst.cmd} --from={from_ref} {' '.join(plan.patterns)} in {dest_raw} "
            )
            return plan
        assert self.context is not None
        sources: list[Source] = []
        # A pattern matching nothing is an error only when nothing else is copied
        # (buildah's rule; a missing plain name still fails when it is read).
        expanded = [(p, self.context.expand(p)) for p in plan.patterns]
        if not plan.heredocs and not any(m for _, m in expanded):
            p = next((p for p, m in expanded if not m), "")
            raise BuildError(
                f"line {inst.line}: {inst.cmd}: no source files match {p!r} in the build context"
            )
        for _, matched in expanded:
            for m in matched:
                try:
                    sources.append(self.context.source(m))
                except UserError as e:
                    raise BuildError(f"line {inst.line}: {inst.cmd}: {e}") from None
        plan.sources = sources
        plan.multi = len(sources) + len(plan.heredocs) > 1
        digest = self.context.digest(sources)
        if plan.heredocs:
            digest = step_key(digest, plan.heredocs)
        plan.created_by = _copy_history(inst, plan.multi, sources, digest)
        plan.key = self._key(
            st,
            inst.cmd,
            flags,
            digest,
            dest_abs,
            dest_is_dir,
            [s.name for s in sources],
            dest_raw,  # the history's text
        )
        return plan

    def _from_state(self, ref: str, inst: Instruction) -> ImageState:
        idx = self._stage_index(ref)
        if idx is not None and idx in self.stages_done:
            return self.stages_done[idx]
        try:
            img = self.store.lookup(ref)
        except UserError:
            raise BuildError(
                f"line {inst.line}: COPY --from={ref}: no such stage, and no such "
                "image in the store"
            ) from None
        return ImageState(img.config, [dict(d) for d in img.manifest.get("layers", [])])

    def _copy(self, st: _Stage, plan: _CopyPlan, upper: str, lowers: list[str]) -> None:
        inst = plan.inst
        with contextlib.ExitStack() as stack:
            mnt = stack.enter_context(self._mounted(lowers, upper))
            root = Root(mnt)
            stack.callback(root.close)
            spec = CopySpec()
            try:
                if plan.flags.get("chown"):
                    spec.chown = resolve_owner(root.fd, str(plan.flags["chown"]))
                if plan.flags.get("chmod"):
                    spec.chmod = parse_chmod(str(plan.flags["chmod"]))
                existing = root.lookup(plan.dest)
                dest_is_dir = plan.dest_is_dir or (
                    existing is not None and (existing.st_mode & 0o170000) == 0o040000
                )
                if plan.multi and not dest_is_dir:
                    raise BuildError(
                        f"line {inst.line}: {inst.cmd} with more than one source "
                        "needs a destination directory ending in '/'"
                    )
                tree = self.context
                sources = plan.sources
                if plan.from_state is not None:
                    tree, sources = plan.from_sources or self._from_sources(stack, plan)
                    spec.keep_owner = True
                    if len(sources) > 1 and not dest_is_dir:
                        raise BuildError(
                            f"line {inst.line}: COPY with more than one source "
                            "needs a destination directory ending in '/'"
                        )
                assert tree is not None
                if inst.cmd == "ADD":
                    rest = []
                    for s in sources:
                        # Only a regular file may be an archive: a FIFO is copied as one.
                        regular = not s.is_dir and stat.S_ISREG(s.entries[0].st.st_mode)
                        if regular and self._add_archive(root, tree, s, plan, spec):
                            continue
                        rest.append(s)
                    sources = rest
                copy_sources(root, tree, sources, plan.dest, spec, dest_is_dir)
                if plan.heredocs:
                    self._copy_heredocs(root, plan, spec, dest_is_dir)
            except CopyError as e:
                raise BuildError(f"line {inst.line}: {inst.cmd}: {e}") from None

    def _from_sources(
        self, stack: contextlib.ExitStack, plan: _CopyPlan
    ) -> tuple[SourceTree, list[Source]]:
        """The tree of a `COPY --from` stage or image, mounted read-only for as long as
        `stack` lasts, and the sources its patterns match there."""
        assert plan.from_state is not None
        src_mnt = stack.enter_context(self._mounted(self._lowers(plan.from_state), None))
        tree = SourceTree(src_mnt, None, f"--from={plan.flags['from']}")
        stack.callback(tree.close)
        sources = []
        for p in plan.patterns:
            matched = tree.expand(p)
            if not matched:
                raise BuildError(f"line {plan.inst.line}: COPY --from: no files match {p!r}")
            sources += [tree.source(m) for m in matched]
        return tree, sources

    def _from_content_key(
        self, st: _Stage, plan: _CopyPlan, tree: SourceTree, sources: list[Source]
    ) -> str:
        """The key of a `COPY --from` step by what it copies (names, modes, owners, bytes),
        as buildah and BuildKit key it: a stage that changed elsewhere (a source file the
        step does not copy) still hits."""
        digest = tree.digest(sources)
        return step_key(
            st.image.cache_id,
            plan.inst.cmd,
            plan.flags,
            plan.patterns,
            plan.dest,
            plan.dest_is_dir,
            {"from-content": digest},
            [s.name for s in sources],
            plan.inst.args[-1],  # the history's text
        )

    def _add_archive(
        self, root: Root, tree: SourceTree, src: Source, plan: _CopyPlan, spec: CopySpec
    ) -> bool:
        try:
            fd = tree.open_file(src.entries[0])
        except OSError as e:
            raise CopyError(f"cannot read {src.name!r}: {e.strerror}") from None
        try:
            with open_archive(fd) as archive:
                if archive is None:
                    return False
                extract_archive(root, archive, plan.dest, spec, src.name)
                return True
        finally:
            os.close(fd)

    def _copy_heredocs(
        self, root: Root, plan: _CopyPlan, spec: CopySpec, dest_is_dir: bool
    ) -> None:
        """Each heredoc is written as a file named by its index (never by its name, which
        the Containerfile chose), then copied under its name in the image."""
        hd = os.path.join(self.tmp, "heredoc-" + os.urandom(6).hex())
        os.mkdir(hd, 0o700)
        try:
            dfd = os.open(hd, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                for i, (_, content) in enumerate(plan.heredocs):
                    fd = os.open(
                        str(i),
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o644,
                        dir_fd=dfd,
                    )
                    with os.fdopen(fd, "wb") as f:
                        f.write(content.encode("utf-8", "surrogateescape"))
                        os.fchmod(f.fileno(), 0o644)
            finally:
                os.close(dfd)
            tree = SourceTree(hd, None, "the heredoc")
            try:
                srcs = []
                for i, (name, _) in enumerate(plan.heredocs):
                    src = tree.source(str(i))
                    src.name = name
                    srcs.append(src)
                copy_sources(root, tree, srcs, plan.dest, spec, dest_is_dir)
            finally:
                tree.close()
        finally:
            self._remove(hd)

    @contextlib.contextmanager
    def _mounted(self, lowers: list[str], upper: str | None) -> Iterator[str]:
        """A pyunion mount of the layers (+ upper), detached (`mount.mount_detached`): in no
        mount namespace, named by its fd (`/proc/self/fd/N`), gone when the fd is closed.

        The build never copies the host's mount namespace, so it pins none of its mounts.
        """
        from .. import procfs
        from ..mount import mount_detached
        from ..options import MountConfig

        mnt = os.path.join(self.tmp, "mnt-" + os.urandom(6).hex())  # names it in messages
        work = None
        if upper is not None:
            work = os.path.join(os.path.dirname(upper), "." + os.path.basename(upper) + ".work")
            os.makedirs(work, exist_ok=True)
        cfg = MountConfig(
            lowers=lowers,
            mountpoint=mnt,
            upper=upper,
            work=work,
            fuse_options={"allow_other", "suid", "dev"},
            read_only=upper is None,
        )
        pid, mfd = mount_detached(cfg)
        daemon = procfs.process_id(pid)  # it holds the mount: alive (a fork server's child?)
        try:
            yield fd_str(mfd)
        finally:
            os.close(mfd)  # the last reference (the caller closed its fds): the mount ends
            procfs.stop(daemon, 10)


@dataclass
class _CopyPlan:
    inst: Instruction
    dest: str
    dest_is_dir: bool
    flags: dict[str, str | None]
    patterns: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    heredocs: list[tuple[str, str]] = field(default_factory=list)
    from_state: ImageState | None = None
    # The --from stage's tree, mounted for the cache key, and its sources: the copy's too.
    from_sources: tuple[SourceTree, list[Source]] | None = None
    multi: bool = False
    key: str = ""
    created_by: str = ""


NOP = "/bin/sh -c #(nop) "  # buildah's history prefix of every step but RUN


def _copy_history(inst: Instruction, multi: bool, sources: list[Source], digest: str) -> str:
    """buildah's history text of a COPY or ADD: the kind and digest of what it copies, and
    the destination as written (unsubstituted), with its trailing space."""
    kind = "multi" if multi else ("dir" if sources and sources[0].is_dir else "file")
    return f"{NOP}{inst.cmd} {kind}:{digest} in {inst.args[-1]} "


def _heredoc_name(word: str) -> str | None:
    """The heredoc a COPY source word `<<NAME`, `<<-NAME`, `<<'NAME'` or `<<"NAME"` names
    (quotes only stop expansion, as in the shell); None for any other word."""
    if not word.startswith("<<"):
        return None
    name = word[2:].lstrip("-")
    if len(name) >= 2 and name[0] in "'\"" and name[-1] == name[0]:
        name = name[1:-1]
    return name


def _heredoc_file_name(name: str, inst: Instruction) -> str:
    """The name a `COPY <<NAME` file gets in the image: the last component of NAME, as
    buildah takes it (`<<a/b` makes `b`); a name that is no file name is refused."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if base in ("", ".", "..") or "\0" in base:
        raise BuildError(f"line {inst.line}: {inst.cmd} <<{name}: not a file name for a heredoc")
    return base


def _heredoc_script(inst: Instruction) -> str:
    """The shell script of a RUN with heredocs, as BuildKit runs it."""
    cmd = " ".join(inst.args).strip()
    if len(inst.heredocs) == 1 and cmd in (
        f"<<{inst.heredocs[0].name}",
        f"<<-{inst.heredocs[0].name}",
    ):
        content = inst.heredocs[0].content
        if content.startswith("#!"):
            interp = content.split("\n", 1)[0][2:].strip()
            return f"{interp} <<'PYUNION_HEREDOC_EOF'\n{content}PYUNION_HEREDOC_EOF\n"
        return content
    # Anything else: the command and its here-documents, handed to the shell as written.
    body = inst.original.split(None, 1)[1] if " " in inst.original else ""
    return body


def _wait_child(pid: int) -> int:
    """Wait for a RUN's child; ^C reaches it from the terminal, SIGTERM is passed on."""
    got: list[int] = []

    def on_signal(signo: int, _frame: Any) -> None:
        got.append(signo)
        if signo != signal.SIGINT:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signo)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = wait_exit_code(pid)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        raise BuildError(f"interrupted by signal {got[0]}", 128 + got[0])
    return code


def build(opts: BuildOptions) -> str:
    """Build the Containerfile in `opts`; returns the new image's ID."""
    return Builder(opts).build()


__all__ = ["BuildError", "BuildOptions", "DockerfileError", "StepFailed", "build"]

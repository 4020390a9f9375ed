"""`pyunion build [OPTIONS] CONTEXT`: the command line of the build."""

from __future__ import annotations

import argparse
import os

from ..errors import UserError
from ..tree import open_named_output


def _bool(text: str) -> bool:
    v = text.lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


class _BoolAction(argparse.Action):
    """`--layers`, `--layers=true|false` (and --rm, --force-rm); `--layers DIR` is the
    flag and then the context (as buildah users type it, Go's flags taking a boolean's
    value only after `=`), not a bad boolean."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        if values is None:
            setattr(namespace, self.dest, True)
            return
        text = str(values)
        try:
            setattr(namespace, self.dest, _bool(text))
        except argparse.ArgumentTypeError:
            setattr(namespace, self.dest, True)
            namespace.context_after_flag = text


# --pull: what buildah 1.28 and podman take. The build never pulls: these leave the base
# image to the store (an image not there is an error saying how to get it).
PULL_STORE = ("true", "false", "missing", "never", "ifmissing")
PULL_REGISTRY = ("always", "newer", "ifnewer")


class _PullAction(argparse.Action):
    """`--pull[=POLICY]`; `--pull DIR` is the flag and then the context. A policy that
    pulls every time is refused: pyunion build uses no network."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        text = "missing" if values is None else str(values).lower()
        if text not in (*PULL_STORE, *PULL_REGISTRY):
            namespace.context_after_flag = str(values)
            text = "missing"
        namespace.pull = text  # checked with the other options, as a one-line error


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "build",
        aliases=["bud"],
        help="build an image from a Containerfile/Dockerfile",
        usage="pyunion build [OPTIONS] [CONTEXT]",
        description="Build an image from the Containerfile (or Dockerfile) in CONTEXT, one "
        "layer per RUN, COPY and ADD, each RUN in a pyunion container; unchanged "
        "steps come from the build cache. The image goes into the store; its ID is "
        "the last line printed (bare hex, as buildah prints it).",
    )
    p.add_argument(
        "context",
        metavar="CONTEXT",
        nargs="?",
        help="the build context directory (default: the working directory, as buildah's)",
    )
    p.add_argument(
        "-f",
        "--file",
        metavar="FILE",
        help="the Containerfile ('-' reads it from stdin; default: "
        "CONTEXT/Containerfile, else CONTEXT/Dockerfile)",
    )
    p.add_argument(
        "-t",
        "--tag",
        action="append",
        default=[],
        metavar="NAME[:TAG]",
        help="name the image (repeatable)",
    )
    p.add_argument(
        "--build-arg",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="set a build argument (KEY alone: from the environment)",
    )
    p.add_argument("--target", metavar="STAGE", help="build up to this stage and tag it")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="run every step (the results still go into the cache)",
    )
    p.add_argument(
        "--layers",
        action=_BoolAction,
        nargs="?",
        default=True,
        metavar="true|false",
        help="one layer per RUN/COPY/ADD with the build cache (default); "
        "--layers=false: one new layer per stage, no cache",
    )
    p.add_argument(
        "--squash",
        action="store_true",
        help="the new layers of each stage as one layer (as --layers=false)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the image ID (and the commands' own output)",
    )
    p.add_argument(
        "--network",
        "--net",
        metavar="MODE",
        default="host",
        help="the network of RUN steps without their own --network: host (default) "
        "or none (a namespace with only the loopback)",
    )
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add a label to the image (a LABEL step after the last instruction, as buildah)",
    )
    p.add_argument("--iidfile", metavar="FILE", help="write the image ID to FILE")
    p.add_argument(
        "--ignorefile",
        metavar="FILE",
        help="the ignore rules (.containerignore syntax) instead of the context's",
    )
    p.add_argument(
        "--platform",
        metavar="OS/ARCH",
        help="only this machine's platform is built (accepted for scripts that name it)",
    )
    p.add_argument(
        "--format",
        choices=("oci", "docker"),
        default="oci",
        help="accepted for buildah's scripts: the config always keeps Docker's fields "
        "(Healthcheck, OnBuild, Shell)",
    )
    p.add_argument(
        "--pull",
        action=_PullAction,
        nargs="?",
        metavar="POLICY",
        default="missing",
        help="missing, never (and true, false): the base image comes from the store, "
        "never from a registry; always and newer are refused",
    )
    for flag, default in (("--rm", True), ("--force-rm", False)):
        p.add_argument(
            flag,
            action=_BoolAction,
            nargs="?",
            default=default,
            metavar="true|false",
            help="accepted for buildah's scripts: no intermediate container is kept",
        )
    p.add_argument("--store", metavar="DIR", help="image store directory")
    p.set_defaults(handler=_cmd_build, context_after_flag=None)


def parse_build_args(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise UserError(f"--build-arg {item!r}: expected KEY=VALUE")
        if not eq:
            if key not in os.environ:
                continue
            value = os.environ[key]
        out[key] = value
    return out


# What any error of the build exits with, as buildah's and podman's do; a failing RUN
# exits with its command's status (executor.StepFailed), a signal that stopped the
# build with 128 + its number.
TOOL_ERROR = 125


def parse_labels(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key:
            raise UserError(f"--label {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _cmd_build(args: argparse.Namespace) -> int:
    try:
        return _build(args)
    except UserError as e:
        if e.code == 1 and not getattr(e, "command_status", False):
            e.code = TOOL_ERROR
        raise


def _build(args: argparse.Namespace) -> int:
    from ..userns import enter_rootless

    # Before the executor is imported: its Containerfile parser (Go code) starts threads, and
    # a multi-threaded process cannot enter a user namespace.
    enter_rootless()
    from ..image.store import bare_id
    from ..run import check_network
    from .executor import BuildOptions, build, check_platform

    context = args.context or args.context_after_flag or "."
    if args.context and args.context_after_flag:
        raise UserError(f"unexpected argument {args.context_after_flag!r} (a flag's value?)")
    if args.pull not in PULL_STORE:
        raise UserError(
            f"--pull={args.pull}: pyunion build never pulls (the base image comes from "
            "the store: 'pyunion pull' it first)"
        )
    if args.platform is not None:
        check_platform(args.platform)
    image_id = build(
        BuildOptions(
            context=context,
            file=args.file,
            tags=list(args.tag),
            build_args=parse_build_args(args.build_arg),
            target=args.target,
            no_cache=args.no_cache,
            layers=args.layers and not args.squash,
            store=args.store,
            quiet=args.quiet,
            network=check_network(args.network),
            labels=parse_labels(args.label),
            ignorefile=args.ignorefile,
        )
    )
    if args.iidfile:
        try:  # as root may write a path a user can reach (no symlink or FIFO of hers)
            fd = open_named_output(args.iidfile)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, image_id.encode())  # buildah's: the ID, no newline
            finally:
                os.close(fd)
        except OSError as e:
            raise UserError(f"--iidfile {args.iidfile}: {e.strerror}") from None
    print(bare_id(image_id))  # last, on its own line, bare as buildah prints it
    return 0

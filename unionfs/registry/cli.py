"""The registry subcommands: `pull`, `push`, `login`, `logout` (podman's options)."""

from __future__ import annotations

import argparse
import getpass
import sys

import trio

from ..cli import store_option
from ..errors import UserError
from ..image import platforms
from ..image.cli import platform_option
from ..image.store import Store
from . import auth
from .auth import Credentials, parse_registry
from .client import TIMEOUT, Client, Options


def _bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = units.get(t[-1:], 1)
    try:
        n = int(t[:-1] if t[-1:] in units else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None
    if n < 1 << 16:
        raise argparse.ArgumentTypeError("the chunk size must be at least 64KiB")
    return n


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v < 1e6:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}")
    return v


def _common(p: argparse.ArgumentParser, creds: bool = True) -> None:
    p.add_argument(
        "--tls-verify",
        type=_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="verify the registry's certificate and require HTTPS "
        "(default true; false also allows plain HTTP)",
    )
    p.add_argument(
        "--cert-dir",
        metavar="DIR",
        help="CA certificates (*.crt) and client "
        "certificates (*.cert + *.key) to use (default: "
        "/etc/containers/certs.d/REGISTRY and /etc/docker/certs.d/REGISTRY)",
    )
    p.add_argument(
        "--authfile",
        metavar="FILE",
        help="credentials file (default: "
        "$REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json, also "
        "reading ~/.config/containers/auth.json and ~/.docker/config.json)",
    )
    if creds:
        p.add_argument("--creds", metavar="USER:PASS", help="credentials for the registry")
        p.add_argument(
            "--retry",
            type=int,
            default=3,
            metavar="N",
            help="retries of a transient failure (default 3)",
        )
        p.add_argument(
            "--retry-delay",
            type=float,
            default=0.5,
            metavar="SECONDS",
            help="first delay between retries, doubled each time (default 0.5)",
        )
        p.add_argument(
            "--timeout",
            type=_seconds,
            default=TIMEOUT,
            metavar="SECONDS",
            help="how long the registry may take to answer a request, to send a whole "
            f"manifest or token, or to send each 64KiB of a blob (default {TIMEOUT:.0f})",
        )
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        store_option(p)


def _options(args: argparse.Namespace) -> Options:
    return Options(
        tls_verify=args.tls_verify,
        cert_dir=args.cert_dir,
        creds=Credentials.parse(args.creds) if getattr(args, "creds", None) else None,
        retries=max(0, getattr(args, "retry", 3)),
        retry_delay=max(0.0, getattr(args, "retry_delay", 0.5)),
        authfile=args.authfile,
        timeout=getattr(args, "timeout", TIMEOUT),
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "pull",
        help="pull an image from a registry",
        description="Copy IMAGE from a registry into the store. Only the layers "
        "the store lacks are downloaded. A short name is completed as docker "
        "does: 'busybox' is docker.io/library/busybox:latest; a first component "
        "with a '.' or ':' or 'localhost' names the registry.",
    )
    p.add_argument("image", metavar="IMAGE", help="[REGISTRY/]NAME[:TAG][@DIGEST]")
    platform_option(p)
    _common(p)
    p.set_defaults(handler=cmd_pull)

    p = sub.add_parser(
        "push",
        help="push an image to a registry",
        description="Copy IMAGE from the store to DESTINATION (default: IMAGE "
        "read as a reference). Blobs the registry has are not uploaded again.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument(
        "destination", metavar="DESTINATION", nargs="?", help="[docker://]REGISTRY/NAME[:TAG]"
    )
    p.add_argument(
        "--chunk-size",
        type=_size,
        default=None,
        metavar="SIZE",
        help="blobs larger than this are uploaded in chunks of this size (default 64MiB)",
    )
    _common(p)
    p.set_defaults(handler=cmd_push)

    p = sub.add_parser(
        "login",
        help="log in to a registry",
        description="Check USERNAME and PASSWORD against REGISTRY and store them "
        "where podman, buildah and skopeo find them too.",
    )
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument(
        "--get-login", action="store_true", help="print the user name stored for REGISTRY"
    )
    _common(p, creds=False)
    p.set_defaults(handler=cmd_login)

    p = sub.add_parser("logout", help="forget the credentials of a registry")
    p.add_argument("registry", metavar="REGISTRY", nargs="?")
    p.add_argument("-a", "--all", action="store_true", help="forget every registry's")
    p.add_argument("--authfile", metavar="FILE")
    p.set_defaults(handler=cmd_logout)


def cmd_pull(args: argparse.Namespace) -> int:
    from ..userns import enter_rootless
    from .pull import pull

    enter_rootless()  # an ordinary user's layers are unpacked with the namespace's owners

    plat = platforms.parse(args.platform) if args.platform else None
    img, _ = pull(args.image, Store(args.store), _options(args), plat, args.quiet)
    print(img.id)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .push import CHUNK, push

    img, _ref, _ = push(
        args.image,
        args.destination,
        Store(args.store, create=False),
        _options(args),
        args.quiet,
        args.chunk_size or CHUNK,
    )
    print(img.digest)
    return 0


async def _check_login(registry: str, opts: Options, creds: Credentials) -> None:
    """Log in as podman does: `GET /v2/` (and a token for no scope) must accept the creds."""
    async with Client(registry, opts, creds) as c:
        resp = await c.request("GET", "/v2/", ())
        if resp.status_code != 200:
            raise await c.fail(resp, f"logging in to {registry}")


def cmd_login(args: argparse.Namespace) -> int:
    registry = parse_registry(args.registry)
    if args.get_login:
        creds = auth.lookup(registry, None, args.authfile)
        if creds is None:
            raise UserError(f"not logged in to {registry}")
        print(creds.username)
        return 0
    user = args.username
    if not user:
        if not sys.stdin.isatty():
            raise UserError("login: give --username (no terminal to ask on)")
        user = input("Username: ").strip()
    if args.password_stdin:
        if args.password:
            raise UserError("login: --password and --password-stdin exclude each other")
        password = sys.stdin.readline().rstrip("\r\n")
    elif args.password is not None:
        password = args.password
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise UserError("login: give --password or --password-stdin (no terminal to ask on)")
    if not user or not password:
        raise UserError("login: the user name and password must not be empty")
    creds = Credentials(user, password)
    trio.run(_check_login, registry, _options(args), creds)
    auth.store(registry, creds, args.authfile)
    print("Login Succeeded!")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    if args.all:
        auth.remove(None, args.authfile)
        print("Removed login credentials for all registries")
        return 0
    if not args.registry:
        raise UserError("logout: give a REGISTRY or --all")
    registry = parse_registry(args.registry)
    if not auth.remove(registry, args.authfile):
        raise UserError(f"not logged in to {registry}")
    print(f"Removed login credentials for {registry}")
    return 0

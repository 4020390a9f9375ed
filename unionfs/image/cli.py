"""The image subcommands: `image import|export`, `images`, `history`, `rmi`, `inspect`,
`tag`, `commit`. Each is a thin shell over the package's functions."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from datetime import UTC, datetime
from typing import Any

from .. import jsondoc
from ..cli import store_option
from ..errors import UserError
from ..progress import Bars
from ..userns import enter_rootless
from . import platforms
from .safetext import printable
from .store import Image, Store, short_id


def platform_option(p: argparse.ArgumentParser) -> None:
    """`--platform OS/ARCH[/VARIANT]`, as import and pull take it (`platforms.parse`)."""
    p.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="the image to pick from a multi-platform index (default: this machine's)",
    )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    img = sub.add_parser(
        "image",
        help="import or export images",
        description="Import images into the store, or export them.",
    )
    isub = img.add_subparsers(dest="image_command", metavar="COMMAND")
    isub.required = True

    p = isub.add_parser(
        "import",
        help="import an OCI layout or a docker save archive",
        description="Import an OCI image layout (directory or tar) or a "
        "'docker save' archive. Digests are verified; layers already in the "
        "store are not unpacked again.",
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--tag", "-t", help="name to give the image (default: the names it has)")
    p.add_argument("--ref", help="import only the image with this name in the layout/archive")
    platform_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress report")
    store_option(p)
    p.set_defaults(handler=cmd_import)

    p = isub.add_parser(
        "export",
        help="write an image as an OCI layout or docker archive",
        description="Write IMAGE to PATH: an OCI image layout (a directory, "
        "or a tar if PATH ends in .tar) or a 'docker save' archive.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--format", choices=("oci", "docker"), default="oci")
    store_option(p)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("images", help="list the images in the store")
    p.add_argument("-q", "--quiet", action="store_true", help="only image IDs")
    p.add_argument("--no-trunc", action="store_true", help="full image IDs")
    store_option(p)
    p.set_defaults(handler=cmd_images)

    p = sub.add_parser("history", help="how an image was made: its history, top first")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--no-trunc", action="store_true", help="do not shorten digests and commands")
    p.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="json: a JSON array, one object per history entry",
    )
    store_option(p)
    p.set_defaults(handler=cmd_history)

    p = sub.add_parser("rmi", help="remove images (and the layers no other image uses)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    store_option(p)
    p.set_defaults(handler=cmd_rmi)

    p = sub.add_parser("inspect", help="an image's manifest, config and layers as JSON")
    p.add_argument("image", metavar="IMAGE")
    store_option(p)
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("tag", help="give an image another name")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("name", metavar="NAME")
    store_option(p)
    p.set_defaults(handler=cmd_tag)

    p = sub.add_parser(
        "commit",
        help="commit an upper directory as a new image layer",
        description="Make a new image from BASE plus the changes in UPPER (the "
        "writable layer of 'run --keep' or of a mount's --upper; unmount first).",
    )
    p.add_argument("upper", metavar="UPPER")
    p.add_argument(
        "--image", "-i", required=True, metavar="BASE", help="the image UPPER was made on"
    )
    p.add_argument("--tag", "-t", metavar="NAME", help="name of the new image")
    p.add_argument("-m", "--message", help="history entry (created_by)")
    p.add_argument("--author")
    p.add_argument("--cmd", help="new Cmd: a JSON array or a shell-quoted string")
    p.add_argument("--entrypoint", help="new Entrypoint: a JSON array or a shell-quoted string")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-w", "--workdir")
    p.add_argument("-u", "--user")
    p.add_argument("--compression", choices=("gzip", "zstd", "none"), default="gzip")
    p.add_argument(
        "--timestamp",
        type=int,
        metavar="EPOCH",
        help="clamp every mtime and the creation time to EPOCH (reproducible layers)",
    )
    store_option(p)
    p.set_defaults(handler=cmd_commit)


def _store(args: argparse.Namespace, create: bool = False) -> Store:
    return Store(args.store, create=create)


# --- handlers -------------------------------------------------------------------
# Import, export and commit load their modules when they run: `run` and `pull` build
# their parsers from this module, and must not pay for tar and compression.
def cmd_import(args: argparse.Namespace) -> int:
    from .load import import_image

    enter_rootless()  # an ordinary user's layers hold the namespace's owners
    store = _store(args, create=True)
    plat = platforms.parse(args.platform) if args.platform else None
    progress = Bars(False if args.quiet else None)
    done = import_image(
        args.path, store, tag=args.tag, ref=args.ref, platform=plat, progress=progress
    )
    for digest, tags in done:
        img = store.image(digest)
        names = printable(", ".join(tags)) if tags else "<none>"
        print(f"Loaded image {names} ({short_id(img.id)})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_image

    img = export_image(_store(args), args.image, args.path, args.format)
    print(f"Exported {short_id(img.id)} to {args.path}", file=sys.stderr)
    return 0


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.3g}{unit}"
        n /= 1000
    return f"{n}"


def _parse_time(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    t = text.rstrip("Z")
    if "." in t:
        head, frac = t.split(".", 1)
        frac = "".join(ch for ch in frac if ch.isdigit())[:6]
        t = f"{head}.{frac or '0'}"
        fmt = "%Y-%m-%dT%H:%M:%S.%f"
    else:
        fmt = "%Y-%m-%dT%H:%M:%S"
    try:
        return datetime.strptime(t[:26], fmt).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def human_age(text: Any) -> str:
    ts = _parse_time(text)
    if ts is None:
        return "N/A"
    d = max(0.0, time.time() - ts)
    for secs, unit in (
        (86400 * 365, "year"),
        (86400 * 30, "month"),
        (86400 * 7, "week"),
        (86400, "day"),
        (3600, "hour"),
        (60, "minute"),
    ):
        if d >= secs:
            n = int(d // secs)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "Less than a minute ago" if d >= 1 else "Now"


def _image_size(store: Store, img: Image) -> int:
    total = 0
    for d in img.diff_ids:
        with contextlib.suppress(UserError):
            total += int(store.layer_info(d).get("size", 0))
    return total


def _table(rows: list[list[str]]) -> None:
    """Columns of text from the store, every cell escaped (`safetext.printable`)."""
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_images(args: argparse.Namespace) -> int:
    store = _store(args, create=True)
    imgs = store.images()
    if args.quiet:
        for img in imgs:
            print(img.id if args.no_trunc else short_id(img.id))
        return 0
    rows = [["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]]
    for img in imgs:
        iid = img.id if args.no_trunc else short_id(img.id)
        size = human_size(_image_size(store, img))
        created = human_age(img.config.get("created"))
        for t in img.tags or ["<none>:<none>"]:
            repo, tag = t.rsplit(":", 1)
            rows.append([repo, tag, iid, created, size])
    _table(rows)
    return 0


def history_rows(store: Store, img: Image) -> list[dict[str, Any]]:
    """One row per history entry, top first; each non-empty entry paired with its layer."""
    diffs = img.diff_ids
    hist = [h for h in img.config.get("history") or [] if isinstance(h, dict)]
    rows: list[dict[str, Any]] = []
    li = 0
    for h in hist:
        row: dict[str, Any] = {
            "created": h.get("created"),
            "created_by": h.get("created_by") or "",
            "comment": h.get("comment") or "",
            "layer": None,
            "size": 0,
        }
        if not h.get("empty_layer") and li < len(diffs):
            row["layer"] = diffs[li]
            li += 1
        rows.append(row)
    for d in diffs[li:]:  # layers the history does not account for
        rows.append({"created": None, "created_by": "", "comment": "", "layer": d, "size": 0})
    for r in rows:
        if r["layer"] is not None:
            try:
                r["size"] = int(store.layer_info(r["layer"]).get("size", 0))
            except UserError:
                r["size"] = 0
    return rows[::-1]


def cmd_history(args: argparse.Namespace) -> int:
    """Docker's columns: the image ID on the top row (`<missing>` below, as for an image
    whose intermediate states are not images of their own), age, command, layer size."""
    store = _store(args)
    img = store.lookup(args.image)
    rows = history_rows(store, img)
    if args.format == "json":
        out = []
        for i, r in enumerate(rows):
            out.append(
                {
                    "id": img.id if i == 0 else "<missing>",
                    "created": r["created"],
                    "createdBy": r["created_by"],
                    "size": r["size"],
                    "comment": r["comment"] or "",
                    "layer": r["layer"],
                    "emptyLayer": r["layer"] is None,
                }
            )
        print(json.dumps(out, indent=2))
        return 0
    table = [["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]]
    for i, r in enumerate(rows):
        iid = "<missing>" if i else (img.id if args.no_trunc else short_id(img.id))
        by = str(r["created_by"]) if args.no_trunc else " ".join(str(r["created_by"]).split())
        by = printable(by)
        if not args.no_trunc and len(by) > 60:
            by = by[:57] + "..."
        table.append(
            [
                iid,
                human_age(r["created"]),
                by,
                human_size(r["size"]),
                printable(str(r["comment"] or "")),
            ]
        )
    _table(table)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    enter_rootless()  # an ordinary user's layers hold the namespace's owners
    store = _store(args)
    status = 0
    for ref in args.images:
        try:
            untagged, deleted = store.remove(ref)
        except UserError as e:
            print(f"pyunion: {printable(e)}", file=sys.stderr)  # escaped, as cli._report does
            status = 1
            continue
        for t in untagged:
            print(f"Untagged: {printable(t)}")
        for d in deleted:
            print(f"Deleted: {d}")
    return status


def inspect_data(store: Store, img: Image) -> dict[str, Any]:
    cfg = img.config
    layers = []
    for desc, d in zip(img.manifest.get("layers", []), img.diff_ids, strict=False):
        info = store.layer_info(d) if store.has_layer(d) else {}
        layers.append(
            {
                "DiffID": d,
                "Digest": desc.get("digest"),
                "MediaType": desc.get("mediaType"),
                "Size": info.get("size"),
                "Path": store.layer_path(d),
                "Whiteouts": info.get("whiteouts"),
            }
        )
    return {
        "Id": img.id,
        "Digest": img.digest,
        "RepoTags": img.tags,
        "Created": cfg.get("created"),
        "Author": cfg.get("author"),
        "Architecture": cfg.get("architecture"),
        "Os": cfg.get("os"),
        "Variant": cfg.get("variant"),
        "Config": cfg.get("config") or {},
        "RootFS": cfg.get("rootfs"),
        "History": cfg.get("history") or [],
        "Size": _image_size(store, img),
        "Layers": layers,
        "Manifest": img.manifest,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _store(args)
    print(json.dumps([inspect_data(store, store.lookup(args.image))], indent=2))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = _store(args)
    img = store.lookup(args.image)
    store.add_image(img.digest, store.blob_size(img.digest), args.name, img.media_type)
    return 0


def _argv(text: str | None, what: str) -> list[str] | None:
    if text is None:
        return None
    if text.lstrip().startswith("["):
        try:
            v = jsondoc.parse(text, f"--{what}")
        except jsondoc.JSONError as e:
            raise UserError(f"{e} (a JSON array of strings or a command line)") from None
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise UserError(f"--{what}: expected a JSON array of strings")
        return v
    try:
        return shlex.split(text)
    except ValueError as e:
        raise UserError(f"--{what}: {e}") from None


def cmd_commit(args: argparse.Namespace) -> int:
    from .commit import Changes, commit

    enter_rootless()  # an ordinary user's layers hold the namespace's owners
    store = _store(args)
    for kv in args.env:
        if "=" not in kv or kv.startswith("="):
            raise UserError(f"--env {kv!r}: expected KEY=VALUE")
    changes = Changes(
        message=args.message,
        author=args.author,
        cmd=_argv(args.cmd, "cmd"),
        entrypoint=_argv(args.entrypoint, "entrypoint"),
        env=list(args.env),
        workdir=args.workdir,
        user=args.user,
    )
    digest, _base = commit(
        store, args.upper, args.image, args.tag, changes, args.compression, args.timestamp
    )
    print(store.lookup(digest).id)
    return 0

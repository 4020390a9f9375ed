"""`pyunion build` against `buildah bud` as the oracle, and the build cache's rules.

The same Containerfiles are built by buildah (vfs storage, `--isolation chroot`,
`--layers`) and by pyunion, on the busybox sample image and on the debootstrap
rootfs. buildah's image is unpacked by umoci, pyunion's is mounted with
`pyunion mount IMAGE`; the trees must be equal (types, modes, owners, sizes,
contents, link targets; times are left out) and the configs must agree on Env,
Cmd, Entrypoint, WorkingDir, User, ExposedPorts, Labels and Volumes. The
only things left out are what buildah itself adds: the empty /etc/hosts,
/etc/hostname and /etc/resolv.conf it leaves as mount points in a RUN's layer
when the image has none, its io.buildah.version label, and log files that
record the time of day.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import support
from ocilayout import Layout
from support import PYUNION, force_unmount, fuse_skip_reason, pyunion, tree_view

from unionfs.build.ignore import Matcher
from unionfs.build.lexer import Lexer, SubstitutionError
from unionfs.build.parse import parse
from unionfs.build.sources import SourceTree
from unionfs.errors import UserError
from unionfs.image import Store

TOOLS = ("buildah", "skopeo", "umoci", "dpkg-deb")
CONFIG_KEYS = (
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Labels",
    "Volumes",
)
BUILDAH_MOUNT_POINTS = (b"etc/hosts", b"etc/hostname", b"etc/resolv.conf")
TIME_OF_DAY_LOGS = (b"var/log/dpkg.log", b"var/log/alternatives.log")


def _skip_reason() -> str | None:
    reason = fuse_skip_reason()
    if reason:
        return reason
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (scripts/setup.sh installs them)"
    return None


needs_tools = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def sh(*args: str | Path, timeout: float = 300) -> str:
    """`support.sh` with the patience of a build."""
    return support.sh(*args, timeout=timeout)


@dataclass
class Env:
    tmp: Path
    store: str
    root: Path  # buildah's vfs storage
    runroot: Path

    @property
    def bah(self) -> list[str]:
        return [
            "buildah",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "vfs",
        ]

    @property
    def cs(self) -> str:
        return f"containers-storage:[vfs@{self.root}+{self.runroot}]"

    def build(
        self, ctx: Path, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [*PYUNION, "build", "--store", self.store, *args, str(ctx)],
            capture_output=True,
            text=True,
            timeout=600,
            input=stdin,
            check=False,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"pyunion build failed ({r.returncode}): {r.stderr[-3000:]}\n{r.stdout[-3000:]}"
            )
        return r

    def buildah(self, ctx: Path, tag: str, *args: str) -> None:
        layers = () if any(a.startswith("--layers") for a in args) else ("--layers",)
        sh(
            *self.bah,
            "bud",
            *layers,
            "--isolation",
            "chroot",
            "-q",
            "-t",
            tag,
            *args,
            ctx,
            timeout=900,
        )

    def buildah_code(self, ctx: Path, *args: str) -> int:
        """The exit status of a `buildah bud` expected to fail (no image is tagged)."""
        return subprocess.run(
            [*self.bah, "bud", "--layers", "--isolation", "chroot", "-q", *args, str(ctx)],
            capture_output=True,
            timeout=900,
            check=False,
            stdin=subprocess.DEVNULL,
        ).returncode

    def buildah_image(self, tag: str) -> tuple[dict[bytes, tuple], dict]:
        """(tree as umoci unpacks it, config) of a buildah image."""
        layout, bundle = self.tmp / f"oci-{tag}", self.tmp / f"bundle-{tag}"
        sh("skopeo", "copy", "-q", f"{self.cs}localhost/{tag}:latest", f"oci:{layout}:{tag}")
        sh("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
        try:
            cfg = _layout_config(layout)
            return tree_view(bundle / "rootfs"), cfg
        finally:
            shutil.rmtree(bundle, ignore_errors=True)
            shutil.rmtree(layout, ignore_errors=True)

    def pyunion_image(self, tag: str) -> tuple[dict[bytes, tuple], dict]:
        mnt = self.tmp / f"mnt-{tag}"
        mnt.mkdir(exist_ok=True)
        pyunion("mount", "--store", self.store, tag, str(mnt))
        try:
            view = tree_view(mnt)
        finally:
            if pyunion("umount", str(mnt), check=False).returncode != 0:
                force_unmount(mnt)
        return view, Store(self.store).lookup(tag).config


def _layout_config(layout: Path) -> dict:
    idx = json.loads((layout / "index.json").read_text())
    man = json.loads((layout / "blobs/sha256" / idx["manifests"][0]["digest"][7:]).read_text())
    return json.loads((layout / "blobs/sha256" / man["config"]["digest"][7:]).read_text())


def compare(theirs: tuple[dict[bytes, tuple], dict], ours: tuple[dict[bytes, tuple], dict]) -> None:
    """The trees and the configs agree, buildah's own additions left out."""
    bview, bcfg = theirs
    pview, pcfg = ours
    for p in BUILDAH_MOUNT_POINTS:
        e = bview.get(p)
        if e is not None and p not in pview and e[4] == 0:
            del bview[p]
    for view in (bview, pview):
        for p in TIME_OF_DAY_LOGS:
            if p in view:
                view[p] = view[p][:4]
    diff = {
        k: (bview.get(k), pview.get(k))
        for k in set(bview) | set(pview)
        if bview.get(k) != pview.get(k)
    }
    assert not diff, f"trees differ (buildah, pyunion): {sorted(diff.items())[:20]}"
    bc, pc = bcfg.get("config") or {}, pcfg.get("config") or {}
    (bc.get("Labels") or {}).pop("io.buildah.version", None)
    for key in CONFIG_KEYS:
        assert (bc.get(key) or None) == (pc.get(key) or None), key


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A pyunion store and a buildah vfs storage, both holding the busybox sample as `busybox`."""
    t = tmp_path_factory.mktemp("build")
    e = Env(t, str(t / "store"), t / "root", t / "runroot")
    try:
        pyunion("sample", str(t / "sample"), "--oci")
        pyunion(
            "image", "import", str(t / "sample/oci"), "--tag", "busybox", "--store", e.store, "-q"
        )
        sh(
            "skopeo",
            "copy",
            "-q",
            f"oci:{t / 'sample/oci'}:latest",
            f"{e.cs}localhost/busybox:latest",
        )
        yield e
    finally:
        subprocess.run([*e.bah, "rm", "--all"], capture_output=True, timeout=120, check=False)
        subprocess.run(["umount", "-R", str(e.root)], capture_output=True, timeout=60, check=False)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def _tar_gz(path: Path, members: list[tuple[str, bytes | None, int]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data, mode in members:
            ti = tarfile.TarInfo(name)
            ti.uid, ti.gid, ti.mtime, ti.mode = 123, 456, 1_600_000_000, mode
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif name.endswith("@link"):
                ti.name, ti.type, ti.linkname = name[:-5], tarfile.SYMTYPE, data.decode()
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))


BUSYBOX_FILE = r"""# A multi-stage build that touches every instruction buildah and pyunion share.
ARG BASE=busybox
FROM ${BASE} AS builder
USER root
ARG GREETING=hello
RUN mkdir -p /out/bin /out/etc && echo "$GREETING from the builder" > /out/etc/greeting \
 && chown -R 1000:100 /out && chmod 750 /out/bin && ln -s ../etc/greeting /out/bin/link

FROM ${BASE}
USER root
ARG GREETING=hello
ENV APP_HOME=/srv/app PATH=/srv/app/bin:$PATH
WORKDIR $APP_HOME
COPY --from=builder /out ./
COPY --chown=alice:users src/ ./src/
COPY --chmod=0640 config.ini single.txt conf/
COPY *.md docs/
ADD bundle.tar.gz /opt/bundle/
ADD plain.txt /opt/plain.txt
RUN echo "${GREETING:-none} ${UNSET:-dflt}" > greeting && rm /etc/motd && rm -rf /opt/old \
 && mkdir -p /var/empty-dir
USER alice
RUN touch /home/alice/made-by-alice
USER root
SHELL ["/bin/sh", "-ec"]
RUN ["/bin/sh", "-c", "echo exec form > exec-form"]
RUN test -f exec-form && echo shell form > shell-form
LABEL org.example.name="pyunion test" version=1
EXPOSE 8080 53/udp 9000-9001
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo $APP_HOME"]
STOPSIGNAL SIGINT
VOLUME /srv/data
"""


def _busybox_context(ctx: Path) -> None:
    _write(ctx / "Containerfile", BUSYBOX_FILE)
    _write(ctx / "src/main.py", "print('main')\n", 0o755)
    _write(ctx / "src/pkg/util.py", "X = 1\n", 0o600)
    _write(ctx / "src/pkg/util.pyc", "junk")  # ignored by a pattern
    _write(ctx / "src/cache/big.bin", "x" * 5000)  # ignored directory...
    _write(ctx / "src/cache/keep.txt", "kept\n")  # ...but this exception comes back
    os.symlink("main.py", ctx / "src/link-to-main")
    os.link(ctx / "src/main.py", ctx / "src/hardlink-to-main")
    os.mkdir(ctx / "src/private", 0o700)
    _write(ctx / "config.ini", "[a]\nb = 1\n")
    _write(ctx / "single.txt", "single\n")
    _write(ctx / "README.md", "readme\n")
    _write(ctx / "NOTES.md", "notes\n")
    _write(ctx / "secret.txt", "never in the image\n")
    _write(ctx / "plain.txt", "ADD copies a file that is no archive\n")
    _write(
        ctx / ".dockerignore", "# comment\n**/*.pyc\nsrc/cache\n!src/cache/keep.txt\nsecret.txt\n"
    )
    _tar_gz(
        ctx / "bundle.tar.gz",
        [
            ("top/", None, 0o750),
            ("top/a.txt", b"a\n", 0o644),
            ("top/bin/run.sh", b"#!/bin/sh\n", 0o755),
            ("top/alias@link", b"a.txt", 0o777),
        ],
    )


@needs_tools
def test_busybox_build_matches_buildah(env: Env) -> None:
    ctx = env.tmp / "ctx-busybox"
    _busybox_context(ctx)
    args = ("--build-arg", "GREETING=bonjour")
    env.buildah(ctx, "bb", *args)
    r = env.build(ctx, "-t", "bb", *args)
    assert re.fullmatch(r"[0-9a-f]{64}", r.stdout.strip().splitlines()[-1])
    assert "STEP 1/" in r.stdout and "Successfully tagged localhost/bb:latest" in r.stdout
    ours = env.pyunion_image("bb")
    compare(env.buildah_image("bb"), ours)
    view = ours[0]
    assert b"srv/app/src/cache/keep.txt" in view and b"srv/app/src/cache/big.bin" not in view
    assert b"srv/app/src/pkg/util.pyc" not in view and b"srv/app/secret.txt" not in view
    assert view[b"srv/app/src/main.py"][2:4] == (1000, 100)  # --chown=alice:users
    assert view[b"srv/app/bin"][1:4] == (0o750, 1000, 100)  # --from keeps owners
    assert view[b"opt/bundle/top/a.txt"][2:4] == (123, 456)  # ADD keeps the tar's
    assert b"etc/motd" not in view and b"opt/old" not in view
    cfg = ours[1]
    hist = [h["created_by"] for h in cfg["history"]]
    assert "|1 GREETING=bonjour /bin/sh -c touch /home/alice/made-by-alice" in hist
    assert any(
        h.startswith("/bin/sh -c #(nop) COPY dir:") and h.endswith(" in ./src/ ") for h in hist
    )
    assert any(re.fullmatch(r"/bin/sh -c #\(nop\) COPY dir:[0-9a-f]{64} in \./ ", h) for h in hist)
    assert "/bin/sh -c #(nop) USER alice" in hist
    assert len(cfg["rootfs"]["diff_ids"]) == 3 + 10  # the sample's three, one per RUN/COPY/ADD
    layered = [h for h in cfg["history"] if not h.get("empty_layer")]
    assert len(layered) == len(cfg["rootfs"]["diff_ids"])


@needs_tools
def test_built_image_exports_to_skopeo_and_umoci(env: Env) -> None:
    ctx = env.tmp / "ctx-export"
    _busybox_context(ctx)  # the same context as the comparison: the cache makes it quick
    env.build(ctx, "-t", "bb", "--build-arg", "GREETING=bonjour")
    view, _ = env.pyunion_image("bb")
    out = env.tmp / "export"
    pyunion("image", "export", "bb", str(out), "--store", env.store)
    pyunion(
        "image",
        "export",
        "bb",
        str(env.tmp / "export.tar"),
        "--format",
        "docker",
        "--store",
        env.store,
    )
    info = json.loads(sh("skopeo", "inspect", f"oci:{out}:latest"))
    assert len(info["Layers"]) == 13 and info["Labels"]["version"] == "1"
    sh(
        "skopeo",
        "copy",
        "-q",
        f"docker-archive:{env.tmp / 'export.tar'}",
        f"oci:{env.tmp / 'export2'}:x",
    )
    for layout, ref in ((out, "latest"), (env.tmp / "export2", "x")):
        bundle = env.tmp / f"export-bundle-{ref}"
        sh("umoci", "unpack", "--image", f"{layout}:{ref}", bundle)
        assert tree_view(bundle / "rootfs") == view, ref
        shutil.rmtree(bundle)


def _deb(path: Path) -> None:
    """A tiny local .deb (no network needed): a script, a data file and a postinst."""
    root = path.with_suffix("")
    _write(
        root / "DEBIAN/control",
        "Package: pyunion-hello\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: pyunion tests <tests@example.org>\nDescription: build test package\n",
    )
    _write(
        root / "DEBIAN/postinst",
        "#!/bin/sh\nset -e\nmkdir -p /var/lib/pyunion-hello\n"
        "echo installed > /var/lib/pyunion-hello/state\n",
        0o755,
    )
    _write(root / "usr/bin/pyunion-hello", "#!/bin/sh\necho hello from a .deb\n", 0o755)
    _write(root / "usr/share/pyunion-hello/data.txt", "data\n")
    sh("dpkg-deb", "--root-owner-group", "-Zgzip", "--build", root, path)
    shutil.rmtree(root)


DEBIAN_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_FILE = """FROM debian
COPY pyunion-hello.deb /tmp/
RUN dpkg -i /tmp/pyunion-hello.deb && rm /tmp/pyunion-hello.deb && pyunion-hello > /hello.out \\
 && useradd -m -u 1234 -s /bin/bash builder
COPY --chown=builder app/ /home/builder/app/
USER builder
RUN cd /home/builder/app && echo built > stamp && id -un >> stamp
"""


@pytest.fixture(scope="module")
def debian_image(env: Env, debian_rootfs: str) -> str:
    """The debootstrap rootfs as a one-layer image `debian`, in both stores."""

    layout = env.tmp / "debian-oci"
    lay = Layout(layout)
    tmp_tar = layout / "layer.tar"
    sh("tar", "-C", debian_rootfs, "--numeric-owner", "--xattrs", "-cf", tmp_tar, ".")
    layer = lay.put_file(tmp_tar)  # uncompressed: the digest is the DiffID
    config = {
        "architecture": "amd64" if os.uname().machine == "x86_64" else "arm64",
        "os": "linux",
        "config": {"Env": [DEBIAN_PATH], "Cmd": ["/bin/bash"]},
        "history": [{"created_by": "debootstrap"}],
    }
    lay.tag(lay.image([layer], [layer["digest"]], config), "latest")
    pyunion(
        "image", "import", str(layout), "--tag", "debian", "--store", env.store, "-q", timeout=300
    )
    sh("skopeo", "copy", "-q", f"oci:{layout}:latest", f"{env.cs}localhost/debian:latest")
    shutil.rmtree(layout)
    return "debian"


@needs_tools
def test_debian_build_with_dpkg_matches_buildah(env: Env, debian_image: str) -> None:
    ctx = env.tmp / "ctx-debian"
    _write(ctx / "Containerfile", DEBIAN_FILE)
    _deb(ctx / "pyunion-hello.deb")
    _write(ctx / "app/main.sh", "#!/bin/sh\necho app\n", 0o755)
    _write(ctx / "app/lib/data.txt", "data\n")
    env.buildah(ctx, "deb", "--layers=false")  # one container: vfs copies the rootfs once
    env.build(ctx, "-t", "deb")
    ours = env.pyunion_image("deb")
    compare(env.buildah_image("deb"), ours)
    view = ours[0]
    assert view[b"home/builder/app/main.sh"][2:4] == (1234, 1234)
    assert b"var/lib/pyunion-hello/state" in view and b"usr/bin/pyunion-hello" in view
    r = pyunion(
        "run",
        "--store",
        env.store,
        "deb",
        "--",
        "cat",
        "/home/builder/app/stamp",
        "/hello.out",
        timeout=120,
    )
    assert r.stdout == "built\nbuilder\nhello from a .deb\n"


# --- history and output, as buildah writes them ----------------------------------------------
HISTORY_FILE = """FROM scratch AS tiny
ENV T=1
COPY f.txt /f.txt

FROM busybox AS base
ARG A=1
ARG B
ARG C
ENV E=$A F="two words"
LABEL l=$A m="x y"
WORKDIR /app
WORKDIR sub
USER root
RUN echo $A $C > /a \\
    && echo more   >> /a
RUN true
COPY f.txt /f.txt
COPY d /dd/
COPY f.txt d/a $E/
ADD f.txt /g.txt
EXPOSE 80
STOPSIGNAL SIGINT
VOLUME /v
CMD ["sh"]
ENTRYPOINT echo hi
RUN ["/bin/sh", "-c", "echo exec > /e"]

FROM base
ENV Z=z
COPY --from=tiny /f.txt /from-tiny
RUN true
"""
DIGEST = re.compile(r"\b(dir|file|multi):[0-9a-f]{64} ")
FULL_ID = re.compile(r"[0-9a-f]{64}")


def _history(cfg: dict, base: int) -> list[tuple[str, bool, str]]:
    """The build's own history entries: (created_by with COPY's digest left out, empty
    layer, comment with an image ID left out). The digests are computed differently (see
    docs/build.md); the IDs have the times of day in them."""
    return [
        (
            DIGEST.sub(r"\1: ", h["created_by"]),
            bool(h.get("empty_layer")),
            re.sub(r"^FROM [0-9a-f]{12}$", "FROM <id>", h.get("comment", "")),
        )
        for h in cfg["history"][base:]
    ]


@needs_tools
def test_history_matches_buildah(env: Env) -> None:
    """The image's history is buildah's, entry by entry: `created_by` in its words (RUN
    without the word, the line as written after `/bin/sh -c` and the build args with a
    value; `#(nop)` and the instruction unsubstituted for the rest; ARG naming every
    argument with a value; COPY's destination as written, with a space after), the
    `empty_layer` flags, a layer for a RUN that changes nothing, and the `comment` naming
    the image the step started from (`FROM localhost/busybox:latest`, then an ID; none
    on `FROM scratch`'s first step). pyunion wrote BuildKit's text, no comment, and no
    layer for `RUN true`."""
    ctx = env.tmp / "ctx-history"
    _write(ctx / "Containerfile", HISTORY_FILE)
    _write(ctx / "f.txt", "f\n")
    _write(ctx / "d/a", "a\n")
    base = len(Store(env.store).lookup("busybox").config["history"])
    for tag, args in (("hist", ("--build-arg", "C=9", "--label", "k=v")), ("histny", ())):
        target = ("--target", "tiny") if tag == "histny" else ()
        env.buildah(ctx, tag, *args, *target)
        env.build(ctx, "-t", tag, *args, *target)
        (_, theirs), (_, ours) = env.buildah_image(tag), env.pyunion_image(tag)
        skip = base if tag == "hist" else 0
        assert _history(ours, skip) == _history(theirs, skip)
        assert len(ours["rootfs"]["diff_ids"]) == len(theirs["rootfs"]["diff_ids"])
    hist = _history(ours, 0)
    assert hist[0] == ("/bin/sh -c #(nop) ENV T=1", True, "")  # ours: the tiny stage's


@needs_tools
def test_build_output_matches_buildah(env: Env) -> None:
    """What scripts read from `buildah bud`'s output: the image ID bare on the last line
    (`tail -1`), `Successfully tagged localhost/NAME:latest`, and for a step from the
    cache `--> Using cache FULLID`, that step's image. pyunion printed `sha256:ID`,
    `Successfully tagged NAME:latest` and `--> CACHED SHORTID`."""
    ctx = env.tmp / "ctx-output"
    _write(ctx / "Containerfile", "FROM busybox\nUSER root\nRUN echo one > /one\nENV A=1\n")

    def both(*args: str) -> tuple[list[str], list[str]]:
        theirs = sh(*env.bah, "bud", "--layers", "--isolation", "chroot", *args, ctx)
        return theirs.splitlines(), env.build(ctx, *args).stdout.splitlines()

    both("-t", "out")
    for out in both("-t", "out"):
        assert FULL_ID.fullmatch(out[-1]), out[-1]
        assert "Successfully tagged localhost/out:latest" in out
        hits = [line.split()[-1] for line in out if line.startswith("--> Using cache ")]
        assert len(hits) == 3 and all(FULL_ID.fullmatch(h) for h in hits), out
        assert hits[-1] == out[-1]  # the last step's image is the one tagged
    theirs, ours = both("-q")
    assert FULL_ID.fullmatch(theirs[-1]) and FULL_ID.fullmatch(ours[-1])
    # The bare ID names the image, as a script passes it on.
    r = pyunion("run", "--store", env.store, ours[-1], "--", "cat", "/one", timeout=120)
    assert r.stdout == "one\n"


@needs_tools
def test_history_text_keys_the_cache_as_buildah(env: Env) -> None:
    """A step that does the same but is written otherwise (`ENV A=$X` with X=1, then
    `ENV A=1`; `RUN  true` with two spaces) misses the cache, in buildah as in pyunion:
    a hit gives the history text the step itself would write."""
    ctx = env.tmp / "ctx-history-key"
    first = "FROM busybox\nARG X=1\nENV A=$X\nRUN true\n"

    def both() -> tuple[list[bool], list[bool]]:
        theirs = sh(*env.bah, "bud", "--layers", "--isolation", "chroot", ctx)
        return _hits(theirs), _hits(env.build(ctx).stdout)

    _write(ctx / "Containerfile", first)
    both()
    assert both() == ([False, True, True, True],) * 2
    _write(ctx / "Containerfile", first.replace("$X", "1"))
    assert both() == ([False, True, False, False],) * 2
    _write(ctx / "Containerfile", first.replace("$X", "1").replace("RUN true", "RUN  true"))
    assert both() == ([False, True, True, False],) * 2
    ours = Store(env.store).lookup(env.build(ctx, "-q").stdout.split()[-1]).config
    assert ours["history"][-1]["created_by"] == "|1 X=1 /bin/sh -c  true"


# --- the cache ------------------------------------------------------------------------------
CACHE_FILE = """FROM busybox
USER root
ARG MODE=a
RUN echo "mode $MODE" > /mode
COPY app/ /app/
RUN ls -ln /app > /listing
ENV DONE=1
"""


def _steps(out: str) -> list[str]:
    """Per step: 'cached' or 'ran', from the build's output."""
    res = []
    for line in out.splitlines():
        if line.startswith("--> Using cache "):
            res.append("cached")
        elif line.startswith("--> ") and "built in" not in line:
            res.append("ran")
    return res


def _layers(store: str) -> set[str]:
    return set(os.listdir(Path(store) / "layers"))


@needs_tools
def test_cache_rules(env: Env) -> None:
    ctx = env.tmp / "ctx-cache"
    _write(ctx / "Containerfile", CACHE_FILE)
    _write(ctx / "app/a.txt", "one\n")
    _write(ctx / "app/b.txt", "two\n")
    _write(ctx / "app/ignored.log", "noise\n")
    _write(ctx / ".dockerignore", "*.log\napp/*.log\n")
    # Steps: USER, ARG, RUN, COPY, RUN, ENV.
    first = env.build(ctx, "-t", "cache")
    assert _steps(first.stdout) == ["ran"] * 6 or _steps(first.stdout)[0] == "cached"
    image_id = first.stdout.strip().splitlines()[-1]

    before = _layers(env.store)
    t0 = time.monotonic()
    again = env.build(ctx, "-t", "cache")
    elapsed = time.monotonic() - t0
    assert _steps(again.stdout) == ["cached"] * 6
    assert again.stdout.strip().splitlines()[-1] == image_id  # same steps, same image
    assert _layers(env.store) == before
    assert elapsed < 1.5, f"a fully cached rebuild took {elapsed:.2f}s"

    # A build argument no instruction declares, or a copied file's time alone: nothing,
    # as with buildah --layers.
    assert _steps(env.build(ctx, "--build-arg", "UNDECLARED=1").stdout) == ["cached"] * 6
    os.utime(ctx / "app/a.txt", (1, 1))
    assert _steps(env.build(ctx).stdout) == ["cached"] * 6
    # A file the ignore rules exclude changes: nothing is rebuilt.
    _write(ctx / "app/ignored.log", "other noise\n")
    assert _steps(env.build(ctx).stdout) == ["cached"] * 6
    # One copied file's bytes change: from that COPY on.
    _write(ctx / "app/b.txt", "TWO\n")
    assert _steps(env.build(ctx).stdout) == ["cached"] * 3 + ["ran"] * 3
    # Its mode only.
    os.chmod(ctx / "app/b.txt", 0o600)
    assert _steps(env.build(ctx).stdout) == ["cached"] * 3 + ["ran"] * 3
    # Its owner only.
    os.chown(ctx / "app/b.txt", 4321, 4321)
    assert _steps(env.build(ctx).stdout) == ["cached"] * 3 + ["ran"] * 3
    # A new file's name.
    _write(ctx / "app/c.txt", "three\n")
    assert _steps(env.build(ctx).stdout) == ["cached"] * 3 + ["ran"] * 3
    # A build arg the first RUN uses: from that RUN on (the ARG step itself stays).
    r = env.build(ctx, "--build-arg", "MODE=b")
    assert _steps(r.stdout) == ["cached"] * 2 + ["ran"] * 4
    assert _steps(env.build(ctx, "--build-arg", "MODE=b").stdout) == ["cached"] * 6
    # The instruction's text after substitution.
    _write(ctx / "Containerfile", CACHE_FILE.replace("ENV DONE=1", "ENV DONE=2"))
    assert _steps(env.build(ctx).stdout) == ["cached"] * 5 + ["ran"]
    # --no-cache runs everything, and produces the same files.
    assert _steps(env.build(ctx, "--no-cache").stdout) == ["ran"] * 6


STAGES_CACHE_FILE = """FROM busybox AS a
USER root
RUN echo one > /x
COPY d /d
FROM busybox
USER root
COPY --from=a /x /x
RUN echo hi > /hi
COPY f /f
"""


def _hits(out: str) -> list[bool]:
    """Per step, FROM included, whether it came from the cache: `--> Using cache` after
    its `STEP` line (both print it)."""
    res: list[bool] = []
    for line in out.splitlines():
        if re.match(r"(\[\d+/\d+\] )?STEP \d+/\d+: ", line):
            res.append(False)
        elif line.startswith("--> Using cache ") and res:
            res[-1] = True
    return res


@needs_tools
def test_cache_hits_match_buildah(env: Env) -> None:
    """The same changes to a two-stage build hit and miss the cache in the same steps
    as with `buildah bud --layers`. Where they differed: `COPY --from` re-ran when its
    stage had changed but the files it copies had not (it was keyed by the stage's
    image ID); a source directory's own mode, which COPY does not copy, counted; and a
    `--no-cache` build whose stages share steps left the next build re-running them."""
    ctx = env.tmp / "ctx-stages-cache"
    _write(ctx / "Containerfile", STAGES_CACHE_FILE)
    _write(ctx / "d/a", "a\n")
    _write(ctx / "f", "f\n")

    def both(*args: str) -> tuple[list[bool], list[bool]]:
        theirs = sh(*env.bah, "bud", "--layers", "--isolation", "chroot", *args, ctx)
        return _hits(theirs), _hits(env.build(ctx, *args).stdout)

    both()
    cached = [False, True, True, True, False, True, True, True, True]
    assert both() == (cached, cached)
    _write(ctx / "d/a", "A\n")  # stage a's last COPY only: /x is the same
    want = [*cached[:3], False, *cached[4:]]
    assert both() == (want, want)
    os.chmod(ctx / "d", 0o700)
    assert both() == (cached, cached)
    ran = [False] * 9
    assert both("--no-cache") == (ran, ran)
    assert both() == (cached, cached)
    _write(ctx / "d/new", "n\n")
    assert both() == (want, want)


@needs_tools
def test_failing_run_leaves_nothing_half_written(env: Env) -> None:
    ctx = env.tmp / "ctx-fail"
    _write(
        ctx / "Containerfile",
        "FROM busybox\nUSER root\nRUN echo partial > /partial\n"
        "RUN echo doomed > /doomed && exit 7\nRUN echo never\n",
    )
    layers_before = _layers(env.store)
    r = env.build(ctx, "-t", "failed", check=False)
    # The command's status, as `buildah bud` and `podman build` exit (Docker too).
    assert r.returncode == env.buildah_code(ctx) == 7
    assert (
        "STEP 4/5: RUN echo doomed > /doomed && exit 7: the command exited with status 7"
        in r.stderr
    )
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "never" not in r.stdout
    assert "failed" not in pyunion("images", "--store", env.store).stdout
    assert os.listdir(Path(env.store) / "tmp") == []
    new = _layers(env.store) - layers_before
    assert len(new) == 1  # the step before the failure, complete and reusable
    # The step before is cached; the fixed file finishes from there.
    _write(
        ctx / "Containerfile",
        "FROM busybox\nUSER root\nRUN echo partial > /partial\nRUN echo fixed > /fixed\n",
    )
    assert _steps(env.build(ctx, "-t", "failed").stdout) == ["cached", "cached", "ran"]


OWNERS_FILE = """FROM busybox AS owners-base
USER root
ARG A=7
WORKDIR /w/$A/x
USER 0:$A
RUN echo > /ran
USER root
COPY --chown=:users a.txt /group-only
COPY *.none* a.txt /maybe/
ADD --chown=3:4 --chmod=600 t.tar.gz /unpacked/
ENTRYPOINT ["/bin/echo"]
CMD ["x"]
FROM owners-base
ENTRYPOINT []
"""


@needs_tools
def test_owners_and_sources_match_buildah(env: Env) -> None:
    """Edge rules where pyunion differed from buildah: a WORKDIR made at the next RUN
    is the user's with all its missing parents; `--chown=:GROUP` is root's user; a
    pattern matching nothing beside one that matches is no error; ADD's `--chown` and
    `--chmod` leave an archive's members as the archive has them; `ENTRYPOINT []` clears
    the entrypoint (and the base's CMD) instead of failing."""
    ctx = env.tmp / "ctx-owners"
    _write(ctx / "Containerfile", OWNERS_FILE)
    _write(ctx / "a.txt", "a\n")
    _tar_gz(ctx / "t.tar.gz", [("d/", None, 0o750), ("d/f", b"f\n", 0o640)])
    env.buildah(ctx, "owners")
    env.build(ctx, "-t", "owners")
    ours = env.pyunion_image("owners")
    compare(env.buildah_image("owners"), ours)
    assert not ours[1]["config"].get("Entrypoint") and not ours[1]["config"].get("Cmd")
    view = ours[0]
    assert view[b"w"][2:4] == view[b"w/7/x"][2:4] == (0, 7)
    assert view[b"group-only"][2:4] == (0, 100) and b"maybe/a.txt" in view
    assert view[b"unpacked"][1:4] == (0o755, 3, 4)
    assert view[b"unpacked/d/f"][1:4] == (0o640, 123, 456)


ARCHIVE_FILE = """FROM busybox
USER root
RUN mkdir -m 777 /exist && chown 9:9 /exist
ADD dot.tar.gz /new/
ADD dot.tar.gz /exist/
ADD --chown=3:4 --chmod=700 dot.tar.gz /chowned/
ADD links.tar /links/
"""


def _links_tar(path: Path) -> None:
    """A file, then a hard link to it whose header gives other owners, mode and time."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("f")
        ti.uid, ti.gid, ti.mode, ti.mtime, ti.size = 5, 6, 0o600, 1_500_000_000, 2
        tf.addfile(ti, io.BytesIO(b"f\n"))
        ti = tarfile.TarInfo("h")
        ti.type, ti.linkname = tarfile.LNKTYPE, "f"
        ti.uid, ti.gid, ti.mode, ti.mtime = 7, 8, 0o640, 1_400_000_000
        tf.addfile(ti)
    path.write_bytes(buf.getvalue())


@needs_tools
def test_archive_headers_of_the_destination_and_links_match_buildah(env: Env) -> None:
    """An archive made with `tar -C dir -czf x.tgz .` starts with a `./` member: ADD gives
    its owner, mode and time to the destination directory (new or existing, whatever
    --chown and --chmod say), as buildah and Docker's classic builder do; it was
    skipped. A hard link's header sets the owner, mode and time of the file it links
    (the same inode), as it does for them."""
    ctx = env.tmp / "ctx-archive-root"
    _write(ctx / "Containerfile", ARCHIVE_FILE)
    _tar_gz(ctx / "dot.tar.gz", [("./", None, 0o750), ("./a", b"a\n", 0o600)])
    _links_tar(ctx / "links.tar")
    env.buildah(ctx, "archive-root")
    env.build(ctx, "-t", "archive-root")
    ours = env.pyunion_image("archive-root")
    compare(env.buildah_image("archive-root"), ours)
    view = ours[0]
    for d in (b"new", b"exist", b"chowned"):
        assert view[d][1:4] == (0o750, 123, 456), d
    assert view[b"links/f"][1:4] == view[b"links/h"][1:4] == (0o640, 7, 8)
    mnt = env.tmp / "mnt-archive-root"
    mnt.mkdir(exist_ok=True)
    pyunion("mount", "--store", env.store, "archive-root", str(mnt))
    try:
        times = [int(os.lstat(mnt / n).st_mtime) for n in ("new", "exist", "chowned", "links/f")]
    finally:
        if pyunion("umount", str(mnt), check=False).returncode != 0:
            force_unmount(mnt)
    assert times == [1_600_000_000] * 3 + [1_400_000_000]


@needs_tools
def test_archive_owner_out_of_range_is_one_line(env: Env) -> None:
    """A GNU base-256 header holds any owner id: ADD of a member (or of the `./` member
    now given to the destination) owned by 2^40 was a traceback (OverflowError)."""
    ctx = env.tmp / "ctx-archive-owner"
    ctx.mkdir()
    for name, dot in (("file.tar", False), ("dot.tar", True)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
            ti = tarfile.TarInfo("./" if dot else "f")
            ti.uid, ti.type = 2**40, tarfile.DIRTYPE if dot else tarfile.REGTYPE
            tf.addfile(ti)
        (ctx / name).write_bytes(buf.getvalue())
        r = env.build(ctx, "-f", "-", check=False, stdin=f"FROM scratch\nADD {name} /x/\n")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 125 and len(lines) == 1, r.stderr
        assert "owner id 1099511627776 is out of range" in lines[0]


WORKDIR_FILE = """FROM busybox
USER root
WORKDIR /a//b/../c/
RUN pwd > /pwd
COPY f .
USER alice
WORKDIR /tmp/q/../r/
RUN pwd > /tmp/pwd
"""


@needs_tools
def test_workdir_as_written_matches_buildah(env: Env) -> None:
    """An absolute WORKDIR is recorded as written (`/app/` stays `/app/`), as buildah,
    Docker and BuildKit record it; it was cleaned. RUN makes and enters the cleaned
    path (no /a/b, no /tmp/q)."""
    ctx = env.tmp / "ctx-workdir"
    _write(ctx / "Containerfile", WORKDIR_FILE)
    _write(ctx / "f", "f\n")
    env.buildah(ctx, "workdir")
    env.build(ctx, "-t", "workdir")
    ours = env.pyunion_image("workdir")
    compare(env.buildah_image("workdir"), ours)
    assert ours[1]["config"]["WorkingDir"] == "/tmp/q/../r/"
    assert b"a/c/f" in ours[0] and b"a/b" not in ours[0] and b"tmp/q" not in ours[0]


@needs_tools
def test_buildah_flags_match_buildah(env: Env) -> None:
    """The flags scripts pass to `buildah bud` and `podman build` besides the basic ones:
    --label (LABEL steps after the last instruction), --iidfile (the ID, no newline),
    --ignorefile (instead of the context's), and --rm, --force-rm, --pull (from the
    store), --platform (this machine's), --format, accepted; they were refused. A
    relative -f that is not in the working directory is looked for in the context."""
    ctx = env.tmp / "ctx-flags"
    _write(ctx / "sub/flags.Containerfile", "FROM busybox\nLABEL a=1\nCOPY . /c/\n")
    _write(ctx / "keep", "x\n")
    _write(ctx / "drop", "y\n")
    _write(ctx / ".dockerignore", "keep\n")
    _write(env.tmp / "flags.ignore", "drop\n")
    plat = "linux/" + ("amd64" if os.uname().machine == "x86_64" else "arm64")
    flags = ["--label", "x=y", "--label", "a=2", "--ignorefile", str(env.tmp / "flags.ignore")]
    flags += ["--rm", "--force-rm=false", "--pull", "--platform", plat, "--format", "docker"]
    flags += ["-f", "sub/flags.Containerfile"]  # not in the tests' working directory
    env.buildah(ctx, "flags", *flags, "--iidfile", str(env.tmp / "flags.theirs"))
    r = env.build(ctx, "-t", "flags", *flags, "--iidfile", str(env.tmp / "flags.ours"))
    ours = env.pyunion_image("flags")
    compare(env.buildah_image("flags"), ours)
    assert ours[1]["config"]["Labels"] == {"a": "2", "x": "y"}
    assert b"c/keep" in ours[0] and b"c/drop" not in ours[0] and b"c/sub" in ours[0]
    assert [h["created_by"] for h in ours[1]["history"][-2:]] == [
        '/bin/sh -c #(nop) LABEL "x"="y"',
        '/bin/sh -c #(nop) LABEL "a"="2"',
    ]
    iid = (env.tmp / "flags.ours").read_text()
    assert iid == "sha256:" + r.stdout.splitlines()[-1]  # the file: with `sha256:`
    assert len((env.tmp / "flags.theirs").read_text()) == len(iid)  # buildah's: the same form
    r = subprocess.run(  # no context: the working directory, as buildah takes it
        [*PYUNION, "build", "--store", env.store, "-q", "-f", "sub/flags.Containerfile"],
        cwd=ctx,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    named = env.build(ctx, "-q", "-f", "sub/flags.Containerfile").stdout.strip()
    assert r.returncode == 0 and r.stdout.strip() == named, r.stderr
    for bad, message in (("--pull=always", "never pulls"), ("--platform=linux/s390x", "only")):
        r = env.build(ctx, "-f", "sub/flags.Containerfile", bad, check=False)
        assert r.returncode == 125 and message in r.stderr, r.stderr


@needs_tools
def test_scratch_matches_buildah(env: Env) -> None:
    """`FROM scratch` starts with PATH in Env, as buildah and BuildKit have it (it had none)."""
    ctx = env.tmp / "ctx-scratch"
    _write(ctx / "Containerfile", "FROM scratch\nENV A=1\nCOPY a.txt /\n")
    _write(ctx / "a.txt", "a\n")
    env.buildah(ctx, "scratch")
    env.build(ctx, "-t", "scratch")
    ours = env.pyunion_image("scratch")
    compare(env.buildah_image("scratch"), ours)
    assert ours[1]["config"]["Env"][0].startswith("PATH=/usr/local/sbin:")


@needs_tools
def test_pyunion_only_features(env: Env) -> None:
    """What buildah 1.28 lacks or does differently: heredocs, --target, ONBUILD, --squash."""
    ctx = env.tmp / "ctx-extra"
    _write(
        ctx / "Containerfile",
        """# escape=`
FROM busybox AS base
USER root
ONBUILD RUN echo triggered > /triggered
RUN <<EOF
echo one > /heredoc
echo two >> /heredoc
EOF
COPY <<EOT /etc/generated.conf
answer=42
EOT

FROM base AS child
RUN echo continued `
    > /continued
RUN true
COPY --from=busybox /etc/passwd /copied-passwd
HEALTHCHECK --interval=30s --retries=3 CMD wget -q -O- http://localhost/ || exit 1

FROM scratch AS tiny
COPY --from=busybox /bin/busybox /bin/busybox
CMD ["/bin/busybox", "echo", "from scratch"]

FROM busybox AS unused
RUN exit 1
""",
    )
    r = env.build(ctx, "--target", "child", "-t", "child")
    assert "unused" not in r.stdout  # a stage the target does not need is not built
    view, cfg = env.pyunion_image("child")
    assert {b"triggered", b"heredoc", b"etc/generated.conf", b"continued", b"copied-passwd"} <= set(
        view
    )
    assert "OnBuild" not in cfg["config"]  # triggers run once, in the child
    assert cfg["config"]["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q -O- http://localhost/ || exit 1"],
        "Interval": 30 * 10**9,
        "Retries": 3,
    }
    nop = next(h for h in cfg["history"] if h["created_by"] == "/bin/sh -c true")
    assert "empty_layer" not in nop  # nothing changed: an empty layer, as buildah's
    r = pyunion(
        "run",
        "--store",
        env.store,
        "child",
        "--",
        "cat",
        "/heredoc",
        "/etc/generated.conf",
        timeout=120,
    )
    assert r.stdout == "one\ntwo\nanswer=42\n"
    base_layers = len(Store(env.store).lookup("busybox").diff_ids)
    env.build(ctx, "--target", "child", "--squash", "-t", "squashed")
    sq_view, sq_cfg = env.pyunion_image("squashed")
    assert sq_view == view
    assert len(sq_cfg["rootfs"]["diff_ids"]) == base_layers + 2  # one per stage: base, child
    env.build(ctx, "--target", "tiny", "-t", "tiny")
    tiny_view, tiny_cfg = env.pyunion_image("tiny")
    assert set(tiny_view) == {b"bin", b"bin/busybox"} and len(tiny_cfg["rootfs"]["diff_ids"]) == 1
    r = pyunion("run", "--store", env.store, "tiny", timeout=120)
    assert r.stdout == "from scratch\n"
    hist = json.loads(pyunion("history", "--format", "json", "child", "--store", env.store).stdout)
    assert hist[0]["id"].startswith("sha256:")
    assert hist[0]["createdBy"].startswith("/bin/sh -c #(nop) HEALTHCHECK ")
    table = pyunion("history", "child", "--store", env.store).stdout.splitlines()
    assert table[0].split() == ["IMAGE", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]


@needs_tools
def test_bad_input_is_one_line(env: Env) -> None:
    ctx = env.tmp / "ctx-bad"
    ctx.mkdir()
    os.symlink("/etc/passwd", ctx / "escape")
    cases = {
        "FROM busybox\nFROB x\n": "unknown instruction: FROB",
        "RUN true\n": "no FROM before RUN",
        "FROM nosuchimage\n": "FROM nosuchimage: no such image in the store",
        "FROM busybox\nADD https://example.org/x /x\n": "remote sources need a network",
        "FROM busybox\nCOPY missing /x\n": "cannot read 'missing'",
        "FROM busybox\nCOPY escape /x\n": "cannot read 'escape'",
        "FROM busybox\nENV A=${B:?must_be_set}\n": "B: must_be_set",
        "FROM busybox\nRUN --mount=type=cache,target=/x true\n": "RUN --mount is not supported",
        "FROM busybox\nRUN --network=bridge true\n": "RUN --network=bridge: none, host or default",
    }
    for text, message in cases.items():
        r = env.build(ctx, "-f", "-", check=False, stdin=text)
        assert r.returncode == 125, text  # buildah's and podman's for an error of theirs
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (text, r.stderr)
        assert "Traceback" not in r.stderr
    _write(ctx / "Containerfile", "FROM busybox\nCOPY missing /x\n")
    assert env.build(ctx, check=False).returncode == env.buildah_code(ctx) == 125


@needs_tools
def test_run_network(env: Env) -> None:
    """RUN steps get the host's network (a connection, as buildah's) unless RUN --network=none or
    `pyunion build --network none` says otherwise; default is the build's."""
    ctx = env.tmp / "ctx-net"
    ctx.mkdir()
    text = (
        "FROM busybox\nUSER root\n"
        "RUN ls /sys/class/net > /default\n"
        "RUN --network=none ls /sys/class/net > /none\n"
        "RUN --network=host ls /sys/class/net > /host\n"
    )
    host = "".join(f"{n}\n" for n in sorted(os.listdir("/sys/class/net")))
    assert host != "lo\n"
    for opts, default in (((), host), (("--network", "none"), "lo\n")):
        env.build(ctx, "-f", "-", "-t", "net", *opts, stdin=text)
        r = pyunion("run", "--store", env.store, "net", "--", "cat", "/default", "/none", "/host")
        assert r.stdout == default + "lo\n" + host, r.stderr
    r = env.build(ctx, "-f", "-", "--network", "bridge", check=False, stdin=text)
    assert r.returncode == 125 and "unsupported network mode 'bridge'" in r.stderr, r.stderr


def test_run_sees_buildahs_marks(env: Env) -> None:
    """A RUN finds buildah's /run/.containerenv and no TERM (buildah's RUN sets none, where
    `pyunion run`, as podman, sets xterm); the marker's mount point is left out of the layer."""
    ctx = env.tmp / "ctx-marks"
    ctx.mkdir()
    text = 'FROM busybox\nUSER root\nRUN test -f /run/.containerenv && echo "[$TERM]" > /marks\n'
    env.build(ctx, "-f", "-", "-t", "marks", stdin=text)
    r = pyunion("run", "--store", env.store, "marks", "--", "cat", "/marks")
    assert r.stdout == "[]\n", r.stderr
    view, _ = env.pyunion_image("marks")
    assert b"run/.containerenv" not in view and b"marks" in view


def _build_within(env: Env, ctx: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`pyunion build` that must answer within 60 s (a hang is the failure looked for)."""
    return subprocess.run(
        [*PYUNION, "build", "--store", env.store, *args, str(ctx)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@needs_tools
def test_special_files_in_the_context_are_never_read(env: Env) -> None:
    """A FIFO in the context: `ADD fifo` opened it to look for an archive and hung the
    build. Only regular files are read; a FIFO is copied as a FIFO (buildah does not
    fail either). A FIFO as the ignore file is one line, not a hang."""
    ctx = env.tmp / "ctx-fifo"
    _write(ctx / "Containerfile", "FROM busybox\nCOPY fifo /copied\nADD fifo /added\n")
    os.mkfifo(ctx / "fifo")
    r = _build_within(env, ctx, "-t", "fifo")
    assert r.returncode == 0, r.stderr
    view, _ = env.pyunion_image("fifo")
    for name in (b"copied", b"added"):
        assert stat.S_ISFIFO(view[name][0]), view[name]
    os.mkfifo(ctx / ".dockerignore")
    r = _build_within(env, ctx, "-t", "fifo2")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert ".dockerignore" in r.stderr and "not a regular file" in r.stderr


@needs_tools
def test_a_base_image_whose_passwd_is_a_fifo(env: Env) -> None:
    """`COPY --chown=NAME` reads the image's /etc/passwd: a FIFO there hung the build.
    It is read by the rule `pyunion run` uses (a regular file, bounded): one line."""
    ctx = env.tmp / "ctx-passwd"
    _write(ctx / "f", "x\n")
    _write(
        ctx / "Containerfile", "FROM busybox\nUSER root\nRUN rm /etc/passwd && mkfifo /etc/passwd\n"
    )
    assert _build_within(env, ctx, "-t", "fifo-passwd").returncode == 0
    _write(ctx / "Containerfile", "FROM fifo-passwd\nCOPY --chown=alice f /f\n")
    r = _build_within(env, ctx, "-t", "never")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--chown=alice: the image's /etc/passwd is not a regular file" in r.stderr


def test_a_context_file_swapped_or_grown_after_the_walk(tmp_path: Path) -> None:
    """What the walk saw is what is read: a file replaced by a FIFO after the walk (a
    read would hang) or one that grew (an endless file would fill the layer) is an
    error, and no more than the walked size is ever read."""
    from unionfs.build.sources import SourceTree
    from unionfs.errors import UserError

    (tmp_path / "a").write_text("a\n")
    (tmp_path / "b").write_text("b\n")
    tree = SourceTree(str(tmp_path), None, "the build context")
    try:
        sources = [tree.source("a"), tree.source("b")]
        tree.digest(sources)  # fine as walked
        os.unlink(tmp_path / "a")
        os.mkfifo(tmp_path / "a")
        with pytest.raises(UserError, match=r"'a' .*changed while it was read"):
            tree.digest(sources[:1])
        with open(tmp_path / "b", "a") as f:
            f.write("more\n")
        with pytest.raises(UserError, match=r"'b' .*changed while it was read"):
            tree.digest(sources[1:])
    finally:
        tree.close()


def test_a_containerfile_doubling_a_variable_is_one_line(tmp_path: Path) -> None:
    """40 lines each doubling a variable ask for 2^40 characters: the expansion stops
    at its bound with one line, at once (a value was split per character: minutes).
    Without the cache: with it, line 17's state (its values in Env and in the history)
    is already more than a cache entry may be, which stops the build one line earlier."""
    lines = ["FROM scratch", "ENV A0=" + "x" * 32]
    lines += [f"ENV A{i}=${{A{i - 1}}}${{A{i - 1}}}" for i in range(1, 40)]
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx/Containerfile").write_text("\n".join(lines) + "\n")
    ctx = str(tmp_path / "ctx")
    started = time.monotonic()
    r = subprocess.run(
        [*PYUNION, "build", "--store", str(tmp_path / "s"), "--layers=false", "-t", "bomb", ctx],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "line 18: ENV: expands to more than 1048576 characters" in r.stderr
    assert time.monotonic() - started < 20


def test_a_containerfile_using_a_big_variable_many_times_is_one_line(tmp_path: Path) -> None:
    """Each word stays under its bound, but one line that names a 512 KiB variable 300
    times asked for 150 MiB, and the next such line as much again: the build took 2.2
    GB and 25 s, then wrote a config no command could read back ('too large to read');
    a 16 MiB Containerfile of such words asks for terabytes. What all the words of a
    build take in is bounded too. Run under a 1.5 GiB address-space limit (the old code
    then dies of MemoryError)."""
    lines = ["FROM scratch", "ENV A=" + "x" * 1024]
    lines += ["ENV A=$A$A"] * 9  # 512 KiB, under the bound of one word
    lines += ["ENV " + " ".join(f"B{i}=$A" for i in range(300))] * 4
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx/Containerfile").write_text("\n".join(lines) + "\n")

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))

    started = time.monotonic()
    r = subprocess.run(
        [*PYUNION, "build", "--store", str(tmp_path / "s"), "-t", "bomb", str(tmp_path / "ctx")],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
        check=False,
    )
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "line 12: ENV: the Containerfile's variables expand to more than" in r.stderr, r.stderr
    assert time.monotonic() - started < 20
    assert not list((tmp_path / "s/blobs/sha256").iterdir())


def _cache_bytes(store: Path) -> int:
    cache = store / "build-cache"
    return sum(f.stat().st_size for f in cache.iterdir()) if cache.exists() else 0


@pytest.mark.timeout(120)
def test_a_containerfile_of_many_metadata_steps_does_not_fill_the_disk(tmp_path: Path) -> None:
    """Each step's state is a cache entry holding the whole config: a 1 MiB ENV and 200
    LABEL lines wrote 200 MiB into the store, and a 200 KB Containerfile of 20,000 ENV
    lines 5 GB in five minutes (its history grows by a line a step), terabytes for a
    16 MiB one. A build writes at most 64 MiB of cache entries, each one at most what
    the cache reads back (4 MiB: a bigger one was written and never read)."""
    (tmp_path / "ctx").mkdir()
    big = ["FROM scratch", "ENV A=" + "x" * (1 << 15)] + ["ENV A=$A$A"] * 5  # 1 MiB
    lines = big + [f"LABEL n={i}" for i in range(200)]
    (tmp_path / "ctx/Containerfile").write_text("\n".join(lines) + "\n")
    r = subprocess.run(
        [*PYUNION, "build", "--store", str(tmp_path / "s"), "-q", str(tmp_path / "ctx")],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "more than 67108864 bytes of build cache" in r.stderr, r.stderr
    assert _cache_bytes(tmp_path / "s") < (64 + 5) << 20

    five = "ENV " + " ".join(f"B{i}=$A" for i in range(5))
    (tmp_path / "ctx/Containerfile").write_text("\n".join([*big, five]) + "\n")
    r = subprocess.run(
        [*PYUNION, "build", "--store", str(tmp_path / "t"), "-q", str(tmp_path / "ctx")],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "more than the 4194304 pyunion reads back" in r.stderr, r.stderr
    assert max(f.stat().st_size for f in (tmp_path / "t/build-cache").iterdir()) <= 4 << 20

    ctx = str(tmp_path / "ctx")
    # Without the cache, the same config was written into the store as a blob, which the
    # build's last step then could not read back: a 5 MiB blob left for nothing.
    r = subprocess.run(
        [*PYUNION, "build", "--store", str(tmp_path / "u"), "--layers=false", "-q", ctx],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "more than the 4194304 pyunion reads back" in r.stderr, r.stderr
    assert list((tmp_path / "u/blobs/sha256").iterdir()) == []


# --- pure rules (no root needed) ---------------------------------------------------------------
def test_flags_keep_their_non_ascii_text() -> None:
    """The parser library hands flags back as UTF-8 read as Latin-1: `--chown=josé` came
    as a user `josÃ©` that does not exist, `--from=²` was said to be `--from=Â²`."""
    df = parse(
        "FROM scratch AS base\nFROM scratch\n"
        "COPY --from=² --chown=josé:ü x /x\nCOPY --chown=Ã© y /y\n"
    )
    first, second = df.stages[1].instructions
    assert first.flags == {"from": "²", "chown": "josé:ü"}
    assert second.flags == {"chown": "Ã©"}  # written so: kept as written


def test_substitution_rules() -> None:
    lx = Lexer()
    env = {"A": "apple", "E": "", "P": "/usr/local/bin/tool.tar.gz"}
    cases = {
        "$A": "apple",
        "${A}": "apple",
        "x${A}y": "xappley",
        "'$A'": "$A",
        '"$A b"': "apple b",
        r"\$A": "$A",
        "${U:-dflt}": "dflt",
        "${E:-dflt}": "dflt",
        "${E-dflt}": "",
        "${A:+alt}": "alt",
        "${U:+alt}": "",
        "${P##*/}": "tool.tar.gz",
        "${P#*/}": "usr/local/bin/tool.tar.gz",
        "${P%%.*}": "/usr/local/bin/tool",
        "${P%.*}": "/usr/local/bin/tool.tar",
        "${A/p/P}": "aPple",
        "${A//p/P}": "aPPle",
        "${A//*/x}": "x",  # no second, empty match at the end (Go, the shell)
        "${A/p*/x}": "ax",
        "${A%%p*}": "a",
        "$": "$",
        "a$-b": "ab",
    }
    for word, want in cases.items():
        assert lx.word(word, env) == want, word
    assert Lexer("`").word("a`$A", env) == "a$A"
    assert lx.process("${A}-$E-$U", env).used == {"A", "E"}
    with pytest.raises(SubstitutionError):
        lx.word("${U:?needed}", env)
    with pytest.raises(SubstitutionError):
        lx.word("${A", env)


def test_ignore_rules() -> None:
    m = Matcher(
        [
            "# comment",
            "docs",
            "!docs/README.md",
            "**/*.pyc",
            "/secret",
            "*.log",
            "a/**/z",
            "  spaced  ",
            "[ab]?.txt",
        ]
    )
    excluded = [
        "docs",
        "docs/x/y",
        "c.pyc",
        "a/b/c.pyc",
        "secret",
        "secret/s",
        "x.log",
        "a/z",
        "a/b/c/z",
        "spaced",
        "ax.txt",
    ]
    kept = ["docs/README.md", "x/secret", "d/x.log", "README.md", "cx.txt", "a/zz"]
    for p in excluded:
        assert m.excluded(p), p
    for p in kept:
        assert not m.excluded(p), p


def test_ignore_rules_read_as_docker_reads_them() -> None:
    """Go's classes are complemented by `^` only: `[!a]1` is `!1` or `a1`. Docker
    looks for `#` before trimming: ` #secret` is the pattern `#secret`. POSIX
    classes (`[[:alpha:]]`) are not supported, but do not fail."""
    m = Matcher(["[!a]1", "[^x]2", " #secret", "#comment", "[[:alpha:]]"])
    for p in ("!1", "a1", "y2", "#secret"):
        assert m.excluded(p), p
    for p in ("b1", "x2", "#comment", "comment", "secret", "d/#secret", "a"):
        assert not m.excluded(p), p
    assert Matcher([" \t#x"]).excluded("#x") and not Matcher(["#x", "# y"]).excluded("#x")


def test_source_glob_rules(tmp_path: Path) -> None:
    """COPY sources match as Go's filepath.Match: per component, classes, escapes."""
    for name in ("a1", "b2", "c3", "ab", "star*", "x.txt", "sub/y.txt", "sub/deep/z.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    tree = SourceTree(str(tmp_path), None, "the context")
    try:
        assert tree.expand("?[0-9]") == ["a1", "b2", "c3"]
        assert tree.expand("[^a]?") == ["b2", "c3"]
        assert tree.expand("[ab]*") == ["a1", "ab", "b2"]
        assert tree.expand("star\\*") == ["star*"]
        assert tree.expand("*.txt") == ["x.txt"]  # `*` stays within one component
        assert tree.expand("*/*.txt") == ["sub/y.txt"]
        # In Go `[!a]` is the class of '!' and 'a' (ignore files take `!` as `^`).
        assert tree.expand("[!a]1") == ["a1"]
        with pytest.raises(UserError, match=r"unclosed '\['"):
            tree.expand("[ab")
        with pytest.raises(UserError, match=r"bad range z-a"):
            tree.expand("[z-a]")
    finally:
        tree.close()


def test_ignore_exceptions_below_an_excluded_directory(tmp_path: Path) -> None:
    """An excluded directory is searched for `!` exceptions only when an exception's
    text starts with its path, as Docker's walks and buildah 1.28 do (checked with
    `buildah bud`): `!*/sub/yes` and `!x/**/keep` bring nothing back, `!d/sub2/yes`
    does (it was every exception, whatever its text)."""
    for name in ("d/sub/yes", "d/sub/no", "d/sub2/yes", "d/sub2/no", "x/a/keep", "x/top"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    rules = ["*/sub", "!*/sub/yes", "*/sub2", "!d/sub2/yes", "x/**", "!x/**/keep", "!x/top"]
    m = Matcher(rules)
    assert not m.may_include_below("d/sub") and m.may_include_below("d/sub2")
    assert m.may_include_below("x") and not m.may_include_below("x/a")
    tree = SourceTree(str(tmp_path), m, "the context")
    try:
        names = [e.rel for e in tree.source("").entries if e.rel]
    finally:
        tree.close()
    assert names == ["d", "d/sub2", "d/sub2/yes", "x", "x/top"]

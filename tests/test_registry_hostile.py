"""A hostile registry cannot make `pyunion pull` read without end.

Every answer a registry (or its token server) sends is read up to a bound, as
containers/image does (1 MiB for error bodies and tokens, 4 MiB for
manifests): a server that streams forever gets one line and a closed
connection, not the machine's memory. The servers here are small hand-made
ones, since the point is that they misbehave: they also loop redirects, name
upload locations that are not http(s) or on another host, and list one blob
under two DiffIDs; each is one line, and credentials stay on the registry's
origin.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from ocilayout import CONFIG, LAYER_TAR, Layout, sha
from support import pyunion
from test_image import make_layout, tar_bytes

from unionfs.image import Store, import_image

CHUNK = b"x" * 65536
GIVE_UP = 1 << 30  # the server stops after 1 GiB, whatever the client does


class _Hostile(http.server.ThreadingHTTPServer):
    daemon_threads = True
    mode = ""
    sent = 0


def _handler(srv: _Hostile) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # no Content-Length: the body ends when we close

        def log_message(self, *args: Any) -> None:
            pass

        def endless(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                while srv.sent < GIVE_UP:
                    self.wfile.write(CHUNK)
                    srv.sent += len(CHUNK)
            except OSError:
                pass  # the client hung up: what we want

        def small(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            port = srv.server_address[1]
            if srv.mode == "retry-after" and self.path != "/v2/":
                self.small(503, {"Retry-After": "\u00b2"})  # busy; back in "²" (superscript 2)
            elif self.path == "/v2/":
                if srv.mode == "ping":
                    self.endless(200)
                elif srv.mode == "token":
                    realm = f'Bearer realm="http://127.0.0.1:{port}/token",service="hostile"'
                    self.small(401, {"WWW-Authenticate": realm})
                else:
                    self.small(200)
            elif self.path.startswith("/token"):
                self.endless(200)
            elif srv.mode == "error":
                self.endless(404)
            else:
                self.endless(200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})

    return Handler


@pytest.fixture
def hostile() -> Iterator[_Hostile]:
    srv = _Hostile(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    srv.RequestHandlerClass = _handler(srv)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _cli(
    *args: str, store: Path, retry: str = "1", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """pyunion ARGS against a test registry: plain HTTP, `retry` retries 0.05 s apart."""
    return pyunion(
        *args,
        "--tls-verify=false",
        "--retry",
        retry,
        "--retry-delay",
        "0.05",
        "--store",
        str(store),
        check=False,
        timeout=timeout,
    )


def _one_line(r: subprocess.CompletedProcess[str], said: str) -> None:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], r.stderr


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("ping", "/v2/ is larger than"),
        ("token", "token server"),
        ("error", "answer"),
        ("manifest", "manifest of"),
    ],
)
def test_an_endless_answer_is_cut_short(
    hostile: _Hostile, tmp_path: Path, mode: str, said: str
) -> None:
    """GET /v2/, the token, an error body, a manifest: each streams forever. The pull
    stops reading after the bound and says so in one line; nothing is stored."""
    hostile.mode = mode
    host = f"127.0.0.1:{hostile.server_address[1]}"
    r = _cli("pull", f"{host}/evil:1", store=tmp_path / "s", retry="0")
    _one_line(r, said)
    assert "larger than" in r.stderr, r.stderr
    assert hostile.sent < 64 << 20, f"read {hostile.sent >> 20} MiB of an endless answer"


def test_a_retry_after_that_is_no_number_is_one_line(hostile: _Hostile, tmp_path: Path) -> None:
    """`Retry-After: ²`: str.isdigit() took it, float() refused it, and the pull ended in a
    ValueError traceback; it is no number of seconds, so the usual delay is waited."""
    hostile.mode = "retry-after"
    host = f"127.0.0.1:{hostile.server_address[1]}"
    r = _cli("pull", f"{host}/evil:1", store=tmp_path / "s")
    _one_line(r, "503")


# --- a registry that answers with hostile URLs, documents and locations ------------------------
class _Static(http.server.ThreadingHTTPServer):
    """Serves one image (`manifest`, `blobs`) as x:latest, bent by `mode`; takes pushes
    (uploads go to `upload_to`); records (method, path, Authorization) per request."""

    daemon_threads = True

    def __init__(self, host: str) -> None:
        super().__init__((host, 0), _StaticHandler)
        self.mode = ""
        self.manifest = b""
        self.blobs: dict[str, bytes] = {}
        self.upload_to = "/up/1"
        self.need_auth = False
        self.redirect_to = ""
        self.seen: list[tuple[str, str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"


class _StaticHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Static

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_one(self) -> None:
        srv, path = self.server, self.path.split("?")[0]
        auth = self.headers.get("Authorization")
        srv.seen.append((self.command, self.path, auth))
        if n := int(self.headers.get("Content-Length") or 0):
            self.rfile.read(n)
        if srv.need_auth and auth is None:
            self.reply(401, b"{}", {"WWW-Authenticate": 'Basic realm="r"'})
        elif path == "/v2/":
            self.reply(200, b"{}")
        elif self.command == "POST":
            self.reply(202, b"", {"Location": srv.upload_to})
        elif self.command in ("PUT", "PATCH"):
            self.reply(201, b"", {"Location": "/done"})
        elif "/manifests/" in path and srv.mode == "escapes-json":
            msg = "no \x1b]0;PWNED\x07\x1b[2J\nsecond line"
            self.reply(403, json.dumps({"errors": [{"code": "DENIED", "message": msg}]}).encode())
        elif "/manifests/" in path and srv.mode == "escapes-text":
            self.reply(403, b"no \x1b]0;PWNED\x07\x1b[2J\x9b31m\nsecond line")
        elif "/manifests/" in path:
            self.reply(
                200, srv.manifest, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
            )
        elif "/blobs/" in path and srv.mode == "redirect-loop":
            self.reply(302, b"", {"Location": self.path})
        elif "/blobs/" in path and srv.mode == "redirect-away" and self.command == "GET":
            self.reply(307, b"", {"Location": srv.redirect_to})
        elif srv.mode == "phish":  # blob storage that wants credentials for itself
            if path == "/token":
                self.reply(200, b'{"token": "t"}')
            else:
                realm = f'Bearer realm="{srv.url}/token",service="x",scope="x"'
                self.reply(401, b"{}", {"WWW-Authenticate": realm})

        elif "/blobs/" in path and path.rsplit("/", 1)[1] in srv.blobs:
            self.reply(200, srv.blobs[path.rsplit("/", 1)[1]])
        else:
            self.reply(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}')

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = handle_one


@pytest.fixture
def static() -> Iterator[Callable[[str], _Static]]:
    servers: list[_Static] = []

    def start(host: str = "127.0.0.1") -> _Static:
        srv = _Static(host)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def _serve_image(srv: _Static, layers: list[bytes], diff_ids: list[str]) -> None:
    """`layers` (blobs, repeats allowed) with the config's `diff_ids`, as x:latest."""
    srv.blobs = {sha(b): b for b in layers}
    cfg = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    srv.blobs[sha(cfg)] = cfg
    srv.manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": CONFIG, "digest": sha(cfg), "size": len(cfg)},
            "layers": [{"mediaType": LAYER_TAR, "digest": sha(b), "size": len(b)} for b in layers],
        }
    ).encode()


def test_a_redirect_loop_is_one_line(static: Any, tmp_path: Path) -> None:
    """A blob that redirects to itself: one line (before: httpx.TooManyRedirects traceback)."""
    srv = static()
    layer = tar_bytes([("f", b"x")])
    _serve_image(srv, [layer], [sha(layer)])
    srv.mode = "redirect-loop"
    r = _cli("pull", f"{srv.url[7:]}/x:latest", store=tmp_path / "s")
    _one_line(r, "redirects too many times")


@pytest.mark.parametrize("mode", ["escapes-json", "escapes-text"])
def test_a_registry_error_message_reaches_the_terminal_escaped(
    static: Any, tmp_path: Path, mode: str
) -> None:
    """An error body (JSON or text) whose message holds terminal control sequences and a
    newline: one line, the controls shown escaped (before: an error's message went to the
    terminal as the registry wrote it, so a registry could retitle or clear it)."""
    srv = static()
    srv.mode = mode
    r = _cli("pull", f"{srv.url[7:]}/x:latest", store=tmp_path / "s")
    _one_line(r, "\\x1b]0;PWNED\\x07")
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr, r.stderr


@pytest.fixture
def pushable(tmp_path: Path) -> Path:
    """A store holding one small image, `img`."""
    store = tmp_path / "store"
    lay = make_layout(tmp_path / "lay", [tar_bytes([("f", b"pushed")])])
    import_image(str(lay), Store(str(store)), tag="img")
    return store


@pytest.mark.parametrize("loc", ["file:///etc/passwd", "ftp://h/x", "gopher:x"])
def test_an_upload_location_that_is_not_http_is_one_line(
    static: Any, pushable: Path, loc: str
) -> None:
    """(before: httpx.InvalidURL traceback)"""
    srv = static()
    srv.upload_to = loc
    r = _cli("push", "img", f"{srv.url[7:]}/x:latest", store=pushable)
    _one_line(r, "not an http(s) URL")


def test_a_blob_listed_twice_with_two_diff_ids_is_refused(static: Any, tmp_path: Path) -> None:
    """The same blob under two DiffIDs cannot be both: refused before anything is stored, as
    import refuses it (before: the pull tagged an image whose second layer was missing)."""
    srv = static()
    layer, other = tar_bytes([("f", b"x")]), tar_bytes([("g", b"y")])
    _serve_image(srv, [layer, layer], [sha(layer), sha(other)])
    store = tmp_path / "s"
    r = _cli("pull", f"{srv.url[7:]}/x:latest", store=store)
    _one_line(r, "layer 2 is the blob of layer 1 again")
    assert json.loads((store / "index.json").read_text())["manifests"] == []
    lay = tmp_path / "lay"
    layout = Layout(lay)
    d = layout.put(layer, LAYER_TAR)
    layout.tag(layout.image([d, d], [sha(layer), sha(other)], {"os": "linux"}), "latest")
    r = pyunion("image", "import", "-q", str(lay), "--store", str(store), check=False)
    _one_line(r, "layer 2 is the blob of layer 1 again")


def test_credentials_go_only_to_the_registrys_origin(static: Any, pushable: Path) -> None:
    """An upload Location on another origin gets no Authorization (before: Basic u:p sent
    to whatever host the registry named), while the registry itself gets it."""
    srv, other = static(), static("127.0.0.2")
    srv.need_auth = True
    srv.upload_to = f"{other.url}/up/1"
    r = pyunion(
        "push",
        "--tls-verify=false",
        "--creds",
        "u:p",
        "--store",
        str(pushable),
        "img",
        f"{srv.url[7:]}/x:latest",
        check=False,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert [m for m, _, _ in other.seen].count("PUT") == 2, other.seen  # layer and config
    assert all(a is None for _, _, a in other.seen), other.seen
    assert any(m == "PUT" and "/manifests/" in p and a for m, p, a in srv.seen), srv.seen


def test_a_challenge_from_where_a_blob_redirects_is_not_adopted(
    static: Any, tmp_path: Path
) -> None:
    """The registry redirects a blob to another host, which answers 401 with a token realm
    of its own: it gets no credentials (before: Basic alice:s3cret went to its realm, and
    its token to the registry), and the pull fails in one line."""
    srv, other = static(), static("127.0.0.2")
    layer = tar_bytes([("f", b"x")])
    _serve_image(srv, [layer], [sha(layer)])
    srv.need_auth, srv.mode = True, "redirect-away"
    srv.redirect_to = f"{other.url}/storage/blob"
    other.mode = "phish"
    r = _cli("pull", "--creds", "alice:s3cret", f"{srv.url[7:]}/x:latest", store=tmp_path / "s")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert other.seen and all(a is None for _, _, a in other.seen), other.seen
    assert not [p for _, p, _ in other.seen if p.startswith("/token")], other.seen
    assert all(a is None or a.startswith("Basic") for _, _, a in srv.seen), srv.seen


# --- compressed answers ------------------------------------------------------------------------
@functools.cache
def _bomb(encoding: str) -> bytes:
    """Zeros compressed as `encoding`: zstd 2 GiB in 64 KiB, gzip 256 MiB in 255 KiB."""
    zeros = bytes(1 << 20)
    if encoding == "gzip":
        z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return b"".join(z.compress(zeros) for _ in range(256)) + z.flush()
    w = zstandard.ZstdCompressor(level=1).compressobj()
    return b"".join(w.compress(zeros) for _ in range(2048)) + w.flush()


class _Encoded(http.server.ThreadingHTTPServer):
    """Answers every request with `body` sent as `Content-Encoding: encoding` (after a Bearer
    challenge to /token in mode "token"), and 404 with it in mode "error"."""

    daemon_threads = True
    mode, encoding, body = "", "", b""


class _EncodedHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: _Encoded

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        if srv.mode == "token" and self.path == "/v2/":
            realm = f'Bearer realm="http://127.0.0.1:{srv.server_address[1]}/token"'
            self.send_response(401)
            self.send_header("WWW-Authenticate", realm)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = 404 if srv.mode == "error" and self.path != "/v2/" else 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", srv.encoding)
        self.send_header("Content-Length", str(len(srv.body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(srv.body)


@pytest.fixture
def encoded() -> Iterator[_Encoded]:
    srv = _Encoded(("127.0.0.1", 0), _EncodedHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=120)\n"
    "sys.stderr.write(r.stderr)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(r.returncode)\n"
)


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
@pytest.mark.parametrize("mode", ["ping", "token", "error"])
def test_a_compressed_answer_is_bounded_as_it_is_decoded(
    encoded: _Encoded, tmp_path: Path, encoding: str, mode: str
) -> None:
    """GET /v2/, the token, an error body: a few KiB sent as `Content-Encoding: zstd` or
    `gzip` that inflate to 2 GiB or 256 MiB. One line, and pyunion never holds more than a few
    bounds' worth (before: httpx inflated each 64 KiB read whole, 2 GiB of zstd at once,
    4.2 GB of RSS for one answer)."""
    encoded.mode, encoded.encoding = mode, encoding
    encoded.body = _bomb(encoding)
    host = f"127.0.0.1:{encoded.server_address[1]}"
    cmd = [sys.executable, "-m", "unionfs", "pull", "--tls-verify=false", "--retry", "0"]
    cmd += ["--store", str(tmp_path / "s"), f"{host}/evil:1"]
    r = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True, text=True, timeout=180
    )
    assert r.returncode not in (0, 2) and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    peak_mib = int(r.stdout) >> 10
    assert peak_mib < 300, f"peak RSS {peak_mib} MiB: {r.stderr}"


def test_a_gzip_token_answer_is_read(encoded: _Encoded, tmp_path: Path) -> None:
    """A token server that gzips its answer (asked for identity, it may anyway) still
    gives its token: the pull goes on to the manifest."""
    encoded.mode, encoded.encoding = "token", "gzip"
    encoded.body = gzip.compress(b'{"token": "t"}')
    r = _cli("pull", f"127.0.0.1:{encoded.server_address[1]}/x:1", store=tmp_path / "s", retry="0")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "token" not in r.stderr and "manifest" in r.stderr, r.stderr


# --- slow answers ---------------------------------------------------------------------------
class _Drip(http.server.ThreadingHTTPServer):
    """Serves one image as x:latest, but drips one part of it a byte at a time (`mode`):
    the headers, or the body of GET /v2/, the token, the manifest or the layer blob."""

    daemon_threads = True
    mode = ""
    image: dict[str, bytes] = {}  # noqa: RUF012 - set per server
    manifest = b""
    stop = threading.Event()


class _DripHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: _Drip

    def log_message(self, *args: Any) -> None:
        pass

    def answer(self, body: bytes, drip: bool, status: int = 200, hdrs: Any = ()) -> None:
        srv = self.server
        if drip and srv.mode == "headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            body, head = b"", b"X-Slow: " + b"x" * 8000
            for i in range(len(head)):
                if srv.stop.wait(0.2):
                    return
                self.wfile.write(head[i : i + 1])
                self.wfile.flush()
            return
        self.send_response(status)
        for k, v in hdrs:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not drip:
            self.wfile.write(body)
            return
        for i in range(len(body)):
            if srv.stop.wait(0.2):
                return
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()

    def do_GET(self) -> None:
        srv, path = self.server, self.path.split("?")[0]
        try:
            if path == "/v2/" and srv.mode == "token":
                realm = f'Bearer realm="http://127.0.0.1:{srv.server_address[1]}/token"'
                self.answer(b"", False, 401, [("WWW-Authenticate", realm)])
            elif path == "/v2/":
                self.answer(b"{}" + b" " * 2000, srv.mode in ("ping", "headers"))
            elif path == "/token":
                self.answer(b'{"token": "t"}' + b" " * 2000, True)
            elif "/manifests/" in path:
                mt = ("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                self.answer(srv.manifest, srv.mode == "manifest", 200, [mt])
            else:
                blob = srv.image[path.rsplit("/", 1)[1]]
                self.answer(blob, srv.mode == "blob" and len(blob) > 4096)
        except OSError:
            pass  # the client hung up


@pytest.fixture
def drip() -> Iterator[_Drip]:
    srv = _Drip(("127.0.0.1", 0), _DripHandler)
    srv.stop = threading.Event()
    layer = tar_bytes([("f", os.urandom(200_000))])
    cfg = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha(layer)]},
        }
    ).encode()
    srv.image = {sha(layer): layer, sha(cfg): cfg}
    srv.manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": CONFIG, "digest": sha(cfg), "size": len(cfg)},
            "layers": [{"mediaType": LAYER_TAR, "digest": sha(layer), "size": len(layer)}],
        }
    ).encode()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.stop.set()
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("headers", "timed out"),
        ("ping", "too slowly"),
        ("token", "too slowly"),
        ("manifest", "too slowly"),
        ("blob", "timed out"),
    ],
)
def test_a_registry_that_drips_is_not_waited_for_without_end(
    drip: _Drip, tmp_path: Path, mode: str, said: str
) -> None:
    """Headers, /v2/, a token, a manifest or a blob sent a byte every 0.2 s: with
    `--timeout 2` the pull gives up in one line within seconds, nothing stored (before:
    httpx's timeout is per read, so it waited for days: 100 KB at a byte a second)."""
    drip.mode = mode
    store = tmp_path / "s"
    t0 = time.monotonic()
    ref = f"127.0.0.1:{drip.server_address[1]}/x:latest"
    r = _cli("pull", "--timeout", "2", ref, store=store, timeout=120)
    took = time.monotonic() - t0
    _one_line(r, said)
    assert took < 30, f"{took:.0f} s"
    assert json.loads((store / "index.json").read_text())["manifests"] == []


class _SlowAnswer(http.server.ThreadingHTTPServer):
    """Takes a push, but answers an upload (PUT, or the PATCH of a chunk) after its body
    a byte every 0.2 s (`mode` "drip"), or a chunk with a body that never ends
    ("endless")."""

    daemon_threads = True
    mode = ""
    stop = threading.Event()


class _SlowAnswerHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: _SlowAnswer

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def handle_one(self) -> None:
        srv, path = self.server, self.path.split("?")[0]
        if n := int(self.headers.get("Content-Length") or 0):
            self.rfile.read(n)
        try:
            if path == "/v2/":
                self.reply(200)
            elif self.command == "HEAD":
                self.reply(404)
            elif self.command == "POST":
                self.reply(202, {"Location": "/up/1"})
            elif "/manifests/" in path:
                self.reply(201)
            elif srv.mode == "drip":
                self.wfile.write(b"HTTP/1.0 201 Created\r\n")
                for c in b"X-Slow: " + b"x" * 8000:
                    if srv.stop.wait(0.2):
                        return
                    self.wfile.write(bytes([c]))
                    self.wfile.flush()
            elif srv.mode == "endless" and self.command == "PATCH":
                self.send_response(202)
                self.send_header("Location", "/up/1")
                self.end_headers()
                sent = 0
                while sent < GIVE_UP and not srv.stop.is_set():
                    self.wfile.write(CHUNK)
                    sent += len(CHUNK)
            else:
                self.reply(202 if self.command == "PATCH" else 201, {"Location": "/up/1"})
        except OSError:
            pass  # the client hung up

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = handle_one


@pytest.fixture
def slow_answer() -> Iterator[_SlowAnswer]:
    srv = _SlowAnswer(("127.0.0.1", 0), _SlowAnswerHandler)
    srv.stop = threading.Event()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.stop.set()
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(
    ("mode", "chunked", "said"),
    [("drip", False, "timed out"), ("drip", True, "timed out"), ("endless", True, "larger than")],
)
def test_an_upload_answered_slowly_or_without_end_is_one_line(
    slow_answer: _SlowAnswer, tmp_path: Path, mode: str, chunked: bool, said: str
) -> None:
    """A registry answers an upload a byte every 0.2 s, or with an endless body: with
    `--timeout 2` the push gives up in one line within seconds (before: an upload's
    answer had no deadline, httpx's being per read, so a dripped one was waited for
    as long as it dripped; a chunk's answer was read whole into memory)."""
    slow_answer.mode = mode
    store = tmp_path / "store"  # a layer of 300 KB that gzip cannot shrink: 5 chunks
    lay = make_layout(tmp_path / "lay", [tar_bytes([("f", os.urandom(300_000))])])
    import_image(str(lay), Store(str(store)), tag="img")
    chunk = ["--chunk-size", "64KiB"] if chunked else []
    t0 = time.monotonic()
    r = pyunion(
        "push",
        *("--tls-verify=false", "--retry", "1", "--retry-delay", "0.05", "--timeout", "2"),
        *chunk,
        "--store",
        str(store),
        "img",
        f"127.0.0.1:{slow_answer.server_address[1]}/x:1",
        check=False,
        timeout=120,
    )
    took = time.monotonic() - t0
    _one_line(r, said)
    assert took < 30, f"{took:.0f} s"


@pytest.mark.parametrize(("mode", "said"), [("error", "unknown image"), ("token", "no token")])
def test_deeply_nested_json_is_one_line(
    encoded: _Encoded, tmp_path: Path, mode: str, said: str
) -> None:
    """An error body or a token answer of 100,000 nested `[` (100 KB, under the bound):
    one line (before: the stdlib's JSON parser recursed into a RecursionError traceback)."""
    encoded.mode, encoded.encoding, encoded.body = mode, "identity", b"[" * 100_000
    r = _cli("pull", f"127.0.0.1:{encoded.server_address[1]}/x:1", store=tmp_path / "s")
    _one_line(r, said)


def test_deeply_nested_json_in_an_auth_file_is_one_line(tmp_path: Path) -> None:
    auth = tmp_path / "auth.json"
    auth.write_bytes(b"[" * 100_000)
    r = pyunion("logout", "--authfile", str(auth), "example.com", check=False, timeout=60)
    _one_line(r, "nested too deeply")


def test_another_users_fifo_or_symlink_as_the_auth_file_is_refused(
    local_user: tuple[tuple[int, int], Path],
) -> None:
    """REGISTRY_AUTH_FILE or --authfile in a directory a user can write (/tmp/auth.json):
    her FIFO there hung root's `logout` (and `pull`, `login`) for good; her symlink to a
    file only root may read was read as root's credentials."""
    (uid, gid), home = local_user
    fifo = home / "auth.json"
    os.mkfifo(fifo)
    os.chown(fifo, uid, gid)
    r = pyunion("logout", "--authfile", str(fifo), "example.com", check=False, timeout=30)
    _one_line(r, "not a regular file")
    secret = home.parent / "root-only.json"
    secret.write_text('{"auths": {"example.com": {"auth": "dXNlcjpzZWNyZXQ="}}}')
    secret.chmod(0o600)
    link = home / "link.json"
    link.symlink_to(secret)
    os.chown(link, uid, gid, follow_symlinks=False)
    r = pyunion("logout", "--authfile", str(link), "example.com", check=False, timeout=30)
    _one_line(r, "symlink")
    assert "example.com" in secret.read_text()  # not rewritten through her link

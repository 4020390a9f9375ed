"""A real registry for the tests: Debian's docker-registry (the CNCF distribution server).

Started on a free loopback port with its own config and storage under a
temporary directory, optionally with TLS (a throw-away CA and server
certificate made with openssl) and htpasswd basic auth (bcrypt, made with
htpasswd), or with token auth. Its access log (Apache combined format) is how
tests count the requests a command made.

Two small servers stand beside it where the registry needs a partner that
Debian does not package:
- `TokenServer`, the token issuer of the registry's `auth: token` mode: it
  checks the basic credentials and grants the scopes asked for, in a JWT signed
  (RS256, with openssl) by a throw-away certificate the registry trusts; the
  registry verifies it as it would any issuer's.
- `BlobStorage`, the far end of the registry's `redirect` storage middleware
  (how it sends clients to S3 or a CDN): a static file server over the
  registry's storage directory, noting whether a request carried credentials.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BINARY = "docker-registry"
USER, PASSWORD = "tester", "s3cret-pass"
_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d+) \S+ '
    r'"[^"]*" "(?P<agent>[^"]*)"'
)


def skip_reason() -> str | None:
    missing = [t for t in (BINARY, "openssl", "htpasswd", "skopeo") if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (scripts/setup.sh installs them)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certs(d: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1/localhost; returns the CA's directory."""
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=d)

    ossl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=pyunion test CA",
        "-days",
        "2",
    )
    ossl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    )
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    ossl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    cadir = d / "trust"
    cadir.mkdir(exist_ok=True)
    shutil.copy(d / "ca.crt", cadir / "ca.crt")
    return cadir


@dataclass
class Request:
    method: str
    path: str
    status: int
    agent: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Threaded:
    """An http.server in a thread of the test process."""

    server: http.server.ThreadingHTTPServer

    def _serve(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TokenServer(_Threaded):
    """Issues registry tokens for USER:PASSWORD; anonymous callers get no access."""

    SERVICE, ISSUER = "pyunion-test-registry", "pyunion-test-issuer"

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = root / "token.key", root / "token.crt"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(self.key),
                "-out",
                str(self.cert),
                "-subj",
                "/CN=pyunion token",
                "-days",
                "2",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
        self.x5c = base64.b64encode(der).decode()
        self.scopes: list[list[str]] = []  # scopes asked for, one list per granted token
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if (u, p) != (USER, PASSWORD):
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = u
                scopes = q.get("scope", [])
                if user is not None:
                    owner.scopes.append(scopes)
                body = json.dumps({"token": owner.token(user, scopes)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._serve(Handler)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def token(self, user: str | None, scopes: list[str]) -> str:
        access = []
        for sc in scopes if user else []:
            kind, _, rest = sc.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": self.ISSUER,
            "sub": user or "",
            "aud": self.SERVICE,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing.encode(),
            check=True,
            capture_output=True,
            timeout=30,
        ).stdout
        return signing + "." + _b64url(sig)


class BlobStorage(_Threaded):
    """Serves the registry's storage directory to the clients it redirects here."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, had credentials)
        self.directory = directory
        owner = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kw: Any) -> None:
                super().__init__(*args, directory=str(directory), **kw)

            def log_message(self, *args: Any) -> None:
                pass

            def send_head(self) -> Any:
                owner.requests.append((self.command, self.path, "Authorization" in self.headers))
                return super().send_head()

        self._serve(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Registry:
    """One registry process; `host` is what references use (`127.0.0.1:PORT`)."""

    def __init__(
        self,
        root: Path,
        tls: bool = False,
        htpasswd: bool = False,
        token: TokenServer | None = None,
        redirect: BlobStorage | None = None,
    ) -> None:
        self.root = root
        self.tls = tls
        self.auth = htpasswd
        self.token = token
        self.redirect = redirect
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.ca_dir: Path | None = None
        self.log = root / "registry.log"
        self.storage = root / "storage"
        if redirect is not None:
            self.storage = redirect.directory

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        cfg = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
        ]
        if self.tls:
            self.ca_dir = make_certs(self.root / "certs")
            cfg += [
                "  tls:",
                f"    certificate: {self.root / 'certs/server.crt'}",
                f"    key: {self.root / 'certs/server.key'}",
            ]
        if self.auth:
            r = subprocess.run(
                ["htpasswd", "-Bbn", USER, PASSWORD],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
            (self.root / "htpasswd").write_text(r.stdout)
            cfg += [
                "auth:",
                "  htpasswd:",
                "    realm: pyunion-test",
                f"    path: {self.root / 'htpasswd'}",
            ]
        if self.token is not None:
            cfg += [
                "auth:",
                "  token:",
                f"    realm: {self.token.realm}",
                f"    service: {self.token.SERVICE}",
                f"    issuer: {self.token.ISSUER}",
                f"    rootcertbundle: {self.token.cert}",
            ]
        if self.redirect is not None:
            cfg += [
                "middleware:",
                "  storage:",
                "    - name: redirect",
                "      options:",
                f"        baseurl: {self.redirect.url}",
            ]
        (self.root / "config.yml").write_text("\n".join(cfg) + "\n")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [BINARY, "serve", str(self.root / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("registry did not answer within 30 s")
            time.sleep(0.05)

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        assert self.ca_dir is not None
        return ssl.create_default_context(cafile=str(self.ca_dir / "ca.crt"))

    def _answers(self, query: str = "") -> bool:
        try:
            urllib.request.urlopen(f"{self.url}/v2/{query}", timeout=5, context=self._ssl())
        except urllib.error.HTTPError as e:
            return e.code in (200, 401)
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    # --- the access log ------------------------------------------------------------------
    def mark(self) -> int:
        return self.log.stat().st_size

    def requests(self, since: int) -> list[Request]:
        """Requests logged after `since` (a mark), once every earlier one is in the log.

        The log is written when a handler returns, maybe just after the client has its
        answer, so a sentinel request is sent and waited for.
        """
        token = uuid.uuid4().hex
        self._answers(f"?sentinel={token}")
        deadline = time.monotonic() + 10
        while True:
            with open(self.log, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
            if token in text or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        out = []
        for line in text.splitlines():
            m = _ACCESS.search(line)
            if m and token not in line:
                out.append(Request(m["method"], m["path"], int(m["status"]), m["agent"]))
        return out

    # --- the API itself, for what no client would push ------------------------------------
    def _call(self, method: str, url: str, data: bytes, content_type: str) -> Any:
        req = urllib.request.Request(
            url if url.startswith("http") else self.url + url,
            data=data,
            method=method,
            headers={"Content-Type": content_type},
        )
        return urllib.request.urlopen(req, timeout=30, context=self._ssl())

    def upload_blob(self, repo: str, data: bytes) -> dict[str, Any]:
        """POST then PUT (a monolithic upload); returns the blob's descriptor."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self._call(
            "POST", f"/v2/{repo}/blobs/uploads/", b"", "application/octet-stream"
        ) as resp:
            location = resp.headers["Location"]
        sep = "&" if "?" in location else "?"
        with self._call("PUT", f"{location}{sep}digest={digest}", data, "application/octet-stream"):
            pass
        return {"digest": digest, "size": len(data)}

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> None:
        with self._call("PUT", f"/v2/{repo}/manifests/{ref}", body, media_type):
            pass

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / f"docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"


@contextlib.contextmanager
def running(
    root: Path,
    tls: bool = False,
    htpasswd: bool = False,
    token: bool = False,
    redirect: bool = False,
) -> Iterator[Registry]:
    """A registry for the block; `token`/`redirect` start its partner servers too."""
    tok = TokenServer(root / "token") if token else None
    store = BlobStorage(root / "storage") if redirect else None
    reg = Registry(root, tls, htpasswd, tok, store)
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()
        for partner in (tok, store):
            if partner is not None:
                partner.stop()

"""A hostile registry cannot make `pyunion pull` read without end.

Every answer a registry (or its token server) sends is read up to a bound, as
containers/image does (1 MiB for error bodies and tokens, 4 MiB for
manifests): a server that streams forever gets one line and a closed
connection, not the machine's memory. The servers here are small hand-made
ones, since the point is that they misbehave.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import pyunion

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
            if self.path == "/v2/":
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
    r = pyunion(
        "pull",
        "--tls-verify=false",
        "--retry",
        "0",
        "--store",
        str(tmp_path / "s"),
        f"{host}/evil:1",
        check=False,
        timeout=60,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "larger than" in lines[0] and said in lines[0], r.stderr
    assert hostile.sent < 64 << 20, f"read {hostile.sent >> 20} MiB of an endless answer"

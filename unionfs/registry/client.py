"""An OCI distribution API client (the `/v2/` protocol), on httpx over trio.

One `Client` talks to one registry. It finds the scheme and the way to
authenticate once (`GET /v2/`: HTTPS, or plain HTTP only with `tls_verify=False`,
as containers/image does), then answers 401s by the challenge's rules: Basic
with the credentials, or the Bearer token dance (a token per set of scopes,
fetched from the challenge's realm with the credentials, kept for the session).

Transient failures (connection refused or reset, timeouts, 429, 502-504) are
retried with exponential backoff, honouring `Retry-After`; a blob download cut
in the middle resumes with a `Range` request from where it stopped. Redirects
(blob storage) are followed for GET and HEAD. Credentials (Basic, or a Bearer
token) go only to the registry's own origin (`Client.own`): a redirect or an
upload Location elsewhere gets no `Authorization`, and its 401 challenge is
not taken for the registry's. An upload Location must be http(s). Everything
else, any exception of httpx included, becomes one `RegistryError` line a user
understands (`Client.http_error`): unknown image, unauthorized, TLS failure,
unreachable, too many redirects, digest mismatch.

No answer is read without a bound, as containers/image: manifests 4 MiB
(`MAX_JSON`), tokens and error or other bodies 1 MiB (`MAX_BODY`), blobs their
descriptor's size. A registry or token server that streams forever is cut off
with one line. Nor is one waited for without a bound (`Options.timeout`, 120 s;
httpx's own timeout is per read, which a server sending a byte a minute never
reaches): an answer's headers and a whole manifest, token or error must come
within it, and a blob must bring 64 KiB each time that long is spent waiting
on it (else it is resumed, as after a cut); an upload's body must be taken
64 KiB at a time within it, and its answer come within it of the body's end
(`UploadDeadline`). The bound is on what the answer is once decoded, checked as it
is decoded: answers are asked for uncompressed (`Accept-Encoding: identity`),
and a gzip or deflate one is inflated a bounded piece at a time (`read_limited`),
never a whole network read at once (httpx's own decoders do that: 64 KiB of
zstd made 2 GiB before any bound was checked).
"""

from __future__ import annotations

import functools
import hashlib
import os
import ssl
import weakref
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

import httpx
import trio

from .. import __version__, jsondoc
from ..digits import number
from ..errors import UserError
from ..image import reference
from ..image.safetext import printable
from ..image.schema import MAX_JSON
from ..image.store import digest_of
from ..syscalls import fd_str
from .auth import DOCKER_HUB_API, Challenge, Credentials, parse_challenges

TRANSIENT_STATUS = (429, 500, 502, 503, 504)
# What httpx raises: its HTTPError family, and InvalidURL (a URL it cannot parse), which is
# not one of them.
HTTPX_ERRORS = (httpx.HTTPError, httpx.InvalidURL)
MAX_BODY = 1 << 20  # a token, an error, any answer but manifests and blobs (containers/image)
TIMEOUT = 120.0  # seconds: see the module's docstring
STALL_BYTES = 64 << 10  # what a blob must bring per `timeout` seconds of waiting
CERT_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")


class RegistryError(UserError):
    """A registry operation failed; the message is one line for the user, printed escaped
    (`printable`): it may quote what the registry said (an error body's message)."""

    def __init__(self, msg: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(printable(msg))
        self.status = status
        self.error_code = code


class TooLarge(RegistryError):
    """An answer longer than its bound (`read_limited`)."""


class Cut(RegistryError):
    """A request cut by a transient failure and not sent again (`resend=False`): an
    upload's registry may hold part of its body, and the caller resumes from there."""


@dataclass
class Options:
    """How to reach registries: what `--tls-verify`, `--cert-dir`, `--creds`, `--retry` set."""

    tls_verify: bool = True
    cert_dir: str | None = None
    creds: Credentials | None = None
    retries: int = 3
    retry_delay: float = 0.5  # first backoff; doubles each time (capped at 10 s)
    authfile: str | None = None
    timeout: float = TIMEOUT  # an answer's headers, a whole document, 64 KiB of a blob


def ssl_context(host: str, opts: Options) -> ssl.SSLContext:
    """System CAs plus a certs.d directory: `*.crt` CAs, `NAME.cert`+`NAME.key` client certs."""
    ctx = ssl.create_default_context()
    dirs = [opts.cert_dir] if opts.cert_dir else [os.path.join(d, host) for d in CERT_DIRS]
    for d in dirs:
        if not os.path.isdir(d):
            if opts.cert_dir:
                raise UserError(f"--cert-dir {d}: not a directory")
            continue
        _load_cert_dir(ctx, d)
    if not opts.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_cert_dir(ctx: ssl.SSLContext, d: str) -> None:
    """Load a certs.d directory's CAs and client certificates into `ctx`.

    What is there says whom pyunion trusts (and root pulls as): the directory, those on
    the way and each file must be ones no other user can change (`tree.open_private_dir`,
    `tree.open_private_file`), as the store's. In a user's directory, or hers to write,
    she put her CA there (and so her registry in the real one's place), swapped root's
    directory for hers, or put a FIFO there that hung the pull for good."""
    from ..tree import SharedDirectory, open_private_dir, open_private_file

    fds: list[int] = []

    def checked(dfd: int, name: str) -> str:
        fds.append(open_private_file(dfd, name))
        return fd_str(fds[-1])  # the file checked, not a name she may swap

    try:
        dfd = open_private_dir(d)
        fds.append(dfd)
        names = sorted(os.listdir(fd_str(dfd)))  # an O_PATH fd lists nothing
        for ca in [n for n in names if n.endswith(".crt")]:
            ctx.load_verify_locations(checked(dfd, ca))
        for cert in [n for n in names if n.endswith(".cert")]:
            key = cert[: -len(".cert")] + ".key"
            if key not in names:
                raise UserError(f"client certificate {d}/{cert} has no key {d}/{key}")
            ctx.load_cert_chain(checked(dfd, cert), checked(dfd, key))
    except SharedDirectory as e:
        name = os.fsdecode(e.filename)
        where = name if name == d else os.path.join(d, name)
        raise UserError(
            f"certificates {where} {e.strerror}: another user could choose whom pyunion "
            "trusts; keep them where no other user can change them"
        ) from None
    except (ssl.SSLError, OSError) as e:
        raise UserError(f"cannot load the certificates in {d}: {e}") from None
    finally:
        for fd in fds:
            os.close(fd)


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _reason(exc: BaseException) -> str:
    """The innermost useful text of a transport error."""
    tls = _tls_error(exc)
    if tls is not None:
        return getattr(tls, "verify_message", None) or tls.reason or str(tls)
    e: BaseException = exc
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = str(e) or str(exc) or type(exc).__name__
    return text.split("] ")[-1] if text.startswith("[Errno") else text


def registry_errors(resp: httpx.Response, body: bytes) -> tuple[str | None, str]:
    """(first error code, message) of a distribution error body, if it is one."""
    try:
        errs = jsondoc.parse(body, "the error").get("errors") or []
        first = errs[0]
        code = str(first.get("code") or "")
        msg = str(first.get("message") or code).strip()
        return code or None, msg
    except (jsondoc.JSONError, AttributeError, IndexError, TypeError):
        text = body.decode(errors="replace").strip().splitlines()
        return None, (text[0][:200] if text else resp.reason_phrase)


class UploadDeadline:
    """An upload's deadline, moved as its body goes out: the server must take every
    STALL_BYTES of the body within `timeout`, then answer within `timeout` of the last.

    httpx's timeouts are per read and per write: a server draining a body slowly, or
    sending its answer a byte at a time, would hold a push for as long as it liked.
    One cancel scope per attempt (`start`), its deadline pushed by `body`."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.scope = trio.CancelScope()

    def start(self) -> trio.CancelScope:
        self.scope = trio.CancelScope(deadline=trio.current_time() + self.timeout)
        return self.scope

    def _push(self) -> None:
        self.scope.deadline = trio.current_time() + self.timeout

    async def body(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`chunks` in pieces of STALL_BYTES, each given once the last one was taken."""
        async for chunk in chunks:
            for i in range(0, len(chunk), STALL_BYTES):
                self._push()
                yield chunk[i : i + STALL_BYTES]
        self._push()


def api_host(registry: str) -> str:
    """Where the /v2/ API of a registry lives: docker.io's is elsewhere."""
    return DOCKER_HUB_API if registry == reference.DOCKER_DOMAIN else registry


class Client:
    """A session with one registry; use as `async with Client(...) as c:`."""

    def __init__(self, registry: str, opts: Options, creds: Credentials | None = None) -> None:
        self.registry = registry  # as users name it (key of credentials)
        self.host = api_host(registry)
        self.opts = opts
        self.creds = creds
        self.base = ""
        self.challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], str] = {}
        self._token_lock = trio.Lock()
        # Bodies of answers `request` read already (bounded), for `fail` to quote.
        self._bodies: weakref.WeakKeyDictionary[httpx.Response, bytes] = weakref.WeakKeyDictionary()
        self._http: httpx.AsyncClient | None = None

    # --- session ------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._http = httpx.AsyncClient(
            verify=ssl_context(self.host, self.opts),
            timeout=httpx.Timeout(self.opts.timeout, connect=min(15.0, self.opts.timeout)),
            # Manifests and blobs are hashed as sent, and a compressed answer is a bomb's
            # way past the bounds: ask for none (`read_limited` inflates gzip, bounded).
            headers={"User-Agent": f"pyunion/{__version__}", "Accept-Encoding": "identity"},
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            follow_redirects=False,
        )
        try:
            await self._ping()
        except BaseException as e:
            await self._http.aclose()
            if isinstance(e, HTTPX_ERRORS):
                raise self.http_error(e, f"GET {self.host}/v2/") from None
            raise
        return self

    async def __aexit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if self._http is not None:
            await self._http.aclose()
        if isinstance(exc, HTTPX_ERRORS):
            # Each request turns httpx's errors into one line; this catches any it missed.
            raise self.http_error(exc, "talking to the registry") from None

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None, "use the client in `async with`"
        return self._http

    async def _ping(self) -> None:
        """Pick the scheme and learn the auth challenge from `GET /v2/`."""
        schemes = ["https"] if self.opts.tls_verify else ["https", "http"]
        last: BaseException | None = None
        for scheme in schemes:
            base = f"{scheme}://{self.host}"
            try:
                resp = await self._retrying(
                    functools.partial(self._get_stream, base + "/v2/"), f"GET {base}/v2/"
                )
                await read_limited(
                    resp, MAX_BODY, f"the answer to GET {base}/v2/", False, self.opts.timeout
                )
            except TooLarge:
                raise
            except RegistryError as e:
                last = e
                continue
            if resp.status_code == 401:
                self.challenge = self._pick(resp)
            elif resp.status_code >= 400 and resp.status_code != 404:
                raise RegistryError(
                    f"registry {self.registry}: /v2/ answered "
                    f"{resp.status_code} {resp.reason_phrase}",
                    resp.status_code,
                )
            self.base = base
            return
        assert last is not None
        raise last

    def _get_stream(self, url: str, **kw: Any) -> Awaitable[httpx.Response]:
        """GET with the body left unread: the caller reads it with `read_limited`."""
        return self.http.send(self.http.build_request("GET", url, **kw), stream=True)

    def _pick(self, resp: httpx.Response) -> Challenge | None:
        chs = parse_challenges(", ".join(resp.headers.get_list("www-authenticate")))
        for scheme in ("bearer", "basic"):
            for c in chs:
                if c.scheme == scheme:
                    return c
        return None

    # --- retries ----------------------------------------------------------------------
    async def backoff(self, attempt: int, resp: httpx.Response | None = None) -> None:
        delay = min(10.0, self.opts.retry_delay * (2**attempt))
        if resp is not None:
            ra = number(resp.headers.get("retry-after", ""))
            if ra is not None:
                delay = float(min(30, ra))
        await trio.sleep(delay)

    def http_error(self, e: BaseException, what: str) -> RegistryError:
        """The one line for an exception of httpx (any of HTTPX_ERRORS)."""
        tls = _tls_error(e)
        if tls is not None:
            hint = (
                ""
                if self.opts.cert_dir
                else " (trust its CA with --cert-dir, or use --tls-verify=false)"
            )
            return RegistryError(f"TLS failure talking to {self.host}: {_reason(e)}{hint}")
        if isinstance(e, httpx.TimeoutException):
            return RegistryError(f"registry {self.host} timed out ({what})")
        if isinstance(e, httpx.TooManyRedirects):
            return RegistryError(f"{what}: registry {self.host} redirects too many times")
        if isinstance(e, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
            return RegistryError(f"{what}: registry {self.host} sent an unusable URL ({e})")
        if isinstance(e, httpx.TransportError):
            return RegistryError(f"registry {self.host} unreachable: {_reason(e)}")
        return RegistryError(f"{what}: bad answer from registry {self.host}: {_reason(e)}")

    def _retry(self, e: BaseException, attempt: int) -> bool:
        """Whether a request that raised `e` is worth sending again."""
        return (
            isinstance(e, httpx.TransportError)
            and not isinstance(e, httpx.UnsupportedProtocol)
            and _tls_error(e) is None
            and attempt < self.opts.retries
        )

    async def _retrying(
        self,
        send: Callable[[], Awaitable[httpx.Response]],
        what: str,
        upload: UploadDeadline | None = None,
        resend: bool = True,
    ) -> httpx.Response:
        """send() until it gets an answer that is not transient, or the retries run out.
        An answer whose headers take longer than the timeout is a timeout; for an upload
        (whose answer comes once its body is sent), the timeout runs from the last part
        of the body the server took (`upload`). With `resend=False`, sent once: a cut is
        `Cut`, a transient answer is returned."""
        attempt = 0 if resend else self.opts.retries
        while True:
            failed: httpx.Response | None = None
            try:
                got: httpx.Response | None = None
                with upload.start() if upload else trio.move_on_after(self.opts.timeout):
                    got = await send()
                if got is None:
                    raise httpx.ReadTimeout(f"no progress within {self.opts.timeout:.0f} s")
                resp = got
            except HTTPX_ERRORS as e:
                if not resend and self._retry(e, 0):
                    raise Cut(str(self.http_error(e, what))) from None
                if not self._retry(e, attempt):
                    raise self.http_error(e, what) from None
            else:
                if resp.status_code not in TRANSIENT_STATUS or attempt >= self.opts.retries:
                    return resp
                await resp.aclose()
                failed = resp
            await self.backoff(attempt, failed)
            attempt += 1

    # --- authentication ---------------------------------------------------------------
    async def _token(self, scopes: tuple[str, ...], fresh: bool = False) -> str:
        ch = self.challenge
        assert ch is not None and ch.scheme == "bearer"
        async with self._token_lock:
            if not fresh and scopes in self._tokens:
                return self._tokens[scopes]
            realm = ch.params.get("realm")
            if not realm:
                raise RegistryError(f"registry {self.registry} asks for a token without a realm")
            params: list[tuple[str, str | int | float | bool | None]] = []
            if "service" in ch.params:
                params.append(("service", ch.params["service"]))
            params += [("scope", s) for s in scopes]
            headers = {}
            if self.creds is not None:
                headers["Authorization"] = self.creds.basic()
                params.append(("account", self.creds.username))
            resp = await self._retrying(
                lambda: self.http.send(
                    self.http.build_request("GET", realm, params=params, headers=headers),
                    stream=True,
                    follow_redirects=True,
                ),
                f"GET {realm}",
            )
            body = await read_limited(
                resp, MAX_BODY, f"the token server's answer ({realm})", False, self.opts.timeout
            )
            if resp.status_code in (401, 403):
                _, msg = registry_errors(resp, body)
                raise RegistryError(
                    f"unauthorized: {self.registry} refused the credentials ({msg})",
                    resp.status_code,
                )
            if resp.status_code != 200:
                raise RegistryError(
                    f"token server {realm} answered {resp.status_code}", resp.status_code
                )
            try:
                data = jsondoc.parse_object(body, "the token answer")
                token = data.get("token") or data.get("access_token")
            except jsondoc.JSONError:
                token = None
            if not isinstance(token, str) or not token:
                raise RegistryError(f"token server {realm} gave no token")
            self._tokens[scopes] = token
            return token

    def own(self, url: str) -> bool:
        """Whether `url` is on the registry's own origin (scheme, host, port): the only
        place our credentials go, as docker and containers/image send them. An upload
        Location or a redirect elsewhere (blob storage, or a hostile answer) gets none."""
        return _origin(httpx.URL(url)) == _origin(httpx.URL(self.base))

    async def _auth_header(self, scopes: tuple[str, ...], fresh: bool, url: str) -> str | None:
        ch = self.challenge
        if ch is None or not self.own(url):
            return None
        if ch.scheme == "bearer":
            return "Bearer " + await self._token(scopes, fresh)
        if ch.scheme == "basic" and self.creds is not None:
            return self.creds.basic()
        return None

    # --- requests -----------------------------------------------------------------------
    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base + path

    async def request(
        self,
        method: str,
        path: str,
        scopes: tuple[str, ...],
        *,
        headers: dict[str, str] | None = None,
        content: bytes | Callable[[], AsyncIterator[bytes]] | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
        resend: bool = True,
    ) -> httpx.Response:
        """One request with auth and retries; a 401 is answered once with fresh credentials.

        `content` is bytes or a function making a fresh body stream per attempt. With
        `stream=True` the caller reads and closes the response. `resend=False`: no
        retries (`_retrying`).
        """
        follow = method in ("GET", "HEAD")
        url = self.url(path)
        for fresh in (False, True):
            hdrs = dict(headers or {})
            auth = await self._auth_header(scopes, fresh, url)
            if auth is not None:
                hdrs["Authorization"] = auth

            upload = UploadDeadline(self.opts.timeout) if callable(content) else None

            def send(
                hdrs: dict[str, str] = hdrs, upload: UploadDeadline | None = upload
            ) -> Awaitable[httpx.Response]:
                if callable(content):
                    assert upload is not None
                    body: bytes | AsyncIterator[bytes] | None = upload.body(content())
                else:
                    body = content
                req = self.http.build_request(
                    method, url, headers=hdrs, content=body, params=params
                )
                return self.http.send(req, stream=True, follow_redirects=follow)

            resp = await self._retrying(send, f"{method} {path}", upload, resend)
            if resp.status_code != 401:
                break
            ch = self._pick(resp)
            if (
                fresh
                # Another origin's challenge is not the registry's: where the 401 came
                # from, after any redirect (blob storage, or a host that wants creds).
                or not self.own(str(resp.url))
                or ch is None
                or (ch.scheme == "basic" and self.creds is None)
                or (self.challenge == ch and ch.scheme == "basic")
            ):
                break
            await resp.aclose()
            self.challenge = ch
        if not stream:
            what = f"the answer to {method} {path}"
            self._bodies[resp] = await read_limited(resp, MAX_BODY, what, False, self.opts.timeout)
        return resp

    async def fail(self, resp: httpx.Response, what: str) -> RegistryError:
        """The one-line error for an unexpected answer."""
        body = self._bodies.pop(resp, None)
        if body is None:
            body = await read_limited(
                resp, MAX_BODY, f"the answer about {what}", False, self.opts.timeout
            )
        code, msg = registry_errors(resp, body)
        st = resp.status_code
        if st == 401:
            how = "the credentials were refused" if self.creds else "authentication required"
            return RegistryError(
                f"unauthorized: {what}: {how} ({msg}; use --creds or "
                f"'pyunion login {self.registry}')",
                st,
                code,
            )
        if st == 403:
            return RegistryError(f"denied: {what}: {msg}", st, code)
        if code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN") or st == 404:
            return RegistryError(f"{what}: not found ({msg})", st, code)
        if code in ("DIGEST_INVALID", "SIZE_INVALID"):
            return RegistryError(f"digest mismatch: {what}: the registry says {msg}", st, code)
        return RegistryError(
            f"{what}: {self.registry} answered {st} {resp.reason_phrase} ({msg})", st, code
        )

    # --- the API --------------------------------------------------------------------
    async def get_manifest(
        self, repo: str, target: str, accept: str, what: str
    ) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index, verified when asked by digest."""
        resp = await self.request(
            "GET",
            f"/v2/{repo}/manifests/{target}",
            pull_scope(repo),
            headers={"Accept": accept},
            stream=True,
        )
        if resp.status_code == 404:
            err = await self.fail(resp, what)
            raise RegistryError(
                f"unknown image {what} (the registry has no such "
                f"{'manifest' if err.error_code != 'NAME_UNKNOWN' else 'name'})",
                404,
                err.error_code,
            )
        if resp.status_code != 200:
            raise await self.fail(resp, what)
        body = await read_limited(resp, MAX_JSON, f"manifest of {what}", True, self.opts.timeout)
        mtype = resp.headers.get("content-type", "").split(";")[0].strip()
        algo = target.split(":", 1)[0] if ":" in target and target.startswith("sha") else "sha256"
        digest = digest_of(body, algo)
        if ":" in target and target.startswith("sha") and digest != target:
            raise RegistryError(f"digest mismatch: the manifest of {what} hashes to {digest}")
        said = resp.headers.get("docker-content-digest")
        if said and said.startswith(algo + ":") and said != digest:
            raise RegistryError(
                f"digest mismatch: the manifest of {what} hashes to {digest}, "
                f"the registry says {said}"
            )
        return body, mtype, digest

    async def get_blob_bytes(self, repo: str, digest: str, size: int, what: str) -> bytes:
        """A small blob (a config), verified."""
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(data)

        await self.download(repo, digest, size, sink, what)
        data = b"".join(chunks)
        if digest_of(data, digest.split(":", 1)[0]) != digest:
            raise RegistryError(f"digest mismatch: {what} does not hash to {digest}")
        return data

    async def download(
        self,
        repo: str,
        digest: str,
        size: int,
        sink: Callable[[bytes], Awaitable[None]],
        what: str,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream a blob's exact `size` bytes into `sink`; resumes with Range after a cut."""
        got = 0
        attempt = 0
        while True:
            headers = {"Range": f"bytes={got}-"} if got else {}
            resp = await self.request(
                "GET", f"/v2/{repo}/blobs/{digest}", pull_scope(repo), headers=headers, stream=True
            )
            try:
                if resp.status_code not in (200, 206):
                    raise await self.fail(resp, what)
                skip = got
                if resp.status_code == 206:
                    start = resp.headers.get("content-range", "").removeprefix("bytes ")
                    if not start.startswith(f"{got}-"):
                        raise RegistryError(
                            f"{what}: the registry resumed at the wrong offset "
                            f"({start!r}, wanted {got})"
                        )
                    skip = 0
                # Each network read as it comes (a 1 MiB chunk would wait for all of it),
                # timed: STALL_BYTES per `timeout` spent waiting, or it is a cut.
                chunks = resp.aiter_raw().__aiter__()
                waited, mark, seen = 0.0, 0, 0
                while True:
                    t0 = trio.current_time()
                    step: bytes | None = None
                    if waited < self.opts.timeout:
                        with trio.move_on_after(self.opts.timeout - waited):
                            step = await anext(chunks, b"")
                    waited += trio.current_time() - t0
                    if step is None:
                        raise httpx.ReadTimeout(
                            f"less than {STALL_BYTES} bytes in {self.opts.timeout:.0f} s"
                        )
                    if not step:
                        break
                    chunk = step
                    seen += len(chunk)
                    if seen - mark >= STALL_BYTES:
                        waited, mark = 0.0, seen
                    if skip:
                        drop = min(skip, len(chunk))
                        chunk, skip = chunk[drop:], skip - drop
                        if not chunk:
                            continue
                    got += len(chunk)
                    if got > size:
                        raise RegistryError(
                            f"digest mismatch: {what} is larger than the "
                            f"{size} bytes its descriptor says"
                        )
                    await sink(chunk)
                    if progress is not None:
                        progress(len(chunk))
            except HTTPX_ERRORS as e:
                if not self._retry(e, attempt):
                    raise self.http_error(e, f"GET {what}") from None
                await self.backoff(attempt)
                attempt += 1
                continue
            finally:
                await resp.aclose()
            if got < size:
                if attempt >= self.opts.retries:
                    raise RegistryError(
                        f"digest mismatch: {what} has {got} bytes, its descriptor says {size}"
                    )
                attempt += 1
                continue
            return

    async def check_digest(self, repo: str, digest: str, size: int, what: str) -> None:
        """Download a blob again only to hash it: RegistryError if it is not what it claims."""
        algo, hexd = digest.split(":", 1)
        h = hashlib.new(algo)

        async def sink(data: bytes) -> None:
            h.update(data)

        await self.download(repo, digest, size, sink, what)
        if h.hexdigest() != hexd:
            raise RegistryError(
                f"digest mismatch: {what}: the registry's blob does not match "
                f"its digest {digest} (got {algo}:{h.hexdigest()})"
            )

    async def blob_exists(self, repo: str, digest: str, scopes: tuple[str, ...]) -> bool:
        resp = await self.request("HEAD", f"/v2/{repo}/blobs/{digest}", scopes)
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise await self.fail(resp, f"HEAD blob {digest} in {self.registry}/{repo}")

    async def start_upload(
        self, repo: str, digest: str | None = None, mount_from: str | None = None
    ) -> str | None:
        """POST an upload; with `mount_from`, ask for a cross-repository mount first.

        Returns the upload URL, or None when the registry mounted the blob (201).
        """
        scopes = push_scope(repo)
        params = None
        if mount_from is not None and digest is not None:
            scopes += (f"repository:{mount_from}:pull",)
            params = {"mount": digest, "from": mount_from}
        resp = await self.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            scopes,
            params=params,
            headers={"Content-Length": "0"},
        )
        if resp.status_code == 201 and mount_from is not None:
            return None
        what = f"starting an upload to {self.registry}/{repo}"
        if resp.status_code != 202 or not resp.headers.get("location"):
            raise await self.fail(resp, what)
        return upload_location(resp, None, what)

    async def upload(
        self,
        repo: str,
        location: str,
        path: str,
        size: int,
        digest: str,
        chunk_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Upload a file: one PUT when it fits in a chunk, else PATCH chunks then PUT.

        A chunk cut by a transient error is resumed where the registry says the upload
        stands (`GET` of the upload URL gives its `Range`), or from the start in a new
        upload when the registry refuses the old one (`_resume`). A cut PUT is sent
        again to a new upload, as containers/image does: the registry kept what it read
        of the cut one, and refuses the same body again there ("blob upload invalid").
        """
        scopes = push_scope(repo)
        what = f"uploading blob {digest} to {self.registry}/{repo}"
        if size <= chunk_size:
            for attempt in range(self.opts.retries + 1):
                last = attempt == self.opts.retries
                if attempt:
                    fresh = await self.start_upload(repo)
                    assert fresh is not None  # no mount asked for: always an upload URL
                    location = fresh
                try:
                    resp = await self.request(
                        "PUT",
                        with_digest(location, digest),
                        scopes,
                        headers={
                            "Content-Length": str(size),
                            "Content-Type": "application/octet-stream",
                        },
                        content=lambda: file_chunks(path, 0, size, progress),
                        resend=False,
                    )
                except Cut:
                    if last:
                        raise
                    await self.backoff(attempt)
                    continue
                if resp.status_code == 201:
                    return
                if resp.status_code not in TRANSIENT_STATUS or last:
                    raise await self.fail(resp, what)
                self._bodies.pop(resp, None)
                await self.backoff(attempt, resp)
            return
        offset = 0
        attempt = 0
        while offset < size:
            end = min(size, offset + chunk_size)
            upload = UploadDeadline(self.opts.timeout)
            try:
                req = self.http.build_request(
                    "PATCH",
                    location,
                    content=upload.body(file_chunks(path, offset, end, progress)),
                    headers={
                        **(await self._auth_headers(scopes, location)),
                        "Content-Range": f"{offset}-{end - 1}",
                        "Content-Length": str(end - offset),
                        "Content-Type": "application/octet-stream",
                    },
                )
                got: httpx.Response | None = None
                with upload.start():
                    got = await self.http.send(req, stream=True)
                if got is None:
                    raise httpx.WriteTimeout(f"no progress within {self.opts.timeout:.0f} s")
                resp = got
                self._bodies[resp] = await read_limited(
                    resp, MAX_BODY, f"the answer to PATCH {location}", False, self.opts.timeout
                )
            except HTTPX_ERRORS as e:
                if not self._retry(e, attempt):
                    raise self.http_error(e, what) from None
                await self.backoff(attempt)
                attempt += 1
                location, offset = await self._resume(repo, location, what)
                continue
            if resp.status_code in TRANSIENT_STATUS and attempt < self.opts.retries:
                await self.backoff(attempt, resp)
                attempt += 1
                location, offset = await self._resume(repo, location, what)
                continue
            if resp.status_code != 202:
                raise await self.fail(resp, what)
            location = upload_location(resp, location, what)
            offset = end
        resp = await self.request(
            "PUT", with_digest(location, digest), scopes, headers={"Content-Length": "0"}
        )
        if resp.status_code != 201:
            raise await self.fail(resp, what)

    async def _auth_headers(self, scopes: tuple[str, ...], url: str) -> dict[str, str]:
        auth = await self._auth_header(scopes, False, url)
        return {"Authorization": auth} if auth else {}

    async def _resume(self, repo: str, location: str, what: str) -> tuple[str, int]:
        """Where to go on after a cut chunk: where the upload stands, or a new upload from
        the start when the registry refuses the old one (docker-registry's upload URL
        carries the offset it expects, signed, and a cut leaves its file longer than
        that: "upload resumed at wrong offset")."""
        try:
            return await self._upload_status(repo, location, what)
        except RegistryError as e:
            if e.status not in (404, 416):
                raise
        fresh = await self.start_upload(repo)
        assert fresh is not None  # no mount asked for: always an upload URL
        return fresh, 0

    async def _upload_status(self, repo: str, location: str, what: str) -> tuple[str, int]:
        """Where an interrupted upload stands: (upload URL, bytes the registry has)."""
        resp = await self.request("GET", location, push_scope(repo))
        if resp.status_code != 204:
            raise await self.fail(resp, what)
        _, dash, last = resp.headers.get("range", "0-0").removeprefix("bytes=").partition("-")
        end = number(last) if dash else None
        return upload_location(resp, location, what), 0 if end is None else end + 1

    async def put_manifest(
        self, repo: str, target: str, body: bytes, media_type: str, digest: str
    ) -> None:
        what = f"pushing the manifest to {self.registry}/{repo}:{target}"
        resp = await self.request(
            "PUT",
            f"/v2/{repo}/manifests/{target}",
            push_scope(repo),
            headers={"Content-Type": media_type},
            content=body,
        )
        if resp.status_code not in (200, 201):
            raise await self.fail(resp, what)
        said = resp.headers.get("docker-content-digest")
        if said and said != digest:
            raise RegistryError(
                f"digest mismatch: {what}: the registry stored it as {said}, not {digest}"
            )


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)


def upload_location(resp: httpx.Response, default: str | None, what: str) -> str:
    """Where an upload goes on: the answer's Location (else `default`) resolved against
    its URL, which must be http(s) with a host; anything else is one line."""
    text = resp.headers.get("location") or default or ""
    try:
        url = resp.url.join(text)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise RegistryError(
            f"{what}: the registry gave an upload location that is not an "
            f"http(s) URL ({text[:200]!r})"
        )
    return str(url)


def with_digest(location: str, digest: str) -> str:
    """The upload URL plus `digest=`, keeping its own query (httpx's params= would drop it)."""
    return str(httpx.URL(location).copy_merge_params({"digest": digest}))


def pull_scope(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull",)


def push_scope(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull,push",)


def _inflater(resp: httpx.Response) -> Any:
    """A zlib decompressor for an answer sent with `Content-Encoding: gzip` or `deflate`
    (zlib-wrapped, as HTTP means it); None for any other encoding, whose bytes are then
    taken as sent, as Go's client does with an encoding it did not ask for."""
    codings = [c.strip().lower() for c in resp.headers.get("content-encoding", "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if codings in (["gzip"], ["x-gzip"], ["deflate"]):
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # a gzip or zlib header, either
    return None


async def read_limited(
    resp: httpx.Response,
    limit: int,
    what: str,
    raw: bool = True,
    timeout: float = TIMEOUT,
) -> bytes:
    """The body of `resp` (as sent, or with `raw=False` inflated if it is gzip or deflate),
    at most `limit` bytes, all of it within `timeout` seconds; closed in any case.
    Inflating asks zlib for no more than the room left (plus one byte, to tell "more"
    from "exactly full"), so a bomb costs at most `limit` bytes of memory."""
    buf = bytearray()
    z = None if raw else _inflater(resp)
    try:
        with trio.move_on_after(timeout) as scope:
            await _read_into(buf, resp, z, limit, what)
    finally:
        await resp.aclose()
    if scope.cancelled_caught:
        raise RegistryError(
            f"{what}: registry {resp.url.host} sent it too slowly "
            f"(not all of it in {timeout:.0f} s)"
        )
    return bytes(buf)


async def _read_into(buf: bytearray, resp: httpx.Response, z: Any, limit: int, what: str) -> None:
    """`read_limited`'s reading: the body into `buf`, inflated by `z` unless None."""
    async for chunk in resp.aiter_raw():
        if z is not None:
            try:
                chunk = z.decompress(chunk, limit + 1 - len(buf))
            except zlib.error as e:
                raise RegistryError(
                    f"{what} is not valid {resp.headers['content-encoding']} ({e})"
                ) from None
        buf += chunk
        if len(buf) > limit or (z is not None and z.unconsumed_tail):
            raise TooLarge(f"{what} is larger than {limit} bytes")


async def file_chunks(
    path: str,
    start: int,
    end: int,
    progress: Callable[[int], None] | None = None,
    chunk: int = 1 << 20,
) -> AsyncIterator[bytes]:
    """Bytes [start, end) of a file, read in a worker thread a MiB at a time."""
    f = await trio.open_file(path, "rb")
    try:
        await f.seek(start)
        left = end - start
        while left > 0:
            data = await f.read(min(chunk, left))
            if not data:
                raise RegistryError(f"{path} is shorter than expected")
            left -= len(data)
            if progress is not None:
                progress(len(data))
            yield data
    finally:
        await f.aclose()

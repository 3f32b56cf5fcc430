"""SSRF-safe image downloads with a deadline that holds for the whole transfer.

Every hop (redirects are followed by hand) is resolved, every address must be public, and the
connection goes to the address that was checked (no second DNS lookup, so DNS rebinding cannot swap
in a private address). Time is bounded three ways: each socket operation by `timeout`, the whole
fetch (connect, TLS, headers, every hop, the body) by `deadline` seconds, and a host that sends
slower than `min_rate` bytes/s on average is dropped once `timeout` seconds have passed. A host that
drip-feeds one byte per second never trips a per-read timeout, so the deadline is enforced by a
watchdog that shuts the socket down (which ends a blocked read at once), and the body is read with
`read1` (at most one receive per call) so the clock is checked between small reads.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from phi3v.processing.media_errors import ImageInputError, fmt_size, show

MAX_REDIRECTS = 5
MIN_FETCH_RATE = 4096.0  # bytes/s: the slowest average a download may keep after its first `timeout` seconds
_READ = 16384  # bytes per read1: the clock is checked at least this often


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout: float = 10.0  # per socket operation (connect, each receive), seconds
    deadline: float | None = None  # the whole fetch, seconds; None: 3 x timeout
    min_rate: float = MIN_FETCH_RATE  # bytes/s averaged over the transfer, checked after `timeout` seconds

    @property
    def total(self) -> float:
        return max(self.timeout, 0.001) * 3 if self.deadline is None else max(self.deadline, 0.001)


def _ip_is_blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for every address a server-side fetch must never reach (metadata services, LAN, loopback)."""
    if isinstance(ip, ipaddress.IPv6Address):
        for embedded in (ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None):
            if embedded is not None and _ip_is_blocked(embedded):
                return True  # an IPv6 form that tunnels to a private IPv4 address
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    return (
        ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified or not ip.is_global
    )


def _resolve_public(host: str, port: int) -> str:
    """Resolve `host` and return one address to connect to; refuse if ANY resolved address is non-public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ImageInputError(f"cannot resolve image URL host {show(host)} ({e}); check the URL") from None
    addrs = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addrs:
        raise ImageInputError(f"image URL host {show(host)} has no addresses; check the URL")
    for ip in addrs:
        if _ip_is_blocked(ip):
            raise ImageInputError(f"image URL host {show(host)} resolves to non-public address {ip}; "
                                  "only public hosts may be fetched")
    return str(addrs[0])


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP connection to a pre-checked IP; the Host header still names the original host. The socket goes to
    the watchdog as soon as it exists."""

    def __init__(self, host: str, ip: str, dog: "_Watchdog", **kw: Any) -> None:
        super().__init__(host, **kw)
        self._ip, self._dog = ip, dog

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)
        self._dog.watch(self.sock)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a pre-checked IP; SNI and certificate verification use the original hostname. The raw socket goes
    to the watchdog before the TLS handshake (a host could drip-feed that too)."""

    def __init__(self, host: str, ip: str, dog: "_Watchdog", **kw: Any) -> None:
        super().__init__(host, context=ssl.create_default_context(), **kw)
        self._ip, self._dog = ip, dog

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self._dog.watch(sock)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _Watchdog:
    """Shuts the current connection's socket down when the deadline passes: a read blocked in any phase
    (TLS handshake and headers included) returns at once instead of waiting for the next byte of a
    drip-feeding host."""

    def __init__(self, end: float) -> None:
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, end - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.fired and sock is not None:
                self._kill(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                self._kill(self._sock)

    @staticmethod
    def _kill(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def _read_body(resp: http.client.HTTPResponse, url: str, lim: FetchLimits, start: float, end: float,
               dog: _Watchdog) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > lim.max_bytes:
        raise ImageInputError(f"image URL {show(url)} serves {fmt_size(int(length))}, "
                              f"over the limit of {fmt_size(lim.max_bytes)}")
    chunks, total = [], 0
    while True:
        chunk = resp.read1(min(_READ, lim.max_bytes + 1 - total))
        if not chunk:
            if dog.fired:  # the watchdog's shutdown looks like the end of the body
                raise _TooSlow
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > lim.max_bytes:
            raise ImageInputError(f"image URL {show(url)} serves more than {fmt_size(lim.max_bytes)}; "
                                  "use a smaller image")
        now = time.monotonic()
        if now > end:
            raise _TooSlow
        if now - start > lim.timeout and total < lim.min_rate * (now - start):
            raise ImageInputError(f"image URL {show(url)} sends {total / (now - start):.0f} bytes/s, under the "
                                  f"minimum of {lim.min_rate:.0f}; use a faster host")


class _TooSlow(Exception):
    pass


def fetch_url(url: str, lim: FetchLimits) -> bytes:
    """GET `url` with redirects followed by hand (each hop re-checked). http.client (urllib's transport) is used
    directly so the socket goes to the checked IP; HTTP(S)_PROXY settings are therefore not used."""
    start = time.monotonic()
    end = start + lim.total
    dog = _Watchdog(end)
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            nxt = _hop_once(url, lim, start, end, dog)
            if isinstance(nxt, bytes):
                return nxt
            url = nxt
    except _TooSlow:
        pass
    finally:
        dog.cancel()
    if dog.fired or time.monotonic() > end:
        raise ImageInputError(f"image URL {show(url)} took longer than {lim.total:g} s to download; "
                              "try again or use a faster host")
    raise ImageInputError(f"image URL followed more than {MAX_REDIRECTS} redirects; use the final URL")


def _hop_once(url: str, lim: FetchLimits, start: float, end: float, dog: _Watchdog) -> bytes | str:
    """One request: the body (bytes) or the redirect target (str)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageInputError(f"image URL scheme {parts.scheme!r} is not supported (redirect target {show(url)}); "
                              "use http(s)")
    host = parts.hostname
    if not host:
        raise ImageInputError(f"image URL {show(url)} has no host; check the URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ImageInputError(f"image URL {show(url)} has an invalid port; check the URL") from None
    ip = _resolve_public(host, port)  # checked on every hop, before any connection
    cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    conn = cls(host, ip, dog, port=port, timeout=max(0.001, min(lim.timeout, end - time.monotonic())))
    try:
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn.request("GET", target, headers={"User-Agent": "phi3v-image-loader", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status in (301, 302, 303, 307, 308):
            loc = resp.getheader("Location")
            if not loc:
                raise ImageInputError(f"image URL {show(url)} redirected without a Location header")
            return urllib.parse.urljoin(url, loc)
        if resp.status != 200:
            raise ImageInputError(f"image URL {show(url)} returned HTTP {resp.status}; check the URL")
        return _read_body(resp, url, lim, start, end, dog)
    except (OSError, http.client.HTTPException) as e:
        if dog.fired or time.monotonic() > end:
            raise _TooSlow from None
        raise ImageInputError(f"image URL {show(url)} could not be fetched ({e}); check the URL and network") from None
    finally:
        dog.watch(None)
        conn.close()

"""Image inputs that must stay the sender's problem: decoder exceptions of every kind, drip-feeding
hosts, and a symlink swapped inside the allowed folder while images are read."""

from __future__ import annotations

import io
import os
import random
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image, features

from phi3v.processing import fetch
from phi3v.processing.image_io import ImageInputError, load_image

_USUAL = (OSError, ValueError, SyntaxError, EOFError)  # what a decoder is expected to raise


def _encoded(fmt: str) -> bytes:
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 48, 3), dtype=np.uint8))
    buf = io.BytesIO()
    (img.convert("P") if fmt == "BLP" else img).save(buf, format=fmt)  # BLP is written from palette images
    return buf.getvalue()


def _mutants(data: bytes, rng: random.Random) -> list[bytes]:
    """Every byte of the first 300 flipped, then 150 copies with 1-4 random bytes changed."""
    out = []
    for i in range(min(300, len(data))):
        b = bytearray(data)
        b[i] ^= 0xFF
        out.append(bytes(b))
    for _ in range(150):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        out.append(bytes(b))
    return out


@pytest.mark.parametrize("fmt", ["AVIF", "BLP", "PNG"])
def test_mutated_images_fail_as_input_errors(fmt: str) -> None:
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")  # it then cannot decode AVIF at all: nothing to wrap
    unusual = 0
    for data in _mutants(_encoded(fmt), random.Random(fmt)):
        try:
            Image.open(io.BytesIO(data)).load()
        except _USUAL:
            pass
        except Exception:  # noqa: BLE001 - e.g. RuntimeError (AVIF), BLPFormatError
            unusual += 1
        try:
            load_image(data)
        except ImageInputError as e:
            assert str(e) and "\n" not in str(e)
    if fmt in ("AVIF", "BLP"):  # the cases of the issue are among the mutants
        assert unusual > 0


def _drip_server(header_drip: bool, tls: bool = False) -> tuple[socket.socket, int]:
    """A loopback host that sends one byte a second: of its headers, or (headers at once) of its body; with
    `tls`, of a TLS record announced as 16 KiB long (the client waits inside its handshake)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    def drip(conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        try:
            conn.recv(4096)
            if tls:
                conn.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record header: 16 KiB follow
            elif not header_drip:
                conn.sendall(head)
            for byte in (head if header_drip else b"\x89" * 100000):
                conn.sendall(bytes([byte]))
                time.sleep(1.0)
        except OSError:
            pass
        finally:
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


@pytest.fixture
def loopback_ok(monkeypatch):
    real = fetch._ip_is_blocked
    monkeypatch.setattr(fetch, "_ip_is_blocked", lambda ip: str(ip) != "127.0.0.1" and real(ip))


@pytest.mark.parametrize("header_drip,tls", [(False, False), (True, False), (True, True)],
                         ids=["body", "headers", "tls_handshake"])
def test_drip_feeding_host_gives_up_by_the_deadline(loopback_ok, header_drip: bool, tls: bool) -> None:
    srv, port = _drip_server(header_drip, tls)
    try:
        t0 = time.monotonic()
        with pytest.raises(ImageInputError, match="longer than 2 s"):
            # each read is answered within the 5 s socket timeout: only the whole-transfer deadline can stop it
            load_image(f"http{'s' if tls else ''}://127.0.0.1:{port}/x.png", allow_urls=True, timeout=5, deadline=2,
                       min_rate=0)
        assert time.monotonic() - t0 < 2.8
    finally:
        srv.close()


def test_slow_host_dropped_below_the_minimum_rate(loopback_ok) -> None:
    srv, port = _drip_server(False)
    try:
        t0 = time.monotonic()
        with pytest.raises(ImageInputError, match="under the minimum of 1000"):
            load_image(f"http://127.0.0.1:{port}/x.png", allow_urls=True, timeout=1.5, deadline=30, min_rate=1000)
        assert time.monotonic() - t0 < 3.5
    finally:
        srv.close()


def _png(path: str, size: int) -> None:
    Image.new("RGB", (size, size), (size, 0, 0)).save(path)


def test_relative_paths_resolve_under_the_allowed_folder(tmp_path, monkeypatch) -> None:
    root = tmp_path / "media"
    root.mkdir()
    _png(str(root / "in.png"), 8)
    _png(str(tmp_path / "in.png"), 9)  # the same name in the working directory must not be read
    monkeypatch.chdir(tmp_path)
    assert load_image("in.png", allowed_dir=str(root)).size == (8, 8)
    with pytest.raises(ImageInputError, match="outside the allowed directory"):
        load_image("../in.png", allowed_dir=str(root))


def test_symlink_swapped_during_reads_never_leaks_an_outside_file(tmp_path) -> None:
    root, outside = tmp_path / "media", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    (root / "d").mkdir()
    _png(str(root / "d" / "img.png"), 8)  # inside: 8x8
    _png(str(outside / "img.png"), 9)  # outside, same name: 9x9
    _png(str(root / "ok.png"), 8)
    stop = threading.Event()

    def swap() -> None:  # d flips between the real folder and a link to the outside one; cur between two links
        while not stop.is_set():
            os.rename(root / "d", root / "d_real")
            os.symlink(outside, root / "d")
            os.symlink(outside / "img.png", root / "cur_new")
            os.replace(root / "cur_new", root / "cur")
            os.unlink(root / "d")
            os.rename(root / "d_real", root / "d")
            os.symlink(root / "ok.png", root / "cur_new")
            os.replace(root / "cur_new", root / "cur")

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    sizes, errors = [], 0
    try:
        for i in range(600):
            try:
                sizes.append(load_image("d/img.png" if i % 2 else "cur", allowed_dir=str(root)).size)
            except ImageInputError:
                errors += 1
    finally:
        stop.set()
        t.join()
    assert (9, 9) not in sizes  # never the outside file
    assert sizes and set(sizes) == {(8, 8)}
    assert errors < 600

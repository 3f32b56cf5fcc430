"""Image loading (phi3v.processing.image_io) and the HD transform (phi3v.processing.image) against the goldens."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import socket
import struct
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v.processing import fetch, image_io
from phi3v.processing.image import (ImageBatch, ImageProcessor, ProcessedImage, content_key_later, hd_canvas, hd_resized,
                                    num_image_tokens)
from phi3v.processing.image_io import ImageInputError, load_image

GOLDEN = Path(__file__).parent / "data" / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())["preprocess"]
CASES = [(name, k) for name in MANIFEST for k in ("nc1", "nc4", "nc16")]


def _source(name: str):
    f = GOLDEN / MANIFEST[name]["input_file"]
    return np.load(f) if f.suffix == ".npy" else Image.open(f)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(t.numpy(), dtype=np.float32).tobytes()).hexdigest()


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(w: int = 40, h: int = 30) -> Image.Image:
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------------------- golden parity


@pytest.mark.parametrize("name,key", CASES)
def test_golden_parity(name: str, key: str) -> None:
    exp = MANIFEST[name]["results"][key]
    nc = int(key[2:])
    src = _source(name)
    if name == "numpy_astronaut":  # the reference crashes on arrays; we must give exactly the astronaut results
        exp = MANIFEST["astronaut"]["results"][key]
    batch = ImageProcessor(num_crops=nc)([src])
    pv = batch.pixel_values[0]
    assert pv.shape == (nc + 1, 3, 336, 336) and pv.dtype == torch.float32
    if exp["status"] == "error":
        # Documented deviation: extremely thin images (reference: "height and width must be > 0") get their short
        # side clamped to 1 px instead of crashing. 1000x2 at nc1 -> one 336x336 crop, mostly white.
        assert name == "extreme_1000x2" and key == "nc1"
        assert batch.image_sizes.tolist() == [[336, 336]] and batch.num_img_tokens.tolist() == [313]
        assert torch.isfinite(pv).all()
        return
    assert _sha(pv) == exp["pixel_values_sha256"], "pixel_values are not bit-exact"
    assert batch.image_sizes.tolist() == [exp["image_sizes"]]
    assert batch.num_img_tokens.tolist() == [exp["num_img_tokens"]]
    assert batch.image_sizes.dtype == torch.int64 and batch.num_img_tokens.dtype == torch.int64
    npz = np.load(GOLDEN / exp["file"]) if name != "numpy_astronaut" else None
    if npz is not None:  # redundant with the sha, but pinpoints a mismatch if the sha ever breaks
        flat = pv.numpy().reshape(-1)
        np.testing.assert_array_equal(flat[npz["sample_flat_index"]], npz["sample_value"])
        assert int(npz["num_img_tokens"]) == exp["num_img_tokens"]
    # preprocess() crops == the non-padding part, padding crops are zero
    p = ImageProcessor(num_crops=nc).preprocess(src)
    assert isinstance(p, ProcessedImage)
    h, w = exp["image_sizes"][0] // 336, exp["image_sizes"][1] // 336
    assert p.grid == (h, w) and p.image_size == tuple(exp["image_sizes"]) and p.num_tokens == exp["num_img_tokens"]
    assert p.crops.shape == (1 + h * w, 3, 336, 336)
    assert torch.equal(p.crops, pv[: 1 + h * w])
    assert not pv[1 + h * w :].any()


def test_phi35_default_is_nc4() -> None:
    """Phi-3.5-vision runs the same processor with num_crops=4: its entries must match ours at nc4."""
    proc = ImageProcessor(num_crops=4)
    for name, entry in MANIFEST.items():
        exp = entry["results"]["phi35_default"]
        if exp["status"] != "ok":
            assert name == "numpy_astronaut"  # reference crash on arrays; covered by test_golden_parity
            continue
        assert exp["num_crops"] == 4 and exp["pixel_values_sha256"] == entry["results"]["nc4"]["pixel_values_sha256"]
        assert _sha(proc([_source(name)]).pixel_values[0]) == exp["pixel_values_sha256"], name


def test_num_image_tokens_formula() -> None:
    assert [num_image_tokens(*g) for g in [(1, 1), (4, 4), (16, 1), (1, 16)]] == [313, 2509, 2653, 2473]


# ----------------------------------------------------------------------------------------- processor behaviour


def test_batch_of_images_and_num_crops_override() -> None:
    proc = ImageProcessor(num_crops=4)
    batch = proc([_rgb(1000, 300), _rgb(10, 500)], num_crops=2)
    assert isinstance(batch, ImageBatch)
    assert batch.pixel_values.shape == (2, 3, 3, 336, 336)
    assert batch.image_sizes.tolist() == [[336, 672], [672, 336]]
    assert batch.num_img_tokens.tolist() == [num_image_tokens(1, 2), num_image_tokens(2, 1)]
    single = proc(_rgb(600, 400))  # one image, not a list
    assert single.pixel_values.shape == (1, 5, 3, 336, 336)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4", None])
def test_num_crops_validation(bad) -> None:
    with pytest.raises(ValueError, match="num_crops"):
        ImageProcessor(num_crops=bad)
    if bad is not None:
        with pytest.raises(ValueError, match="num_crops"):
            ImageProcessor().preprocess(_rgb(), num_crops=bad)


def test_from_config() -> None:
    from phi3v.config import Phi3VConfig

    cfg = Phi3VConfig(rope_type=None, num_crops=4, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    proc = ImageProcessor.from_config(cfg)
    assert proc.num_crops == 4 and proc.image_mean == (0.5, 0.5, 0.5)
    p = proc.preprocess(Image.new("RGB", (336, 336), (255, 0, 255)))
    assert torch.equal(p.crops[1, :, 0, 0], torch.tensor([1.0, -1.0, 1.0]))  # (v/255 - .5)/.5
    ImageProcessor.from_config(SimpleNamespace(num_crops=1, image_mean=(0, 0, 0), image_std=(1, 1, 1)))


@pytest.mark.parametrize("size,nc,grid", [((1, 1), 16, (4, 4)), ((10000, 10), 16, (1, 16)), ((6000, 1), 4, (1, 4)),
                                          ((1, 6000), 1, (1, 1)), ((1000, 2), 1, (1, 1))])
def test_extreme_sizes_never_crash(size, nc, grid) -> None:
    p = ImageProcessor(num_crops=nc).preprocess(Image.new("RGB", size, (10, 200, 30)))
    assert p.grid == grid and p.crops.shape[0] == 1 + grid[0] * grid[1]
    assert torch.isfinite(p.crops).all()


def test_zero_sized_pil_image_is_an_error() -> None:
    with pytest.raises(ImageInputError, match="zero width or height"):
        ImageProcessor().preprocess(Image.new("RGB", (0, 5)))


def _norm(proc: ImageProcessor, rgb) -> torch.Tensor:
    return proc.normalize(np.array(rgb, dtype=np.uint8).reshape(1, 1, 3))[:, 0, 0]


def test_colour_modes_follow_convert_rgb() -> None:
    proc = ImageProcessor(num_crops=1)
    # RGBA / LA: alpha dropped, no compositing on white (a fully transparent red pixel stays red)
    rgba = Image.new("RGBA", (336, 336), (200, 10, 10, 0))
    assert torch.equal(proc.preprocess(rgba).crops[1, :, 100, 100], _norm(proc, (200, 10, 10)))
    la = Image.new("LA", (336, 336), (77, 0))
    assert torch.equal(proc.preprocess(la).crops[1, :, 5, 5], _norm(proc, (77, 77, 77)))
    # P with tRNS: palette colour, transparency ignored
    p = Image.new("P", (336, 336), 1)
    p.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    p.info["transparency"] = 1
    p = Image.open(io.BytesIO(_png_bytes(p)))
    assert torch.equal(proc.preprocess(p).crops[1, :, 0, 0], _norm(proc, (12, 34, 56)))
    # CMYK: Pillow's naive conversion, whatever it gives
    cmyk = Image.new("CMYK", (336, 336), (10, 50, 90, 20))
    assert torch.equal(proc.preprocess(cmyk).crops[1, :, 0, 0], _norm(proc, cmyk.convert("RGB").getpixel((0, 0))))
    # I;16: Pillow 13 clips at 255 (not a rescale)
    i16 = Image.new("I;16", (336, 336), 1000)
    assert torch.equal(proc.preprocess(i16).crops[1, :, 0, 0], _norm(proc, (255, 255, 255)))
    i16 = Image.new("I;16", (336, 336), 100)
    assert torch.equal(proc.preprocess(i16).crops[1, :, 0, 0], _norm(proc, (100, 100, 100)))


def test_exif_orientation_is_ignored() -> None:
    img = _rgb(1000, 300)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a viewer would show it portrait
    data = _png_bytes(img, exif=exif.tobytes())
    loaded = load_image(data)
    assert loaded.getexif().get(0x0112) == 6
    a = ImageProcessor(num_crops=4).preprocess(loaded)
    b = ImageProcessor(num_crops=4).preprocess(img)
    assert a.grid == b.grid == (1, 3) and torch.equal(a.crops, b.crops)


def test_canvas_padding_is_centred_white() -> None:
    canvas = hd_canvas(Image.new("RGB", (600, 100), (0, 0, 0)), num_crops=1)  # -> 336x56, padded to 336x336
    assert canvas.shape == (336, 336, 3)
    rows = np.where((canvas == 0).all(axis=(1, 2)))[0]
    assert rows[0] == (336 - 56) // 2 and len(rows) == 56  # top gets the floor half: 140 rows, bottom 140
    assert (np.delete(canvas, rows, axis=0) == 255).all()  # the rest is white
    portrait = hd_canvas(Image.new("RGB", (100, 600), (0, 0, 0)), num_crops=1)
    np.testing.assert_array_equal(portrait, canvas.transpose(1, 0, 2))


# ----------------------------------------------------------------------------------------- load_image: inputs


def test_canvas_at_the_target_size_is_the_image() -> None:
    # a 1344x1344 image at 16 crops needs no resize and no padding: the canvas is its pixels (the resize is skipped)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (1344, 1344, 3), dtype=np.uint8))
    pixels, target_h, transposed = hd_resized(img, 16)
    assert (target_h, transposed) == (1344, False)
    np.testing.assert_array_equal(hd_canvas(img, 16), np.asarray(img))


def content_key(pixels, *meta) -> str:
    return content_key_later(pixels, *meta)()


def test_content_key() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1100, 1000, 3), dtype=np.uint8)  # 3.3 MB: hashed in chunks on threads
    b = a.copy()
    b[550, 500, 1] ^= 1  # one bit in the middle
    assert content_key(a, 1344, False) == content_key(a.copy(), 1344, False)  # content, not identity
    assert len({content_key(a, 1344, False), content_key(b, 1344, False), content_key(a, 1680, False),
                content_key(a, 1344, True), content_key(a.reshape(1000, 1100, 3), 1344, False)}) == 5
    small = a[:10]  # one sha256, same rules
    assert content_key(small, 336, False) == content_key(small.copy(), 336, False) != content_key(small, 336, True)


def test_cache_key_tells_a_portrait_from_its_landscape() -> None:
    proc = ImageProcessor(num_crops=4)
    land = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 700, 3), dtype=np.uint8))
    a, b = proc.preprocess(land), proc.preprocess(land.transpose(Image.Transpose.TRANSPOSE))
    assert a.grid == b.grid[::-1] and a.key != b.key
    assert proc.preprocess(land.copy()).key == a.key and ImageProcessor(num_crops=16).preprocess(land).key != a.key


def test_load_image_every_input_kind(tmp_path: Path) -> None:
    img = _rgb(40, 30)
    ref = np.asarray(img)
    data = _png_bytes(img)
    f = tmp_path / "a.png"
    f.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for src in [img, str(f), f, f.as_uri(), data, bytearray(data), memoryview(data), ref, torch.from_numpy(ref.copy()),
                f"data:image/png;base64,{b64}", f"data:;base64,{b64}", f"data:image/png;base64,{b64[:20]}\n{b64[20:]}"]:
        out = load_image(src)
        assert isinstance(out, Image.Image) and out.size == (40, 30)
        np.testing.assert_array_equal(np.asarray(out.convert("RGB")), ref)
    assert load_image(np.zeros((5, 7), np.uint8)).mode == "L"
    assert load_image(np.zeros((5, 7, 1), np.uint8)).mode == "L"
    assert load_image(np.zeros((5, 7, 4), np.uint8)).mode == "RGBA"
    assert load_image(ref[:, ::2]).size == (20, 30)  # non-contiguous view
    assert load_image(str(f), allowed_dir=str(tmp_path)).size == (40, 30)


def test_processor_accepts_paths_and_arrays() -> None:
    astro = str(GOLDEN / "images" / "astronaut.png")
    arr = np.load(GOLDEN / "images" / "numpy_astronaut.npy")
    exp = MANIFEST["astronaut"]["results"]["nc1"]["pixel_values_sha256"]
    proc = ImageProcessor(num_crops=1)
    for src in (astro, arr, torch.from_numpy(arr)):
        assert _sha(proc([src]).pixel_values[0]) == exp


@pytest.mark.parametrize("arr,msg", [(np.zeros((5, 5, 3), np.float32), "dtype"), (np.zeros((3, 5, 6), np.uint8), "channels-first"),
                                     (np.zeros((5, 5, 2), np.uint8), "shape"), (np.zeros((1, 5, 5, 3), np.uint8), "shape"),
                                     (np.zeros((0, 5, 3), np.uint8), "zero width"), (torch.zeros(5, 5, 3), "dtype")])
def test_bad_arrays(arr, msg) -> None:
    with pytest.raises(ImageInputError, match=msg):
        load_image(arr)


def test_unsupported_type() -> None:
    with pytest.raises(ImageInputError, match="unsupported image input type"):
        load_image(12345)
    with pytest.raises(ImageInputError, match="NUL"):
        load_image("a\0b.png")


# ----------------------------------------------------------------------------------------- load_image: errors


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="not found"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(ImageInputError, match="directory"):
        load_image(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello, not an image")
    with pytest.raises(ImageInputError, match="not a recognised image"):
        load_image(str(tmp_path / "notes.txt"))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageInputError, match="empty"):
        load_image(str(tmp_path / "empty.png"))
    with pytest.raises(ImageInputError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageInputError, match="over the limit"):
        load_image(_png_bytes(_rgb()), max_bytes=100)
    (tmp_path / "a.png").write_bytes(_png_bytes(_rgb()))
    with pytest.raises(ImageInputError, match="over the limit"):
        load_image(str(tmp_path / "a.png"), max_bytes=100)
    with pytest.raises(ImageInputError, match="remote host"):
        load_image("file://server/share/a.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images(fmt: str) -> None:
    data = _png_bytes(_rgb(200, 200), fmt)
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        load_image(data[: len(data) * 2 // 3])


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h but carries one tiny (useless) IDAT: decoding it would need w*h*3 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bombs(monkeypatch) -> None:
    with pytest.raises(ImageInputError, match="decompression"):
        load_image(_png_header_only(100_000, 100_000))  # 1e10 px: refused from the header, nothing decoded
    with pytest.raises(ImageInputError, match="decompression"):
        load_image(_png_header_only(9000, 8000))  # 72M px: over our 64 Mi px default, under Pillow's own guard
    small = _png_bytes(_rgb(40, 30))
    with pytest.raises(ImageInputError, match="decompression"):
        load_image(small, max_pixels=1000)
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageInputError, match="decompression"):
        load_image(small)
    with pytest.raises(ImageInputError, match="decompression"):
        load_image(_rgb(40, 30))  # PIL images are checked too
    with pytest.raises(ImageInputError, match="limit"):
        load_image(np.zeros((40, 30, 3), np.uint8))
    assert load_image(small, max_pixels=1200).size == (40, 30)


def test_pillow_bomb_warning_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above this, errors above 2x
    with pytest.raises(ImageInputError, match="decompression"):
        load_image(_png_bytes(_rgb(40, 30)), max_pixels=10**9)


@pytest.mark.parametrize("uri,msg", [("data:image/png;base64,@@@not base64@@@", "invalid base64"),
                                     ("data:image/png;base64,iVBORw0KGgo", "invalid base64"),  # bad padding
                                     ("data:text/plain;base64,aGVsbG8=", "not an image"),
                                     ("data:image/png,rawtext", "not base64"), ("data:image/png;base64", "separator"),
                                     ("data:image/png;base64,aGVsbG8gd29ybGQ=", "not a recognised image")])
def test_bad_data_uris(uri: str, msg: str) -> None:
    with pytest.raises(ImageInputError, match=msg):
        load_image(uri)


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://x/y", "javascript://alert", "s3://bucket/key.png"])
def test_unsupported_schemes(url: str) -> None:
    with pytest.raises(ImageInputError, match="scheme"):
        load_image(url, allow_urls=True)


def test_path_policy(tmp_path: Path) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png_bytes(_rgb()))
    (inside / "ok.png").write_bytes(_png_bytes(_rgb()))
    (inside / "link.png").symlink_to(secret)
    for p in [str(secret), str(inside / ".." / "secret.png"), str(inside / "link.png"), secret.as_uri(), "/etc/passwd"]:
        with pytest.raises(ImageInputError, match="outside the allowed directory"):
            load_image(p, allowed_dir=str(inside))
    # a sibling whose name merely starts with the allowed dir's name is outside too
    sib = tmp_path / "inside2"
    sib.mkdir()
    (sib / "x.png").write_bytes(_png_bytes(_rgb()))
    with pytest.raises(ImageInputError, match="outside"):
        load_image(str(sib / "x.png"), allowed_dir=str(inside))
    assert load_image(str(inside / "ok.png"), allowed_dir=str(inside)).size == (40, 30)
    for p in [str(inside / "ok.png"), inside / "ok.png", (inside / "ok.png").as_uri()]:
        with pytest.raises(ImageInputError, match="paths are not allowed"):
            load_image(p, allow_paths=False)
    assert load_image(_png_bytes(_rgb()), allow_paths=False).size == (40, 30)


# ----------------------------------------------------------------------------------------- URLs


@pytest.fixture
def no_connect(monkeypatch):
    """Fail loudly if anything tries to open a TCP connection."""
    def boom(*a, **k):
        raise AssertionError(f"tried to connect: {a}")
    monkeypatch.setattr(socket, "create_connection", boom)


def test_urls_disabled_by_default(no_connect) -> None:
    with pytest.raises(ImageInputError, match="URLs are disabled"):
        load_image("https://example.com/cat.png")


@pytest.mark.parametrize("url", ["http://127.0.0.1/a.png", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.png",
                                 "https://192.168.1.1:8443/a.png", "http://[::1]/a.png", "http://[::ffff:127.0.0.1]/a.png",
                                 "http://0.0.0.0/a.png", "http://224.0.0.1/a.png", "http://100.64.0.1/a.png",
                                 "http://[fe80::1]/a.png", "http://[2002:a00:1::]/a.png"])
def test_private_addresses_refused_before_connecting(url: str, no_connect) -> None:
    with pytest.raises(ImageInputError, match="non-public address"):
        load_image(url, allow_urls=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}  # path -> (status, headers, body or body(handler))

    def do_GET(self):  # noqa: N802
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        if callable(body):
            body = body(self)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def local_server(monkeypatch):
    """A loopback HTTP server; the SSRF guard is relaxed for 127.0.0.1 ONLY, and connections anywhere else fail."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    real_blocked, real_connect = fetch._ip_is_blocked, socket.create_connection
    monkeypatch.setattr(fetch, "_ip_is_blocked", lambda ip: str(ip) != "127.0.0.1" and real_blocked(ip))

    def loopback_only(addr, *a, **k):
        assert addr[0] == "127.0.0.1", f"connection attempt to {addr}"
        return real_connect(addr, *a, **k)

    monkeypatch.setattr(socket, "create_connection", loopback_only)
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_url_fetch_and_redirects(local_server, monkeypatch) -> None:
    base, port = local_server
    png = _png_bytes(_rgb(40, 30))
    _Handler.routes = {
        "/a.png": (200, {"Content-Type": "image/png"}, png),
        "/hop": (302, {"Location": "/a.png"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-file": (301, {"Location": "file:///etc/passwd"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/big": (200, {}, b"x" * 5000),
        "/host": (200, {}, lambda h: png if h.headers["Host"] == f"images.example:{port}" else b"wrong host"),
    }
    np.testing.assert_array_equal(np.asarray(load_image(f"{base}/a.png", allow_urls=True)), np.asarray(_rgb(40, 30)))
    assert load_image(f"{base}/hop", allow_urls=True).size == (40, 30)
    with pytest.raises(ImageInputError, match="non-public address 169.254.169.254"):
        load_image(f"{base}/to-metadata", allow_urls=True)
    with pytest.raises(ImageInputError, match="scheme 'file'"):
        load_image(f"{base}/to-file", allow_urls=True)
    with pytest.raises(ImageInputError, match="redirects"):
        load_image(f"{base}/loop", allow_urls=True)
    with pytest.raises(ImageInputError, match="HTTP 404"):
        load_image(f"{base}/missing", allow_urls=True)
    with pytest.raises(ImageInputError, match="over the limit"):
        load_image(f"{base}/big", allow_urls=True, max_bytes=1000)
    # DNS is resolved once per hop and the connection goes to the checked address (no rebinding window);
    # the Host header still carries the original name.
    calls = []
    real_gai = socket.getaddrinfo

    def fake_gai(host, *a, **k):
        calls.append(host)
        return real_gai("127.0.0.1" if host == "images.example" else host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", fake_gai)
    assert load_image(f"http://images.example:{port}/host", allow_urls=True).size == (40, 30)
    assert [c for c in calls if c != "127.0.0.1"] == ["images.example"]  # the IP literal needs no DNS


def test_device_path_without_cuda_skips_pinned_memory() -> None:
    # a non-CUDA device (here `meta`, standing in for e.g. MPS) takes the device path without asking for pinned
    # memory, which raises on machines without CUDA; same key and shapes as the CPU path
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 700, 3), dtype=np.uint8))
    proc = ImageProcessor(num_crops=4)
    on_meta, on_cpu = proc.preprocess(img, device="meta"), proc.preprocess(img)
    assert on_meta.crops.device.type == "meta" and on_meta.crops.shape == on_cpu.crops.shape
    assert on_meta.key == on_cpu.key and on_meta.image_size == on_cpu.image_size

"""Video input: frames sampled evenly with PyAV and sent as images (API, CLI, server), under the image rules.

The videos are made here: a few frames of a distinct colour each, encoded in memory, so that the colour of a
sampled frame tells which frame it was."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest

from phi3v import LLM, SamplingParams
from phi3v.cli import main
from phi3v.processing.chat import render_chat
from phi3v.processing.video import even_indices, sample_frames

CKPT = str(Path(__file__).parent / "data" / "tiny-phi3v")
N_FRAMES = 10
COLOURS = [(25 * k, 250 - 25 * k, (90 * k) % 256) for k in range(N_FRAMES)]  # far apart pairwise


def make_video(codec: str = "mpeg4", n: int = N_FRAMES, size: tuple[int, int] = (64, 48)) -> bytes:
    """An MP4 of n frames, frame k filled with COLOURS[k % 10]."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        s.bit_rate = 2_000_000
        for k in range(n):
            arr = np.empty((size[1], size[0], 3), np.uint8)
            arr[:] = COLOURS[k % N_FRAMES]
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def which_frame(img) -> int:
    mean = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
    return int(np.argmin([np.abs(mean - c).sum() for c in COLOURS]))


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("video") / "clip.mp4"
    p.write_bytes(make_video())
    return p


def test_even_indices_take_the_middle_of_equal_runs() -> None:
    assert even_indices(10, 4) == [1, 3, 6, 8]
    assert even_indices(10, 1) == [5]
    assert even_indices(7, 7) == list(range(7))
    assert even_indices(3, 5) == [0, 0, 1, 2, 2]  # fewer frames than asked: some repeat


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])  # libx264 reorders frames (B-frames)
def test_sampled_frames_are_the_expected_ones(codec: str) -> None:
    frames = sample_frames(make_video(codec), 4)
    assert [which_frame(f) for f in frames] == [1, 3, 6, 8]
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    assert [which_frame(f) for f in sample_frames(make_video(codec, n=3), 5)] == [0, 0, 1, 2, 2]


def test_a_video_part_is_its_frames_as_images(llm: LLM, video_file: Path) -> None:
    msgs = [{"role": "user", "content": [{"type": "video", "video": str(video_file), "num_frames": 3},
                                         {"type": "text", "text": "Summarize the video."}]}]
    prompt, images = render_chat(msgs)
    assert prompt == "<|user|>\n<|image_1|>\n<|image_2|>\n<|image_3|>\nSummarize the video.<|end|>\n<|assistant|>\n"
    assert len(images) == 3
    frames = sample_frames(str(video_file), 3)
    assert [which_frame(f) for f in frames] == [1, 5, 8]
    as_images = [{"role": "user", "content": [{"type": "image", "image": f} for f in frames] +
                  [{"type": "text", "text": "Summarize the video."}]}]
    p = SamplingParams(max_tokens=8)
    v, i = llm.chat(msgs, p, num_crops=1), llm.chat(as_images, p, num_crops=1)
    assert v.token_ids == i.token_ids and v.usage["prompt_tokens"] == i.usage["prompt_tokens"]
    url = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": str(video_file), "num_frames": 3}},
                                        {"type": "text", "text": "Summarize the video."}]}]
    assert llm.chat(url, p, num_crops=1).token_ids == v.token_ids


def _video_msg(src, n: int = 2) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": src, "num_frames": n},
                                         {"type": "text", "text": "What happens?"}]}]


def test_video_sources_obey_the_image_rules(llm: LLM, video_file: Path, tmp_path: Path) -> None:
    inside = tmp_path / "media"
    inside.mkdir()
    (inside / "ok.mp4").write_bytes(video_file.read_bytes())
    ok = llm.prepare_chat(_video_msg("ok.mp4"), num_crops=1, allowed_dir=str(inside))  # relative to the folder
    assert len(ok.images) == 2
    with pytest.raises(ValueError, match="video path .* is outside the allowed directory"):
        llm.prepare_chat(_video_msg(str(video_file)), num_crops=1, allowed_dir=str(inside))
    with pytest.raises(ValueError, match="local video paths are not allowed"):
        llm.prepare_chat(_video_msg(str(video_file)), num_crops=1, allow_paths=False)
    with pytest.raises(ValueError, match="allow_url_images=True.*--allow-url-images"):
        llm.prepare_chat(_video_msg("https://example.com/clip.mp4"), num_crops=1)
    with pytest.raises(ValueError, match="video file not found"):
        llm.prepare_chat(_video_msg(str(tmp_path / "nope.mp4")), num_crops=1)


def test_video_limits_and_bad_videos(llm: LLM, video_file: Path) -> None:
    data = video_file.read_bytes()
    with pytest.raises(ValueError, match="over the limit"):
        llm.prepare_chat(_video_msg(str(video_file)), num_crops=1, max_bytes=len(data) - 1)
    with pytest.raises(ValueError, match="pixels"):
        llm.prepare_chat(_video_msg(data), num_crops=1, max_pixels=64 * 48 - 1)
    for n in (0, 65, "3"):
        with pytest.raises(ValueError, match="num_frames"):
            render_chat(_video_msg(data, n))
    with pytest.raises(ValueError, match="could not be decoded as a video"):
        llm.prepare_chat(_video_msg(b"\x00\x01 not a video" * 50), num_crops=1)
    # 40 frames at 16 crops each cannot fit a 4096-token context: refused before a frame is decoded
    with pytest.raises(ValueError, match="context holds 4096"):
        llm.prepare_chat(_video_msg(data, 40), num_crops=16)
    data_uri = "data:video/mp4;base64," + __import__("base64").b64encode(data).decode()
    assert len(llm.prepare_chat(_video_msg(data_uri), num_crops=1).images) == 2


def test_cli_run_with_a_video(capsys, llm: LLM, video_file: Path) -> None:
    code = main(["run", "--model", CKPT, "--device", "cpu", "--max-tokens", "6", "--num-crops", "1", "--json",
                 "--video", str(video_file), "--frames", "3", "What happens?"])
    out = capsys.readouterr()
    assert code == 0, out.err
    ref = llm.chat(_video_msg(str(video_file), 3), SamplingParams(max_tokens=6), num_crops=1)
    assert json.loads(out.out)["token_ids"] == ref.token_ids
    code = main(["run", "--model", CKPT, "--video", str(video_file), "--frames", "0", "Hi"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("phi3v: error: --frames must be from 1 to 64") and err.count("\n") == 1


def test_server_video_url_part(srv) -> None:
    import httpx
    from server_harness import chat_body, data_uri, expected

    uri = data_uri(make_video(), "video/mp4")
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri, "num_frames": 3}},
                                         {"type": "text", "text": "What happens?"}]}]
    r = httpx.post(f"{srv.base_url}/chat/completions", json=chat_body(msgs), timeout=60)
    assert r.status_code == 200, r.text
    ref = expected(msgs, 6)
    assert r.json()["choices"][0]["message"]["content"] == ref.text
    assert r.json()["usage"]["prompt_tokens"] == ref.usage["prompt_tokens"]
    limit = srv.settings.max_images_per_request  # each frame counts as an image
    too_many = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri, "num_frames": limit + 1}}]}]
    r = httpx.post(f"{srv.base_url}/chat/completions", json=chat_body(too_many), timeout=60)
    assert r.status_code == 400 and f"has {limit + 1} images" in r.json()["error"]["message"]

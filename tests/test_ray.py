"""Ray (extra phi3v[ray]) on the CPU: one local cluster of 2 CPUs for the module. `phi3v batch --ray` with 2 engine
actors gives the records of the single-process job although one actor is killed mid-run; `phi3v serve --replicas 2`
answers the real `openai` client (plain, streaming, images), and survives a replica killed with requests in flight:
those fail at once with 503 (or an in-band error mid-stream), the others finish, Serve starts a new replica."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from engine_common import CKPT, GOLD  # noqa: E402
from phi3v import batch_io  # noqa: E402
from phi3v.batch import run_batch  # noqa: E402
from phi3v.cli import _params, build_parser  # noqa: E402

IMG = GOLD / "images"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    serve.shutdown()
    ray.shutdown()


def _pids(title: str) -> list[int]:
    """Processes whose title (Ray sets it to the actor's class, e.g. ray::ServeReplica:phi3v:Engine) has `title`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and title in (d / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(d.name))
        except OSError:  # gone meanwhile
            continue
    return sorted(pids)


def test_ray_batch_gives_the_single_process_records_with_an_actor_killed(llm, cluster, tmp_path) -> None:  # noqa: F811
    from phi3v.distributed.ray_batch import run_ray_batch

    d = tmp_path / "imgs"
    d.mkdir()
    names = ["coffee.png", "astronaut.png", "page_L.png", "logo_RGBA.png"]
    for i in range(10):
        shutil.copy(IMG / names[i % 4], d / f"{i:02d}_{names[i % 4]}")
    (d / "zz_broken.png").write_bytes(b"\x89PNG but no more")
    common = ["batch", "--model", CKPT, "--device", "cpu", "--dtype", "fp32", "--max-tokens", "12", "--num-crops", "1",
              "--batch-size", "2", "--quiet", "--input", str(d), "--prompt", "What is it?"]
    a = build_parser().parse_args(common + ["--output", str(tmp_path / "single.jsonl")])
    assert run_batch(a, _params(a), lambda _a: llm) == 0
    single = {r["id"]: r for r in batch_io.read_records(a.output)}

    out = tmp_path / "ray.jsonl"
    a = build_parser().parse_args(common + ["--output", str(out), "--ray", "local", "--num-replicas", "2"])
    killed: list[int] = []
    finished = threading.Event()

    def kill_one_actor_mid_run() -> None:  # once the first records are out, while others are still being made
        while not finished.is_set() and not killed:
            pids = _pids("MapWorker(MapBatches(_EngineActor))")  # not fused with the CPU tasks' preparation
            n = len(batch_io.read_records(str(out)))
            if len(pids) == 2 and 2 <= n < len(single) - 2:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(n)
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one_actor_mid_run, daemon=True)
    watcher.start()
    try:
        assert run_ray_batch(a, _params(a)) == 0
    finally:
        finished.set()
        watcher.join()
    assert killed, "no actor was killed mid-run: the job was too short"
    recs = batch_io.read_records(str(out))
    assert len(recs) == len({r["id"] for r in recs}) == len(single)  # none lost, none doubled

    def same(r: dict) -> dict:  # the prefix cache's share of the prompt depends on what ran before on that engine
        usage = {k: v for k, v in (r.get("usage") or {}).items() if k != "prompt_tokens_details"}
        return {"usage": usage, **{k: r.get(k) for k in ("id", "text", "finish_reason", "error")}}

    assert sorted(map(same, recs), key=lambda r: r["id"]) == sorted(map(same, single.values()), key=lambda r: r["id"])
    assert "zz_broken.png" in {r["id"] for r in recs if "error" in r}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_replicas_answer_openai_and_survive_a_killed_replica(cluster) -> None:
    from phi3v.distributed.ray_serve import build_app
    from phi3v.server.app import Settings

    port = _free_port()
    settings = Settings(model=CKPT, served_model_name="tiny", device="cpu", dtype="fp32", max_num_seqs=4, port=port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings, 2, {"num_cpus": 0.5}), name="phi3v", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    health = _wait_ready(url, 2, set())
    first = set(health["per_replica"])
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    png = base64.b64encode((IMG / "coffee.png").read_bytes()).decode()
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}
    image_msg = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]
    chunks = list(client.chat.completions.create(model="tiny", messages=image_msg, max_tokens=5, stream=True,
                                                 temperature=0, extra_body={"num_crops": 1}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="tiny", messages=image_msg, max_tokens=5, temperature=0,
                                           extra_body={"num_crops": 1})  # greedy: the same on either replica
    assert text == whole.choices[0].message.content and chunks[-1].choices[0].finish_reason == "length"
    _wait_metrics(url, generated=4 + 5 + 5, replicas=2)  # every replica's series, summed over them

    results: dict[int, str] = {}

    def long_request(i: int) -> None:
        try:
            if i % 2:
                r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"n{i}"}],
                                                   max_tokens=300, extra_body={"ignore_eos": True})
                results[i] = f"ok {r.usage.completion_tokens}"
            else:
                s = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"s{i}"}],
                                                   max_tokens=300, stream=True, extra_body={"ignore_eos": True})
                results[i] = f"ok {sum(1 for c in s if c.choices and c.choices[0].delta.content)}"
        except openai.APIStatusError as e:
            results[i] = f"{e.status_code} {e.message}"
        except openai.APIError as e:  # an in-band error event mid-stream
            results[i] = f"stream {e.message}"

    threads = [threading.Thread(target=long_request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # all four are decoding, on both replicas
    os.kill(_pids("ServeReplica:phi3v:Engine")[0], signal.SIGKILL)
    t0 = time.monotonic()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request hangs"
    failed = [v for v in results.values() if not v.startswith("ok")]
    assert failed and all("replica serving this request died" in v for v in failed), results
    assert all(v.startswith(("503", "stream")) for v in failed), results
    assert time.monotonic() - t0 < 60
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "after"}], max_tokens=3)
    assert r.usage.completion_tokens == 3
    _wait_ready(url, 2, first)  # Serve started a new replica in place of the dead one
    serve.delete("phi3v")


def _wait_ready(url: str, n: int, old: set[str]) -> dict:
    """/health once n replicas are ready, one of them not among `old` when `old` is given."""
    deadline = time.monotonic() + 120
    body: dict = {}
    while time.monotonic() < deadline:
        try:
            body = httpx.get(url + "/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            body = {}
        if body.get("replicas_ready") == n and (not old or set(body["per_replica"]) - old):
            return body
        time.sleep(0.5)
    raise AssertionError(f"not {n} replicas ready: {body}")


def _wait_metrics(url: str, generated: int, replicas: int) -> None:
    """/metrics, once it shows `generated` tokens in all (replicas report every second) and `replicas` replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 15
    while True:
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5).text)}
        tokens = sum(s.value for s in fams["phi3v_generation_tokens"].samples if s.name.endswith("_total"))
        seen = {s.labels["replica"] for s in fams["phi3v_num_requests_running"].samples}
        ready = fams["phi3v_replicas_ready"].samples[0].value
        if (tokens, len(seen), ready) == (generated, replicas, replicas) or time.monotonic() > deadline:
            assert (tokens, len(seen), ready) == (generated, replicas, replicas)
            return
        time.sleep(0.5)


def test_merged_metrics_label_each_replica() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from phi3v.distributed.ray_serve import merge_metrics
    from phi3v.server.frontend import ServerMetrics

    texts = {}
    for rid, n in (("r1", 5), ("r2", 7)):
        m = ServerMetrics("tiny")
        m.gen_tokens.labels("tiny").inc(n)
        m.e2e.labels("tiny").observe(0.3)
        texts[rid] = generate_latest(m.registry).decode()
    fams = {f.name: f for f in text_string_to_metric_families(merge_metrics(texts))}
    tokens = {s.labels["replica"]: s.value for s in fams["phi3v_generation_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens == {"r1": 5, "r2": 7}
    counts = [s for s in fams["phi3v_e2e_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert sorted((s.labels["replica"], s.value) for s in counts) == [("r1", 1), ("r2", 1)]

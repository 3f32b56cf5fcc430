"""`phi3v batch --ray ADDRESS`: the batch job as a Ray Data pipeline.

    inputs (driver) -> from_items -> map(_prepare_row): decode + HD preprocess + tokenize, CPU tasks
                    -> map_batches(_EngineActor): generation, an actor pool with one phi3v engine per GPU; two calls
                       (batches) at once per actor feed one engine loop, which never drains between batches
                    -> iter_rows (driver): each record written once, as it arrives, with the progress bar

The driver lists the inputs with `phi3v.batch_io` (ids, prompts, the rows' errors: the same as the single-process
job), drops the ids already in the output (resume) and hands the rest to Ray; the image bytes are read and decoded
on the CPU tasks, wherever in the cluster they run (paths must then be on a folder every node sees). Records are
written by the driver, into the same JSONL/Parquet output as the single-process job, so resume, `--limit` and
the formats are the same.

Actor failure: the pool's actors restart (max_restarts=-1) and the batch of a dead actor is run again on its
successor (max_task_retries=-1); an actor hands its batch's records back only when the batch is done, so a killed
actor's rows are neither lost nor written twice (and the driver writes each id at most once besides).
"""

from __future__ import annotations

import argparse
import json
import pickle
import queue
import sys
import threading
from concurrent.futures import Future
from typing import Any, Iterator

from phi3v import batch_io
from phi3v.extras import install_hint
from phi3v.sampling_params import SamplingParams


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError(f"--ray needs Ray Data: {install_hint('ray')}") from None
    return ray


def connect(address: str, **kwargs: Any) -> Any:
    """`local`: a new Ray cluster on this machine; `auto`: the running one (`ray start --head`); else its address."""
    ray = _ray()
    if not ray.is_initialized():
        kwargs.setdefault("logging_level", "WARNING")
        kwargs.setdefault("log_to_driver", False)
        if address == "local":
            kwargs.setdefault("include_dashboard", False)
        ray.init(address=address, **kwargs)
    return ray


# ---------------------------------------------------------------- CPU side: decode + preprocess + tokenize


def _no_lora(name: str) -> int:
    raise ValueError(f"LoRA adapter {name!r}: per-request adapters are not supported with --ray yet")


def _preparer(folder: str, device_type: str, dtype: str | None) -> Any:
    """What `LLM.prepare` runs, without the model: the tokenizer and image processor of a checkpoint, crops built
    on the CPU in the engine's dtype, always made (the requests are pickled to the actors). The context-length
    check is the engine's (actor)."""
    import torch

    from phi3v.api import _dtype
    from phi3v.config import Phi3VConfig
    from phi3v.prepare import Preparer
    from phi3v.processing.image import ImageProcessor
    from phi3v.processing.tokenizer import Tokenizer

    config = Phi3VConfig.from_pretrained(folder)
    # allow_url_images: the person at the command line names the images (as `phi3v batch`)
    return Preparer(Tokenizer.from_pretrained(folder), ImageProcessor.from_config(config), torch.device("cpu"),
                    _dtype(dtype, torch.device(device_type)), sys.maxsize, allow_url_images=True, lora_index=_no_lora)


_PREPARERS: dict[tuple[str, str, str | None], Any] = {}  # per worker process: loaded once, reused by every task


def _prepare_row(row: dict[str, Any], folder: str, device_type: str, dtype: str | None, base: SamplingParams,
                 image_dir: str | None) -> dict[str, Any]:
    """{"id", "request" (pickled JSONL-shaped dict)} -> {"id", "n_images", "prepared" (pickled PreparedRequest) or
    "error"}. A bad request becomes its error here, as in the single-process job."""
    from phi3v.batch import _prepare

    key = (folder, device_type, dtype)
    if key not in _PREPARERS:
        _PREPARERS[key] = _preparer(folder, device_type, dtype)
    req = pickle.loads(row["request"])
    out = {"id": row["id"], "n_images": len(req.get("images") or []), "prepared": b"", "error": ""}
    try:
        out["prepared"] = pickle.dumps(_prepare(_PREPARERS[key], req, base, image_dir))
    except (ValueError, OSError) as e:
        out["error"] = " ".join(str(e).split()) or type(e).__name__
    return out


# ---------------------------------------------------------------- GPU side: one engine per actor


class _EngineLoop:
    """One engine fed from a queue by a thread of its own: the requests of several calls (batches) run in one continuous
    batch, so the engine never drains between two calls. `submit` -> a Future of the request's Completion."""

    def __init__(self, llm: Any) -> None:
        self.llm, self.inbox = llm, queue.Queue()
        threading.Thread(target=self._loop, name="phi3v-engine", daemon=True).start()

    def submit(self, req: Any) -> Future:
        fut: Future = Future()
        self.inbox.put((req, fut))
        return fut

    def _loop(self) -> None:
        drv, eng = self.llm.driver, self.llm.engine  # the request driver the API and the server use too
        live: dict[str, Future] = {}
        while True:
            # block while idle; otherwise admit what waits while the engine's own queue is short
            while not drv.has_unfinished() or (eng.num_waiting < eng.max_num_seqs and not self.inbox.empty()):
                req, fut = self.inbox.get()
                try:
                    live[drv.add(req)] = fut
                except ValueError as e:  # this request only
                    fut.set_result(e)
            try:
                events = drv.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails the requests in it, the loop goes on
                for rid, fut in live.items():
                    drv.abort(rid)
                    fut.set_result(RuntimeError(f"the engine step failed: {type(e).__name__}: {e}"))
                live.clear()
                continue
            for ev in events:
                if ev.error is not None:
                    live.pop(ev.rid).set_result(ev.error)
                elif ev.done is not None:
                    live.pop(ev.rid).set_result(ev.done)


class _EngineActor:
    """One phi3v engine per actor. Calls run concurrently (threads): each hands its requests to the engine loop and
    waits for them, so the requests of the next batch join the engine while the last ones of this batch finish."""

    def __init__(self, model: str, device: str | None, dtype: str | None, max_num_seqs: int, kv_cache_dtype: str,
                 switches: dict[str, Any]) -> None:
        from phi3v.api import LLM

        self.llm = LLM(model, device=device, dtype=dtype, allow_url_images=True, max_num_seqs=max_num_seqs,
                       kv_cache_dtype=kv_cache_dtype, **switches)
        self.llm.warmup()
        self.loop = _EngineLoop(self.llm)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        ids = [str(i) for i in batch["id"]]
        records: list[dict[str, Any] | None] = [None] * len(ids)
        waiting: list[tuple[int, Future]] = []
        ctx = self.llm.engine.max_model_len
        for k, (err, blob) in enumerate(zip(batch["error"], batch["prepared"])):
            if err:
                records[k] = batch_io.make_record(ids[k], error=str(err))
                continue
            req = pickle.loads(blob)
            if len(req.prompt_ids) >= ctx:  # LLM.prepare's check, with the engine's context
                records[k] = batch_io.make_record(ids[k], error=(
                    f"the prompt is {len(req.prompt_ids)} tokens (images included) but the context holds {ctx}: "
                    "use fewer images, fewer crops (num_crops) or a shorter prompt"))
                continue
            waiting.append((k, self.loop.submit(req)))
        for k, fut in waiting:
            done = fut.result()
            records[k] = (batch_io.make_record(ids[k], error=" ".join(str(done).split())) if isinstance(done, Exception)
                          else batch_io.make_record(ids[k], done))
        # records go back only now, all together: a batch cut short by a dead actor is retried whole
        return {"id": ids, "n_images": [int(n) for n in batch["n_images"]],
                "record": [json.dumps(r, ensure_ascii=False) for r in records]}


def _actor_pool(ray: Any, n: int) -> Any:
    """n actors, each running up to 2 calls at once (the engine loop overlaps them); older Ray: one at a time."""
    try:
        return ray.data.ActorPoolStrategy(size=n, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    except TypeError:
        return ray.data.ActorPoolStrategy(size=n)


# ---------------------------------------------------------------- the job


def _plan(ray: Any, a: argparse.Namespace) -> tuple[str, int, dict[str, Any], dict[str, Any]]:
    """(engine device, number of actors, ray args of an actor, ray args of a CPU task)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = a.device or ("cuda" if gpus else "cpu")
    if device.startswith("cuda"):
        if not gpus:
            raise ValueError("--device cuda but the Ray cluster has no GPU")
        n = a.num_replicas or gpus
        return device, n, {"num_gpus": 1, "num_cpus": 1}, {"num_cpus": 1}
    n = a.num_replicas or 1
    cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
    share = min(1.0, cpus / (2 * n))  # CPU engines take half the CPUs between them, the preparation tasks the rest
    return device, n, {"num_cpus": share}, {"num_cpus": share / 2}  # (a task's share differs: see _pipeline)


def run_ray_batch(a: argparse.Namespace, base: SamplingParams) -> int:
    from phi3v.cli import engine_switches
    from phi3v.hub import resolve_model

    if a.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if getattr(a, "lora", None):
        raise ValueError("--lora is not supported with --ray yet: run the batch without --ray")
    items = batch_io.read_job_inputs(a)
    batch_io.cut_torn_tail(batch_io.journal_path(a.output))
    done = batch_io.done_ids(a.output)
    ray = connect(a.ray)
    device, n, actor_args, task_args = _plan(ray, a)
    folder = resolve_model(a.model)
    todo = [it for it in items if it.id not in done and it.error is None]
    progress = batch_io.Progress(sum(it.id not in done for it in items), sum(it.id in done for it in items),
                                 a.output, disable=a.quiet)
    written: set[str] = set()
    with open(batch_io.journal_path(a.output), "a", encoding="utf-8") as out:
        def write(rec: dict[str, Any], n_images: int) -> None:
            if rec["id"] in written:  # a retried batch's record that already came back once
                return
            written.add(rec["id"])
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            progress.update(rec, n_images)

        for it in items:
            if it.id not in done and it.error is not None:
                write(batch_io.make_record(it.id, error=it.error), 0)
        if todo:
            for row in _pipeline(ray, a, base, todo, folder, device, n, actor_args, task_args, engine_switches()):
                write(json.loads(row["record"]), int(row["n_images"]))
    batch_io.finish_output(a.output)
    print(progress.close() + f" on Ray ({n} engine{'s' * (n > 1)}, {device})", file=sys.stderr)
    return 0


def _pipeline(ray: Any, a: argparse.Namespace, base: SamplingParams, todo: list[batch_io.InputItem], folder: str,
              device: str, n: int, actor_args: dict[str, Any], task_args: dict[str, Any],
              switches: dict[str, Any]) -> Iterator[dict]:
    ctx = ray.data.DataContext.get_current()
    for name, value in (("enable_progress_bars", False), ("print_on_execution_start", False)):
        if hasattr(ctx, name):
            setattr(ctx, name, value)
    per_call = a.batch_size  # requests per call; with 2 calls in flight per actor its engine has a batch waiting
    rows = [{"id": it.id, "request": pickle.dumps(it.request)} for it in todo]
    # small blocks (<= 4 requests): the preparation spreads over every CPU, the engines get their first work early
    # and records come back as each call ends (Ray Data bundles the blocks into calls of `per_call` requests)
    ds = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // min(4, per_call)))
    ds = ds.map(_prepare_row, fn_kwargs={"folder": folder, "device_type": device.split(":")[0], "dtype": a.dtype,
                                         "base": base, "image_dir": a.image_dir},
                **task_args)  # other resources than the actors': Ray Data then does not fuse this step into them
    # (on CPU tasks of their own, the decoding keeps pace with the engines); an actor sees its GPU as cuda:0
    ds = ds.map_batches(_EngineActor, batch_size=per_call, batch_format="numpy",
                        compute=_actor_pool(ray, n),
                        fn_constructor_kwargs={"model": folder, "device": device.split(":")[0], "dtype": a.dtype,
                                               "max_num_seqs": a.batch_size, "kv_cache_dtype": a.kv_cache_dtype,
                                               "switches": switches},
                        **actor_args)  # the pool's defaults: max_restarts=-1, max_task_retries=-1 (see module doc)
    yield from ds.iter_rows()

"""A bounded schemathesis run against the server's own OpenAPI schema: no input may produce a 5xx.

Positive and negative (schema-violating) cases for every route. Generated bodies keep their
shape, but the model name is set to the served one (so requests reach the engine, not just the
404) and max_tokens is capped to keep CPU time low. URL images are off on this server, so a
generated URL can never cause traffic.
"""

from __future__ import annotations

import collections
import os

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from server_harness import MODEL_ID, TINY, start_server  # noqa: E402

from phi3v.server.app import Settings, create_app  # noqa: E402

_SCHEMA = create_app(Settings(model=TINY, served_model_name=MODEL_ID)).openapi()  # no model load: lifespan not run
schema = schemathesis.openapi.from_dict(_SCHEMA)
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                                deterministic=True)


_SEEN: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def srv():
    return start_server("schema", max_num_seqs=8, max_images_per_request=4)


def _bound(case) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = MODEL_ID
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > 4:
            body[key] = 4
    if not body.get("max_tokens") and not body.get("max_completion_tokens"):
        body["max_tokens"] = 4  # unset or null means "the rest of the context": too slow for CPU fuzzing


@schema.parametrize()
@settings(max_examples=int(os.environ.get("PHI3V_FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=list(HealthCheck), database=None)
@pytest.mark.slow
def test_no_server_errors(srv, case):
    _bound(case)
    r = case.call(base_url=srv.url, timeout=60)
    _SEEN[(case.method, case.path, r.status_code)] += 1
    assert r.status_code < 500, (case.method, case.path, case.body if not isinstance(case.body, bytes) else "<bytes>",
                                 r.status_code, r.text[:500])
    if r.status_code >= 400 and "application/json" in str(r.headers.get("content-type")):
        err = r.json().get("error")
        assert err and {"message", "type", "param", "code"} <= set(err), r.text[:500]


def test_server_still_healthy_after_fuzzing(srv):
    import httpx

    posts = collections.Counter(status // 100 for (m, path, status), n in _SEEN.items() if m == "POST"
                                for _ in range(n) if path == "/v1/chat/completions")
    assert not _SEEN or (posts[2] and posts[4]), posts  # the fuzzing reached the engine and the validators

    assert httpx.get(srv.url + "/health").status_code == 200
    assert srv.frontend.dead is None

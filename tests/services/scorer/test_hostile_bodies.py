"""Hostile request bodies sent to a real ``online-ctr scorer`` process.

Each body must get a 4xx status, never a 5xx, and the process must go on
scoring with the same model afterwards. ``test_api.py`` checks the error
bodies in detail against the application in a thread. These tests check the
running service with its default limits of 1 MiB per body and 1000
impressions per batch.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from shared.registry import ModelRegistry
from tests.services.conftest import ServiceProcess, wait_until
from tests.services.scorer.conftest import KEYS, is_ready, scorer_process_env, trained_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

START_TIMEOUT_S = 30.0
# Generous for a body of up to 2 MiB on a loaded 2-core machine.
REQUEST_TIMEOUT_S = 30.0
MAX_BODY_BYTES = 1024 * 1024
VALID = {"item_id": "item-1", "features": {"position": 2}, "log_impression": False}


def nested(depth: int, opening: bytes, closing: bytes, innermost: bytes = b"1") -> bytes:
    return opening * depth + innermost + closing * depth


def in_features(value: bytes) -> bytes:
    return b'{"item_id": "a", "features": {"x": ' + value + b"}}"


def many_features(count: int) -> bytes:
    features = b", ".join(b'"f%d": 1' % index for index in range(count))
    return b'{"item_id": "a", "features": {' + features + b"}}"


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


# (case, path, body, expected status). Every body but the two over-limit
# ones fits in the 1 MiB limit, so it reaches the JSON parser.
HOSTILE_BODIES = [
    ("malformed json", "/v1/score", b'{"item_id": ', 422),
    ("empty body", "/v1/score", b"", 422),
    ("trailing garbage", "/v1/score", b'{"item_id": "a"} trailing', 422),
    ("json null", "/v1/score", b"null", 422),
    ("top-level string", "/v1/score", b'"item-1"', 422),
    ("not utf-8", "/v1/score", b'{"item_id": "\xff\xfe"}', 400),
    ("lone surrogate escape", "/v1/score", b'{"item_id": "\\ud800"}', 422),
    ("item id a number", "/v1/score", b'{"item_id": 5}', 422),
    ("item id an object", "/v1/score", b'{"item_id": {"a": 1}}', 422),
    ("features a list", "/v1/score", b'{"item_id": "a", "features": [1, 2]}', 422),
    ("features a string", "/v1/score", b'{"item_id": "a", "features": "x"}', 422),
    ("opt-out a string", "/v1/score", b'{"item_id": "a", "log_impression": "no"}', 422),
    ("batch requests an object", "/v1/score/batch", b'{"requests": {"item_id": "a"}}', 422),
    ("batch item a number", "/v1/score/batch", b'{"requests": [1]}', 422),
    (
        "item id of 1000000 characters",
        "/v1/score",
        b'{"item_id": "' + b"a" * 1_000_000 + b'"}',
        422,
    ),
    (
        "user id of 150000 escaped nulls",
        "/v1/score",
        b'{"item_id": "a", "user_id": "' + b"\\u0000" * 150_000 + b'"}',
        422,
    ),
    (
        "feature text of 1000000 characters",
        "/v1/score",
        in_features(b'"' + b"x" * 1_000_000 + b'"'),
        422,
    ),
    (
        "feature name of 1000000 characters",
        "/v1/score",
        b'{"item_id": "a", "features": {"' + b"n" * 1_000_000 + b'": 1}}',
        422,
    ),
    ("50000 features", "/v1/score", many_features(50_000), 422),
    ("integer of 4000 digits", "/v1/score", in_features(b"9" * 4000), 422),
    ("integer of 5000 digits", "/v1/score", in_features(b"9" * 5000), 400),
    ("float overflowing to infinity", "/v1/score", in_features(b"1e400"), 422),
    ("arrays nested 500 deep", "/v1/score", in_features(nested(500, b"[", b"]")), 422),
    ("arrays nested 100000 deep", "/v1/score", nested(100_000, b"[", b"]"), 400),
    ("objects nested 100000 deep", "/v1/score", nested(100_000, b'{"a": ', b"}"), 400),
    ("feature nested 100000 deep", "/v1/score", in_features(nested(100_000, b"[", b"]")), 400),
    (
        "batch item nested 100000 deep",
        "/v1/score/batch",
        b'{"requests": [' + nested(100_000, b"[", b"]") + b"]}",
        400,
    ),
    (
        "batch of 1001 impressions",
        "/v1/score/batch",
        b'{"requests": [' + b", ".join([b'{"item_id": "a"}'] * 1001) + b"]}",
        422,
    ),
    ("body over the limit", "/v1/score", b'{"item_id": "' + b"a" * MAX_BODY_BYTES + b'"}', 413),
    (
        "batch body over the limit",
        "/v1/score/batch",
        b'{"requests": [' + b", ".join([b'{"item_id": "' + b"a" * 200 + b'"}'] * 5000) + b"]}",
        413,
    ),
]


@pytest.fixture(scope="module")
def scorer(
    redis_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServiceProcess]]:
    """A scorer process serving one trained model, shared by the tests of this module."""
    namespace = f"hostile-{uuid.uuid4().hex[:8]}:models"
    client = redis.Redis.from_url(redis_server.url)
    ModelRegistry(client, KEYS, namespace=namespace).publish(
        trained_bundle(seed=1), examples_seen=1
    )
    client.close()
    env = scorer_process_env(redis_server.url, namespace)
    url = f"http://127.0.0.1:{env['ONLINE_CTR_HTTP_PORT']}"
    log_path = tmp_path_factory.mktemp("hostile") / "scorer.log"
    service = ServiceProcess(["scorer"], env, log_path).start()
    try:
        wait_until(
            lambda: is_ready(url),
            timeout=START_TIMEOUT_S,
            message="the scorer did not start",
            services=(service,),
        )
        yield url, service
    finally:
        service.kill()


@pytest.fixture(scope="module")
def expected_probability() -> float:
    bundle = trained_bundle(seed=1)
    return bundle.score({"item_id": VALID["item_id"], **VALID["features"]})[0]


def assert_still_scoring(url: str, service: ServiceProcess, expected: float) -> None:
    """Check that the process runs, scores as before and has counted no 5xx response."""
    assert service.is_running(), service.log()[-3000:]
    assert httpx.get(f"{url}/healthz", timeout=REQUEST_TIMEOUT_S).status_code == 200
    response = httpx.post(f"{url}/v1/score", json=VALID, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    assert response.json()["probability"] == expected
    assert response.json()["model_version"] == "champion:1"
    metrics = httpx.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT_S).text
    server_errors = [
        line
        for line in metrics.splitlines()
        if line.startswith("octr_scorer_requests_total{") and 'status="5' in line
    ]
    assert server_errors == []


@pytest.mark.parametrize(
    ("case", "path", "body", "status"),
    HOSTILE_BODIES,
    ids=[case[0] for case in HOSTILE_BODIES],
)
def test_hostile_body_gets_4xx(scorer, expected_probability, case, path, body, status):
    url, service = scorer

    response = httpx.post(
        f"{url}{path}",
        content=body,
        headers={"content-type": "application/json"},
        timeout=REQUEST_TIMEOUT_S,
    )

    assert response.status_code == status, response.text[:500]
    assert len(response.content) < 4096, "the error body echoes the input"
    assert_still_scoring(url, service, expected_probability)


def test_chunked_body_over_limit_gets_413(scorer, expected_probability):
    url, service = scorer

    # A generator body is sent chunked, without a Content-Length.
    response = httpx.post(
        f"{url}/v1/score",
        content=chunks(2 * MAX_BODY_BYTES),
        headers={"content-type": "application/json"},
        timeout=REQUEST_TIMEOUT_S,
    )

    assert response.status_code == 413, response.text[:500]
    assert_still_scoring(url, service, expected_probability)


def test_declared_length_over_limit_rejected_unread(scorer, expected_probability):
    url, service = scorer
    port = int(url.rsplit(":", 1)[1])
    head = (
        b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n"
    )

    # Only the head and a few body bytes are sent, so a 413 shows that the
    # server did not wait for the declared 100 MiB.
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(head + b'{"item_id": ')
        reply = sock.recv(4096)

    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert_still_scoring(url, service, expected_probability)

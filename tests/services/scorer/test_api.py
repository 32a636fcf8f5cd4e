"""The scorer's HTTP API: responses, validation errors, limits and request metrics."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from prometheus_client import CollectorRegistry

from services.scorer.app import create_app
from shared.events import Impression
from shared.snapshots import ModelBundle
from tests.services.scorer.conftest import (
    FixedProbability,
    RecordingSink,
    holder_with,
    loaded,
    scorer_settings,
    stub_bundle,
    trained_bundle,
)

JSON = {"content-type": "application/json"}


@pytest.fixture
def bundle():
    return trained_bundle()


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def metrics_registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(serve, bundle, sink, metrics_registry):
    app = create_app(
        scorer_settings(max_body_bytes=4096, max_batch_size=3),
        holder=holder_with(loaded(bundle, version=7)),
        sink=sink,
        metrics_registry=metrics_registry,
    )
    return serve(app)


def test_score_valid_request(client, bundle, sink):
    body = {
        "impression_id": "imp-1",
        "user_id": "user-1",
        "item_id": "item-3",
        "features": {"position": 2, "campaign": "c1", "mobile": True, "price": 9.5},
    }

    response = client.post("/v1/score", json=body)

    assert response.status_code == 200, response.text
    result = response.json()
    expected, baseline = bundle.score({"item_id": "item-3", **body["features"]})
    assert result == {
        "impression_id": "imp-1",
        "probability": expected,
        "model_version": "champion:7",
        "arm": "champion",
    }
    assert response.headers["content-type"] == "application/json"

    (record,) = sink.records
    assert record.impression_id == "imp-1"
    assert record.user_id == "user-1"
    assert record.item_id == "item-3"
    assert record.features == body["features"]
    assert record.model_version == "champion:7"
    assert record.arm == "champion"
    assert record.probability == expected
    assert record.baseline_probability == baseline
    assert record.shadow_probability is None


def test_logged_features_equal_scored_features(client, bundle, sink):
    body = {"item_id": "item-2", "features": {"position": 1, "item_flag": "x"}}

    probability = client.post("/v1/score", json=body).json()["probability"]

    impression = sink.records[0].to_impression()
    assert isinstance(impression, Impression)
    assert bundle.score(impression.learning_features())[0] == probability
    assert impression.served is not None
    assert impression.served.probability == probability


def test_impression_id_generated(client, sink):
    result = client.post("/v1/score", json={"item_id": "item-1"}).json()

    assert uuid.UUID(result["impression_id"])
    assert sink.records[0].impression_id == result["impression_id"]


def test_log_opt_out(client, sink):
    response = client.post("/v1/score", json={"item_id": "item-1", "log_impression": False})

    assert response.status_code == 200
    assert sink.records == []


def test_batch_scores_in_order(client, bundle, sink):
    requests = [{"item_id": f"item-{index}", "features": {"position": index}} for index in range(3)]

    response = client.post("/v1/score/batch", json={"requests": requests})

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [result["probability"] for result in results] == [
        bundle.score({"item_id": f"item-{index}", "position": index})[0] for index in range(3)
    ]
    assert [record.item_id for record in sink.records] == ["item-0", "item-1", "item-2"]


INVALID_BODIES = [
    ("missing item", {"features": {}}, ["body", "item_id"], "missing"),
    ("item not a string", {"item_id": 5}, ["body", "item_id"], "string_type"),
    ("item too long", {"item_id": "i" * 257}, ["body", "item_id"], "string_too_long"),
    ("control character", {"item_id": "a\x00b"}, ["body", "item_id"], "control_characters"),
    ("empty user", {"item_id": "a", "user_id": ""}, ["body", "user_id"], "string_too_short"),
    ("unknown field", {"item_id": "a", "price": 1}, ["body", "price"], "extra_forbidden"),
    (
        "nested feature",
        {"item_id": "a", "features": {"tags": {"x": 1}}},
        ["body", "features", "tags"],
        "feature_value_type",
    ),
    (
        "list feature",
        {"item_id": "a", "features": {"tags": [1, 2]}},
        ["body", "features", "tags"],
        "feature_value_type",
    ),
    (
        "null feature",
        {"item_id": "a", "features": {"tags": None}},
        ["body", "features", "tags"],
        "feature_value_type",
    ),
    (
        "feature text too long",
        {"item_id": "a", "features": {"text": "x" * 1025}},
        ["body", "features", "text"],
        "string_too_long",
    ),
    (
        "huge integer",
        {"item_id": "a", "features": {"n": 10**30}},
        ["body", "features", "n"],
        "int_range",
    ),
    ("features not a map", {"item_id": "a", "features": [1]}, ["body", "features"], "dict_type"),
    (
        "opt-out not a bool",
        {"item_id": "a", "log_impression": "no"},
        ["body", "log_impression"],
        "bool_type",
    ),
    ("body not an object", [1, 2], ["body"], "model_attributes_type"),
]


@pytest.mark.parametrize(
    ("case", "body", "location", "error_type"),
    INVALID_BODIES,
    ids=[case[0] for case in INVALID_BODIES],
)
def test_invalid_request_names_field(client, sink, case, body, location, error_type):
    response = client.post("/v1/score", json=body)

    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert [error["loc"] for error in errors] == [location]
    assert errors[0]["type"] == error_type
    assert errors[0]["msg"]
    assert sink.records == []


@pytest.mark.parametrize(
    ("case", "content", "status", "location"),
    [
        ("malformed json", b'{"item_id": ', 422, ["body", 12]),
        (
            "not a number",
            b'{"item_id": "a", "features": {"x": NaN}}',
            422,
            ["body", "features", "x"],
        ),
        (
            "infinity",
            b'{"item_id": "a", "features": {"x": Infinity}}',
            422,
            ["body", "features", "x"],
        ),
        ("not utf-8", b'{"item_id": "\xff\xfe"}', 400, None),
        ("deeply nested", b"[" * 1500 + b"]" * 1500, 400, None),
        (
            "long integer literal",
            b'{"item_id": "a", "features": {"n": ' + b"9" * 4000 + b"}}",
            422,
            ["body", "features", "n"],
        ),
    ],
)
def test_malformed_body_gets_4xx(client, case, content, status, location):
    response = client.post("/v1/score", content=content, headers=JSON)

    assert response.status_code == status, response.text
    if location is not None:
        assert response.json()["detail"][0]["loc"] == location


def test_body_without_json_content_type_rejected(client):
    response = client.post("/v1/score", content=b'{"item_id": "a"}')

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]


def test_too_long_feature_name_cut_in_location(client):
    name = "n" * 3000

    response = client.post("/v1/score", json={"item_id": "a", "features": {name: 1}})

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "features", "n" * 128 + "...", "[key]"]
    assert error["type"] == "string_too_long"
    assert len(response.content) < 1024


def test_batch_over_configured_size_rejected(client):
    requests = [{"item_id": "a"}] * 4

    response = client.post("/v1/score/batch", json={"requests": requests})

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "requests"]
    assert "ONLINE_CTR_MAX_BATCH_SIZE" in error["msg"]


def test_empty_batch_rejected(client):
    response = client.post("/v1/score/batch", json={"requests": []})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "requests"]


def test_invalid_batch_item_named(client):
    response = client.post("/v1/score/batch", json={"requests": [{"item_id": "a"}, {}]})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "requests", 1, "item_id"]


def test_declared_body_over_limit_gets_413(client, sink):
    body = b'{"item_id": "' + b"a" * 5000 + b'"}'

    response = client.post("/v1/score", content=body, headers=JSON)

    assert response.status_code == 413
    assert "4096 bytes" in response.json()["detail"]
    assert "ONLINE_CTR_MAX_BODY_BYTES" in response.json()["detail"]
    assert sink.records == []


def test_streamed_body_over_limit_gets_413(client):
    def chunks():
        for _ in range(10):
            yield b" " * 1000

    # A generator body is sent chunked, without a Content-Length.
    response = client.post("/v1/score", content=chunks(), headers=JSON)

    assert response.status_code == 413
    assert "4096 bytes" in response.json()["detail"]


def test_body_within_limit_accepted(client):
    body = b'{"item_id": "a"}' + b" " * 3000

    response = client.post("/v1/score", content=body, headers=JSON)

    assert response.status_code == 200


def test_score_before_model_gets_503(serve):
    client = serve(create_app(scorer_settings(), holder=holder_with(), sink=RecordingSink()))

    response = client.post("/v1/score", json={"item_id": "a"})

    assert response.status_code == 503
    assert "no verified model of 'champion' is loaded yet" in response.json()["detail"]
    assert response.headers["retry-after"] == "5"
    assert client.post("/v1/score/batch", json={"requests": [{"item_id": "a"}]}).status_code == 503


def test_readyz_before_model(serve):
    client = serve(create_app(scorer_settings(), holder=holder_with(), sink=RecordingSink()))

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["ready"] is False
    assert "no verified model" in response.json()["reason"]
    assert client.get("/healthz").status_code == 200


def test_readyz_with_fresh_model(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    assert body["champion"]["model_version"] == "champion:7"
    assert body["challenger"] is None
    # This app serves a holder's models without a registry, so it never contacts Redis.
    assert body["registry"] == {
        "reachable": None,
        "seconds_since_last_success": None,
        "error": None,
    }


def test_readyz_with_old_model(serve):
    created_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    champion = loaded(stub_bundle(), created_at=created_at)
    app = create_app(
        scorer_settings(max_model_age_seconds=3600),
        holder=holder_with(champion),
        sink=RecordingSink(),
    )
    client = serve(app)

    response = client.get("/readyz")

    assert response.status_code == 503
    assert "ONLINE_CTR_MAX_MODEL_AGE_SECONDS" in response.json()["reason"]
    # An old model still serves: readiness only steers new traffic away.
    assert client.post("/v1/score", json={"item_id": "a"}).status_code == 200


def test_ready_gauge_follows_readyz(serve, metrics_registry):
    fresh = loaded(stub_bundle())
    old = loaded(stub_bundle(), created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    holder = holder_with(fresh)
    app = create_app(
        scorer_settings(max_model_age_seconds=3600),
        holder=holder,
        sink=RecordingSink(),
        metrics_registry=metrics_registry,
    )
    serve(app)

    assert metrics_registry.get_sample_value("octr_scorer_ready") == 1.0
    assert metrics_registry.get_sample_value("octr_scorer_max_model_age_seconds") == 3600.0

    holder.install(old)
    app.state.refresher.refresh_model_ages()

    assert metrics_registry.get_sample_value("octr_scorer_ready") == 0.0


class FailingModel(FixedProbability):
    def predict_proba_one(self, x: dict) -> dict[bool, float]:
        raise TypeError("unsupported operand type(s) for -: 'str' and 'float'")


def test_model_error_gets_500_and_counted(serve, metrics_registry):
    bundle = ModelBundle(FailingModel(), FixedProbability(0.01), "champion")
    app = create_app(
        scorer_settings(),
        holder=holder_with(loaded(bundle)),
        sink=RecordingSink(),
        metrics_registry=metrics_registry,
    )
    client = serve(app)

    response = client.post("/v1/score", json={"item_id": "a"})

    assert response.status_code == 500
    assert "champion:1" in response.json()["detail"]
    assert "TypeError" in response.json()["detail"]
    value = metrics_registry.get_sample_value(
        "octr_scorer_scoring_errors_total", {"arm": "champion"}
    )
    assert value == 1.0


class FailsOnFlag(FixedProbability):
    def predict_proba_one(self, x: dict) -> dict[bool, float]:
        if x.get("bad"):
            raise ValueError("cannot score a flagged impression")
        return super().predict_proba_one(x)


def test_failed_batch_logs_nothing(serve):
    sink = RecordingSink()
    bundle = ModelBundle(FailsOnFlag(0.2), FixedProbability(0.01), "champion")
    app = create_app(scorer_settings(), holder=holder_with(loaded(bundle)), sink=sink)
    client = serve(app)
    requests = [{"item_id": "a"}, {"item_id": "b", "features": {"bad": True}}]

    response = client.post("/v1/score/batch", json={"requests": requests})

    assert response.status_code == 500
    assert sink.records == []
    assert app.state.drift.snapshot() == []


def test_requests_counted_by_endpoint_arm_status(client, metrics_registry):
    client.post("/v1/score", json={"item_id": "a"})
    client.post("/v1/score", json={"item_id": "a"})
    client.post("/v1/score", json={"item_id": 1})
    client.post("/v1/score/batch", json={"requests": [{"item_id": "a"}, {"item_id": "b"}]})
    client.get("/healthz")
    client.get("/no-such-path")

    def requests(endpoint: str, arm: str, status: str) -> float | None:
        return metrics_registry.get_sample_value(
            "octr_scorer_requests_total", {"endpoint": endpoint, "arm": arm, "status": status}
        )

    assert requests("/v1/score", "champion", "200") == 2.0
    assert requests("/v1/score", "none", "422") == 1.0
    assert requests("/v1/score/batch", "champion", "200") == 2.0
    assert requests("/healthz", "none", "200") == 1.0
    assert requests("other", "none", "404") == 1.0
    latency_count = metrics_registry.get_sample_value(
        "octr_scorer_request_duration_seconds_count", {"endpoint": "/v1/score"}
    )
    assert latency_count == 3.0


def test_metrics_endpoint_exposes_scorer_metrics(client):
    client.post("/v1/score", json={"item_id": "a"})

    text = client.get("/metrics").text

    assert (
        'octr_scorer_requests_total{arm="champion",endpoint="/v1/score",status="200"} 1.0' in text
    )
    assert "octr_scorer_psi_threshold 0.25" in text
    assert "octr_scorer_missing_ratio_threshold 0.05" in text
    assert "octr_scorer_unseen_category_ratio_threshold 0.1" in text


def test_openapi_describes_request_and_response(client):
    schema = client.get("/openapi.json").json()

    score = schema["paths"]["/v1/score"]["post"]
    assert score["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ScoreRequest"
    }
    assert "ScoreResponse" in str(score["responses"]["200"])
    assert {"413", "422", "503"} <= set(score["responses"])
    assert set(schema["components"]["schemas"]["ScoreRequest"]["properties"]) == {
        "impression_id",
        "user_id",
        "item_id",
        "features",
        "log_impression",
    }

"""Champion/challenger traffic split and shadow mode."""

from __future__ import annotations

import math

import pytest
from kafka import KafkaConsumer
from prometheus_client import CollectorRegistry

from services.scorer.app import create_app
from services.scorer.metrics import ScorerMetrics
from services.scorer.models import ArmRouter
from shared.events import parse_impression
from shared.localstack import create_topics
from tests.services.conftest import wait_until
from tests.services.scorer.conftest import (
    RecordingSink,
    holder_with,
    loaded,
    scorer_settings,
    stub_bundle,
)

CHAMPION_PROBABILITY = 0.1
CHALLENGER_PROBABILITY = 0.9


def two_arms():
    return holder_with(
        loaded(stub_bundle(CHAMPION_PROBABILITY), version=4),
        loaded(stub_bundle(CHALLENGER_PROBABILITY, name="challenger"), version=2, arm="challenger"),
    )


def score_users(client, users: list[str | None], batch_size: int = 1000) -> list[dict]:
    results = []
    for start in range(0, len(users), batch_size):
        requests = [
            {"item_id": "item-1", **({"user_id": user} if user else {})}
            for user in users[start : start + batch_size]
        ]
        response = client.post("/v1/score/batch", json={"requests": requests})
        assert response.status_code == 200, response.text
        results.extend(response.json()["results"])
    return results


def test_challenger_share_within_tolerance(serve):
    share, users = 0.3, 4000
    sink = RecordingSink()
    client = serve(
        create_app(scorer_settings(challenger_share=share), holder=two_arms(), sink=sink)
    )

    results = score_users(client, [f"user-{index}" for index in range(users)])

    challenger = [r for r in results if r["arm"] == "challenger"]
    # Four standard deviations of a binomial share: fails about once in 16,000 runs
    # for a fair hash, and the hash is fixed, so the outcome is too.
    tolerance = 4 * math.sqrt(share * (1 - share) / users)
    assert abs(len(challenger) / users - share) < tolerance
    assert {r["probability"] for r in challenger} == {CHALLENGER_PROBABILITY}
    assert {r["model_version"] for r in challenger} == {"challenger:2"}
    champion = [r for r in results if r["arm"] == "champion"]
    assert {r["probability"] for r in champion} == {CHAMPION_PROBABILITY}
    assert [record.arm for record in sink.records] == [r["arm"] for r in results]


def test_user_stays_on_one_arm(serve):
    client = serve(create_app(scorer_settings(challenger_share=0.5), holder=two_arms()))

    for user in ("user-1", "user-2", "user-3", "user-4"):
        arms = {r["arm"] for r in score_users(client, [user] * 20)}
        assert len(arms) == 1, user


def test_impression_id_splits_without_user(serve):
    client = serve(create_app(scorer_settings(challenger_share=0.5), holder=two_arms()))

    results = score_users(client, [None] * 2000)

    challenger_share = sum(r["arm"] == "challenger" for r in results) / len(results)
    assert abs(challenger_share - 0.5) < 4 * math.sqrt(0.25 / 2000)


def test_split_position_is_deterministic():
    metrics = ScorerMetrics(CollectorRegistry())
    router = ArmRouter(0.5, shadow_mode=False, salt="salt-a", metrics=metrics)
    other_salt = ArmRouter(0.5, shadow_mode=False, salt="salt-b", metrics=metrics)

    positions = [router.split_position(f"user-{index}") for index in range(1000)]

    assert positions == [router.split_position(f"user-{index}") for index in range(1000)]
    assert all(0.0 <= position < 1.0 for position in positions)
    assert positions != [other_salt.split_position(f"user-{index}") for index in range(1000)]


def test_missing_challenger_serves_champion(serve):
    holder = holder_with(loaded(stub_bundle(CHAMPION_PROBABILITY)))
    client = serve(create_app(scorer_settings(challenger_share=1.0), holder=holder))

    results = score_users(client, [f"user-{index}" for index in range(50)])

    assert {r["arm"] for r in results} == {"champion"}


def test_shadow_mode_returns_champion_and_logs_both(serve):
    sink = RecordingSink()
    client = serve(create_app(scorer_settings(shadow_mode=True), holder=two_arms(), sink=sink))

    results = score_users(client, [f"user-{index}" for index in range(100)])

    assert {r["arm"] for r in results} == {"champion"}
    assert {r["probability"] for r in results} == {CHAMPION_PROBABILITY}
    assert len(sink.records) == 100
    for record in sink.records:
        assert record.arm == "champion"
        assert record.model_version == "champion:4"
        assert record.probability == CHAMPION_PROBABILITY
        assert record.shadow_probability == CHALLENGER_PROBABILITY


def test_shadow_and_share_rejected_together():
    with pytest.raises(ValueError, match="challenger_share must be 0"):
        scorer_settings(shadow_mode=True, challenger_share=0.2)


@pytest.mark.integration
def test_shadow_mode_logs_both_to_kafka(serve, kafka_broker, unique_name):
    topic = f"{unique_name}-impressions"
    create_topics(kafka_broker.bootstrap, {topic: 2})
    settings = scorer_settings(
        shadow_mode=True,
        log_impressions=True,
        kafka_bootstrap_servers=kafka_broker.bootstrap,
        topic_impressions=topic,
    )
    client = serve(create_app(settings, holder=two_arms()))

    sent = [
        client.post(
            "/v1/score",
            json={"user_id": f"user-{index}", "item_id": "item-1", "features": {"slot": index}},
        ).json()
        for index in range(10)
    ]

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_broker.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    records = []

    def read() -> bool:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
        return len(records) >= len(sent)

    try:
        wait_until(read, timeout=20, message="the shadow impressions did not reach Kafka")
    finally:
        consumer.close()

    by_id = {record.key.decode(): record for record in records}
    assert set(by_id) == {result["impression_id"] for result in sent}
    for index, result in enumerate(sent):
        record = by_id[result["impression_id"]]
        impression = parse_impression(record.value)
        assert record.timestamp == int(impression.event_time.timestamp() * 1000)
        assert impression.user_id == f"user-{index}"
        assert impression.features == {"slot": index}
        assert impression.served is not None
        assert impression.served.arm == "champion"
        assert impression.served.model_version == "champion:4"
        assert impression.served.probability == CHAMPION_PROBABILITY
        assert impression.served.shadow_probability == CHALLENGER_PROBABILITY
        assert impression.served.baseline_probability == 0.01

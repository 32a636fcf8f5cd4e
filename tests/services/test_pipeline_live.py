"""The live pipeline, joiner and trainer, against a real broker and Redis.

The set of (impression_id, label) that reaches the trainer after
de-duplication must equal what offline replay decides from the same file, and
stopping both services mid-stream must neither lose an example nor let the
model learn one twice.
"""

from __future__ import annotations

import gzip
import itertools

import pytest
import redis

from shared.learn.sampling import FakeNegativeCalibrated
from shared.registry import ModelRegistry
from shared.snapshots import SigningKeys
from tests.services.conftest import SIGNING_KEY, wait_until
from tests.services.joiner.test_joiner_live import SAMPLE, produce, replay_labels

pytestmark = pytest.mark.integration

SOURCE_LABELS = {"click": 1, "window_closed": 0, "late_click_correction": 1}


def dedup_markers(client: redis.Redis, namespace: str) -> list[tuple[str, str]]:
    """Read the trainer's de-duplication markers as (impression_id, label source) pairs."""
    prefix = f"{namespace}:seen:{{"
    markers = []
    for key in client.scan_iter(match=f"{namespace}:seen:*", count=10_000):
        dedup_key = key.decode()[len(prefix) : -1]
        impression_id, source = dedup_key.rsplit("/", 1)
        markers.append((impression_id, source))
    return markers


def learned_labels(client: redis.Redis, namespace: str) -> set[tuple[str, int]]:
    """Return (impression_id, label) for each decided example that reached learning."""
    return {
        (impression_id, SOURCE_LABELS[source])
        for impression_id, source in dedup_markers(client, namespace)
        if source != "served"
    }


def newest_snapshot(client: redis.Redis, namespace: str):
    registry = ModelRegistry(client, SigningKeys.parse(SIGNING_KEY, "k1"), namespace)
    return registry.load_latest("champion")


def test_replay_equals_live(live_env, start_service, redis_client) -> None:
    expected = replay_labels(SAMPLE)
    produce(SAMPLE, live_env)

    joiner = start_service(["joiner"], live_env, name="joiner")
    trainer = start_service(["trainer"], live_env, name="trainer")
    namespace = live_env["ONLINE_CTR_DEDUP_NAMESPACE"]
    wait_until(
        lambda: (
            len(learned_labels(redis_client, namespace)) >= len(expected)
            or not (joiner.is_running() and trainer.is_running())
        ),
        timeout=240,
        message="the trainer did not see every example",
        services=(joiner, trainer),
    )
    assert trainer.stop() == 0, trainer.log()
    assert joiner.stop() == 0, joiner.log()

    assert learned_labels(redis_client, namespace) == expected
    metadata, bundle = newest_snapshot(redis_client, live_env["ONLINE_CTR_REGISTRY_NAMESPACE"])
    assert metadata.examples_seen == len(expected)
    assert sum(bundle.source_offsets.values()) >= len(expected)


def test_restart_mid_stream_loses_and_repeats_nothing(
    live_env, start_service, redis_client
) -> None:
    expected = replay_labels(SAMPLE)
    namespace = live_env["ONLINE_CTR_DEDUP_NAMESPACE"]
    produce(SAMPLE, live_env)

    joiner = start_service(["joiner"], live_env, name="joiner")
    trainer = start_service(["trainer"], live_env, name="trainer")
    wait_until(
        lambda: len(learned_labels(redis_client, namespace)) >= 15_000,
        timeout=180,
        message="the trainer did not start learning",
        services=(joiner, trainer),
    )
    assert joiner.stop() == 0, joiner.log()
    assert trainer.stop() == 0, trainer.log()
    seen_at_stop = len(learned_labels(redis_client, namespace))
    assert seen_at_stop < len(expected)

    joiner = start_service(["joiner"], live_env, name="joiner")
    trainer = start_service(["trainer"], live_env, name="trainer")
    wait_until(
        lambda: len(learned_labels(redis_client, namespace)) >= len(expected),
        timeout=240,
        message="the restarted services did not finish the stream",
        services=(joiner, trainer),
    )
    assert trainer.stop() == 0, trainer.log()
    assert joiner.stop() == 0, joiner.log()

    assert learned_labels(redis_client, namespace) == expected
    metadata, _ = newest_snapshot(redis_client, live_env["ONLINE_CTR_REGISTRY_NAMESPACE"])
    assert metadata.examples_seen == len(expected)


def test_served_notices_become_fake_negatives(
    live_env, start_service, redis_client, tmp_path
) -> None:
    stream = tmp_path / "head.jsonl"
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as sample:
        stream.write_text("".join(itertools.islice(sample, 8000)), encoding="utf-8")
    expected = replay_labels(stream)
    impression_ids = {impression_id for impression_id, _ in expected}
    namespace = live_env["ONLINE_CTR_DEDUP_NAMESPACE"]
    produce(stream, live_env)

    joiner_env = {**live_env, "ONLINE_CTR_EMIT_SERVED": "true"}
    trainer_env = {**live_env, "ONLINE_CTR_DELAYED_FEEDBACK": "fake_negative"}
    joiner = start_service(["joiner"], joiner_env, name="joiner")
    trainer = start_service(["trainer"], trainer_env, name="trainer")
    wait_until(
        lambda: len(dedup_markers(redis_client, namespace)) >= 2 * len(expected),
        timeout=180,
        message="the trainer did not read every served notice and label",
        services=(joiner, trainer),
    )
    assert trainer.stop() == 0, trainer.log()
    assert joiner.stop() == 0, joiner.log()

    served = {
        impression_id
        for impression_id, source in dedup_markers(redis_client, namespace)
        if source == "served"
    }
    assert served == impression_ids
    assert learned_labels(redis_client, namespace) == expected
    metadata, bundle = newest_snapshot(redis_client, live_env["ONLINE_CTR_REGISTRY_NAMESPACE"])
    assert isinstance(bundle.model, FakeNegativeCalibrated)
    assert metadata.examples_seen == len(expected)
    assert "no served notice read" not in trainer.log()

"""The live joiner against a real broker and Redis gives replay's labels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from kafka import KafkaConsumer

from shared.events import parse_example
from shared.join import JoinSettings
from shared.replay.runner import ReplayConfig, run_replay
from tests.services.conftest import wait_until

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).parents[3] / "data" / "samples" / "obd-small.jsonl.gz"


def replay_labels(path: Path) -> set[tuple[str, int]]:
    labels: set[tuple[str, int]] = set()
    run_replay(
        ReplayConfig(events=path, join=JoinSettings()),
        on_example=lambda e: labels.add((e.impression.impression_id, e.label)),
    )
    return labels


def produce(path: Path, env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "shared.cli", "produce", "--events", str(path)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )


class ExampleReader:
    """Read the examples topic from the beginning, without a group.

    Every reader opened in a test is closed after it by the ``close_example_readers``
    fixture, so that no consumer outlives its broker.
    """

    opened: ClassVar[list[ExampleReader]] = []

    def __init__(self, bootstrap: str, topic: str) -> None:
        ExampleReader.opened.append(self)
        self.consumer = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            max_poll_records=10_000,
        )
        self.examples: list[tuple[str, int, str]] = []

    def poll(self) -> int:
        for batch in self.consumer.poll(timeout_ms=500).values():
            for record in batch:
                example = parse_example(record.value)
                self.examples.append(
                    (example.impression.impression_id, example.label, example.label_source.value)
                )
        return len(self.examples)

    def labels(self) -> set[tuple[str, int]]:
        return {(impression_id, label) for impression_id, label, _ in self.examples}

    def close(self) -> None:
        self.consumer.close()

    @classmethod
    def close_all(cls) -> None:
        """Close every reader opened since the last call."""
        while cls.opened:
            cls.opened.pop().close()


def test_live_joiner_equals_replay(pipeline_env, start_service, kafka_broker) -> None:
    expected = replay_labels(SAMPLE)
    produce(SAMPLE, pipeline_env)
    env = {**pipeline_env, "ONLINE_CTR_IDLE_TIMEOUT_SECONDS": "2"}

    joiner = start_service(["joiner"], env)
    reader = ExampleReader(kafka_broker.bootstrap, env["ONLINE_CTR_TOPIC_EXAMPLES"])
    wait_until(
        lambda: reader.poll() >= len(expected) or not joiner.is_running(),
        timeout=180,
        message="examples did not reach the replay count",
    )

    assert joiner.is_running(), joiner.log()
    assert reader.labels() == expected

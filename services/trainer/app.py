"""The trainer's consume-learn-publish loop.

Each cycle polls labelled examples, drops duplicates, learns the rest with
the shared learner and metrics, and publishes a signed snapshot every N
examples or T seconds. A snapshot records the consumer position it covers,
and the offsets are committed right after it is published: the model is the
trainer's state, so nothing counts as processed until a snapshot contains it.
A restarted trainer loads the newest snapshot and seeks to its positions, so
it neither skips nor learns twice what that snapshot already holds.
"""

from __future__ import annotations

import logging
import threading

import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from services.trainer.dedup import RedisDeduplicator, Sighting
from services.trainer.metrics import TrainerMetrics
from services.trainer.settings import TrainerSettings
from shared.clock import Clock, SystemClock
from shared.drift import FeatureProfileBuilder
from shared.errors import InvalidEventError, SnapshotError, UnavailableError
from shared.events import LabeledExample, LabelSource, parse_example
from shared.learn.learner import OnlineLearner, Scores
from shared.learn.models import BASELINE_MODEL, build_model
from shared.learn.sampling import NegativeSampler
from shared.metrics.evaluation import ProgressiveEvaluation
from shared.registry import ModelRegistry
from shared.service import ExponentialBackoff
from shared.snapshots import ModelBundle

logger = logging.getLogger(__name__)

# Under fake-negative calibration, this many decided examples without a single
# served notice means the joiner does not emit them, which is logged as an error.
SERVED_NOTICE_CHECK_AFTER = 1000

# An offset commit waits at most this long for the group coordinator. During a
# broker outage kafka-python would otherwise retry for the consumer's request
# timeout, and the snapshot records the positions anyway.
COMMIT_TIMEOUT_MS = 10_000


def served_scores(example: LabeledExample) -> Scores | None:
    """Return the scores logged by the scorer for this impression, if it logged any."""
    served = example.impression.served
    if served is None or served.baseline_probability is None:
        return None
    return Scores(model=served.probability, baseline=served.baseline_probability)


class _RebalanceListener(ConsumerRebalanceListener):
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_partitions_revoked(self, revoked):
        self.trainer.on_revoked(revoked)

    def on_partitions_assigned(self, assigned):
        self.trainer.on_assigned(assigned)


class Trainer:
    """The trainer loop; ``run`` returns when ``stop`` is set, after a final snapshot."""

    def __init__(
        self,
        settings: TrainerSettings,
        consumer: KafkaConsumer,
        registry: ModelRegistry,
        deduplicator: RedisDeduplicator,
        metrics: TrainerMetrics,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.registry = registry
        self.deduplicator = deduplicator
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self.sampler = NegativeSampler(
            settings.negative_sampling_rate, settings.negative_sampling_correction
        )
        self.learner = OnlineLearner(
            model_name=settings.model,
            model=self.sampler.wrap(build_model(settings.model)),
            baseline=build_model(BASELINE_MODEL),
            evaluation=ProgressiveEvaluation(settings.rolling_window, settings.segment_features),
            delayed_feedback=settings.delayed_feedback,
        )
        self.profile = FeatureProfileBuilder()
        # Next offset to read per partition of the examples topic.
        self.positions: dict[int, int] = {}
        self.restored_positions: dict[int, int] = {}
        # Per partition, the offset below which this process has read every
        # record or restored it from the snapshot. Rebalances keep it.
        self.read_through: dict[int, int] = {}
        self.examples_seen = 0
        self.decided_examples = 0
        self.served_notices = 0
        self.unpublished = 0
        self.last_snapshot_at = self.clock.monotonic()
        # Delays between attempts while Redis fails. No snapshot is tried before publish_retry_at.
        self.redis_backoff = ExponentialBackoff()
        self.publish_retry_at = 0.0
        self.kafka_backoff = ExponentialBackoff()

    # Life cycle.

    def restore(self) -> None:
        """Load the newest snapshot of the model slot, if any, and remember its positions."""
        try:
            loaded = self.registry.load_latest(self.settings.model_slot)
        except SnapshotError as error:
            # Starting from scratch would silently throw away the model; stop instead.
            raise SnapshotError(
                f"cannot resume from the newest snapshot of {self.settings.model_slot!r}: {error}"
            ) from None
        if loaded is None:
            logger.info("No snapshot of %r yet; starting a fresh model", self.settings.model_slot)
            return
        metadata, bundle = loaded
        self.learner.model = bundle.model
        self.learner.baseline = bundle.baseline
        self.examples_seen = metadata.examples_seen
        prefix = f"{self.settings.topic_examples}/"
        self.restored_positions = {
            int(key[len(prefix) :]): offset
            for key, offset in bundle.source_offsets.items()
            if key.startswith(prefix)
        }
        self.read_through = dict(self.restored_positions)
        self.metrics.model_version.set(metadata.version)
        logger.info(
            "Resumed %r version %d: %d examples seen, positions %s",
            self.settings.model_slot,
            metadata.version,
            metadata.examples_seen,
            self.restored_positions,
        )

    def subscribe(self) -> None:
        """Subscribe to the examples topic with the rebalance listener."""
        self.consumer.subscribe([self.settings.topic_examples], listener=_RebalanceListener(self))

    def on_assigned(self, assigned) -> None:
        """Seek to the snapshot's positions on a partition's first assignment.

        They win over committed offsets once. After a later rebalance this
        process has read past them, so the consumer goes on from the committed
        offsets, and ``read_through`` drops what it reads a second time.
        """
        for tp in assigned:
            restored = self.restored_positions.pop(tp.partition, None)
            if restored is not None:
                self.consumer.seek(tp, restored)
                self.positions[tp.partition] = restored
        logger.info("Partitions assigned: %s", sorted(tp.partition for tp in assigned))

    def on_revoked(self, revoked) -> None:
        """Publish what was learned so the next owner resumes from it."""
        # kafka-python 3 calls rebalance listeners on its network thread, where
        # a blocking commit raises RuntimeError. The snapshot records the
        # positions, and this process drops what it reads again below them.
        if revoked and self.unpublished:
            self.publish(commit=False)
        for tp in revoked:
            self.positions.pop(tp.partition, None)

    def run(self, stop: threading.Event) -> None:
        """Run cycles until ``stop`` is set, then publish a last snapshot."""
        logger.info(
            "Trainer started: topic %s, model %s published as %r",
            self.settings.topic_examples,
            self.settings.model,
            self.settings.model_slot,
        )
        while not stop.is_set():
            self.run_cycle()
        if self.unpublished:
            self.publish()
        logger.info("Trainer stopping")

    def close(self) -> None:
        """Leave the consumer group."""
        self.consumer.close()

    # One cycle.

    def run_cycle(self) -> None:
        """Poll once, learn, and publish when a snapshot is due."""
        try:
            records = self.consumer.poll(
                timeout_ms=self.settings.poll_timeout_ms,
                max_records=self.settings.max_poll_records,
            )
        except KafkaError as error:
            # kafka-python raises here when a rebalance fails, for example
            # while the broker is down. The next poll joins the group again.
            delay = self.kafka_backoff.next_delay()
            logger.warning(
                "Polling Kafka failed (attempt %d: %s); retrying in %.1f s",
                self.kafka_backoff.attempt,
                error,
                delay,
            )
            self.clock.sleep(delay)
            return
        self.kafka_backoff.reset()

        try:
            for tp, batch in records.items():
                self._learn_batch(tp, batch)
        except redis.exceptions.RedisError as error:
            self._rewind(records, error)
            return
        if records:
            self.redis_backoff.reset()

        if self._snapshot_due():
            self.publish()
        self._update_lag()

    def _learn_batch(self, tp: TopicPartition, batch) -> None:
        self.metrics.examples_consumed.inc(len(batch))
        parsed: list[tuple[LabeledExample, Sighting]] = []
        for record in batch:
            try:
                example = parse_example(record.value or b"")
            except InvalidEventError as error:
                self.metrics.invalid_examples.labels(reason=error.reason).inc()
                logger.warning(
                    "Skipping invalid example at %s/%d@%d: %s",
                    tp.topic,
                    tp.partition,
                    record.offset,
                    error,
                )
                continue
            parsed.append(
                (example, Sighting(example.dedup_key, tp.topic, tp.partition, record.offset))
            )

        first = self.deduplicator.first_sightings(
            [sighting for _, sighting in parsed], self.read_through
        )

        for (example, _), is_first in zip(parsed, first, strict=True):
            if not is_first:
                self.metrics.duplicates_dropped.inc()
                continue
            self._learn_one(example)
        if batch:
            self.positions[tp.partition] = batch[-1].offset + 1
            self.read_through[tp.partition] = max(
                self.read_through.get(tp.partition, 0), batch[-1].offset + 1
            )

    def _learn_one(self, example: LabeledExample) -> None:
        if example.label_source == LabelSource.SERVED:
            self._learn_served(example)
            return

        self.decided_examples += 1
        if (
            self.decided_examples == SERVED_NOTICE_CHECK_AFTER
            and self.settings.delayed_feedback == "fake_negative"
            and self.served_notices == 0
        ):
            # Under fake-negative calibration a negative is learned only from
            # its served notice, so without notices the model learns only clicks.
            logger.error(
                "%d decided examples but no served notice read: the model learns only "
                "positives; set ONLINE_CTR_EMIT_SERVED=true on the joiner, or "
                "ONLINE_CTR_DELAYED_FEEDBACK=none on the trainer",
                self.decided_examples,
            )

        served = served_scores(example)
        weight = self.sampler.weight(example)
        if weight == 0.0:
            self.metrics.negatives_sampled_out.inc()
            self.learner.observe(example, served)
            return

        self.learner.learn(example, served, weight)
        self.metrics.examples_learned.labels(label=str(example.label)).inc()
        self.examples_seen += 1
        self.unpublished += 1
        if served is not None:
            self.profile.update(example.impression.learning_features(), served.model)

    def _learn_served(self, example: LabeledExample) -> None:
        self.served_notices += 1
        if self.settings.delayed_feedback != "fake_negative":
            self.metrics.served_notices.labels(action="ignored").inc()
            return

        self.learner.on_served(example.impression)
        self.metrics.served_notices.labels(action="learned").inc()
        self.unpublished += 1

    def _rewind(self, records, error: Exception) -> None:
        """Seek back to the first record of each batch not learned, then wait before the retry."""
        unlearned = 0
        for tp, batch in records.items():
            if batch and self.positions.get(tp.partition, -1) <= batch[0].offset:
                self.consumer.seek(tp, batch[0].offset)
                unlearned += len(batch)

        delay = self.redis_backoff.next_delay()
        logger.warning(
            "De-duplicating failed on Redis (attempt %d: %s); %d examples are read again "
            "after a retry in %.1f s",
            self.redis_backoff.attempt,
            error,
            unlearned,
            delay,
        )
        # The heartbeat thread keeps the group membership during the wait,
        # which stays below the 10 s maximum delay.
        self.clock.sleep(delay)

    def _snapshot_due(self) -> bool:
        if self.unpublished == 0 or self.clock.monotonic() < self.publish_retry_at:
            return False
        if self.unpublished >= self.settings.snapshot_every_examples:
            return True
        return (
            self.clock.monotonic() - self.last_snapshot_at >= self.settings.snapshot_every_seconds
        )

    def publish(self, commit: bool = True) -> None:
        """Publish a snapshot of the model, then commit the offsets it covers if ``commit``."""
        topic = self.settings.topic_examples
        positions = dict(self.positions)
        offsets = {f"{topic}/{partition}": offset for partition, offset in positions.items()}
        bundle = ModelBundle(
            model=self.learner.model,
            baseline=self.learner.baseline,
            model_name=self.settings.model_slot,
            source_offsets=offsets,
        )
        try:
            metadata = self.registry.publish(
                bundle,
                examples_seen=self.examples_seen,
                metrics=self._snapshot_metrics(),
                reference=self.profile.build(),
            )
        except (SnapshotError, UnavailableError, redis.exceptions.RedisError) as error:
            # The registry raises UnavailableError when Redis cannot be reached.
            self.metrics.snapshot_failures.inc()
            delay = self.redis_backoff.next_delay()
            self.publish_retry_at = self.clock.monotonic() + delay
            logger.warning(
                "Publishing a snapshot failed (attempt %d: %s); offsets stay uncommitted, "
                "retrying in %.1f s",
                self.redis_backoff.attempt,
                error,
                delay,
            )
            return

        self.redis_backoff.reset()
        self.unpublished = 0
        self.last_snapshot_at = self.clock.monotonic()
        self.metrics.model_version.set(metadata.version)
        self.metrics.last_snapshot.set(self.clock.time())
        if commit:
            self._commit(positions)
        self._export_evaluation()

    def _commit(self, positions: dict[int, int]) -> None:
        """Commit the positions a published snapshot covers, by partition of the examples topic."""
        topic = self.settings.topic_examples
        commit = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
            for partition, offset in positions.items()
        }
        if not commit:
            return
        try:
            self.consumer.commit(commit, timeout_ms=COMMIT_TIMEOUT_MS)
        except (CommitFailedError, KafkaError) as error:
            # The snapshot contains the positions, and a restart resumes from it anyway.
            logger.warning("Offset commit failed (%s); the snapshot keeps the positions", error)

    def _snapshot_metrics(self) -> dict[str, float | None]:
        report = self.learner.evaluation.report()
        values: dict[str, float | None] = {}
        for kind in ("served", "prelearn"):
            for arm in ("model", "baseline"):
                for name in ("log_loss", "normalized_entropy", "auc", "calibration"):
                    values[f"{kind}_{arm}_{name}"] = report[kind][arm][name]
        return values

    def _export_evaluation(self) -> None:
        evaluation = self.learner.evaluation
        use_served = evaluation.served["model"].count > 0
        rolling = {arm: evaluation.rolling[arm].report() for arm in ("model", "baseline")}
        overall = {
            arm: (evaluation.served if use_served else evaluation.prelearn)[arm].report()
            for arm in ("model", "baseline")
        }
        for arm in ("model", "baseline"):
            source = rolling[arm] if use_served else overall[arm]
            for name, gauge in self.metrics.evaluation.items():
                value = getattr(source, name)
                if value is not None:
                    gauge.labels(arm=arm).set(value)
            for name, gauge in self.metrics.evaluation_overall.items():
                value = getattr(overall[arm], name)
                if value is not None:
                    gauge.labels(arm=arm).set(value)
        for feature, by_value in evaluation.segments.items():
            for value, metrics in by_value.items():
                for arm, arm_metrics in metrics.items():
                    report = arm_metrics.report()
                    if report.normalized_entropy is not None:
                        self.metrics.segment_normalized_entropy.labels(
                            feature=feature, value=value, arm=arm
                        ).set(report.normalized_entropy)
                self.metrics.segment_examples.labels(feature=feature, value=value).set(
                    metrics["model"].count
                )

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            # A position not known yet would be fetched from the broker, so
            # the lag waits for the next cycle instead.
            position = self.consumer.position(tp, timeout_ms=0)
            if highwater is not None and position is not None:
                lag = max(0, highwater - position)
                self.metrics.consumer_lag.labels(partition=str(tp.partition)).set(lag)

"""The models the scorer serves, how they are loaded, and how traffic is split between them.

Request handlers read ``ModelHolder.models`` once per request and use that
:class:`ServingModels` object throughout. The reloader thread builds a new
object and replaces the old one with a single reference assignment, which
CPython performs atomically. So a request never observes half a swap and
never waits for a reload.

A snapshot is verified before it is unpickled, and each failure is counted
by its reason:

- ``unavailable``: Redis could not be reached; retried after an exponential
  back-off of at most 10 s.
- ``not_found``: the version was dropped between listing and fetching it;
  retried at the next poll.
- ``verification_failed``: unsigned, tampered, signed with an unknown key,
  or malformed.
- ``version_mismatch``: the signed model name or version differs from the
  key it was stored under, so it was copied.
- ``river_version_mismatch``: pickled by another River major.minor release.
- ``deserialisation_failed``: verified, but unpickling raised.

The last four are permanent for the same stored bytes, so a version that
failed with one of them is not tried again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import redis

from services.scorer.metrics import ScorerMetrics
from shared import snapshots
from shared.clock import Clock, SystemClock
from shared.errors import SnapshotError, UnavailableError, describe_value
from shared.registry import Announcement, AnnouncementSubscription, ModelRegistry
from shared.service import ExponentialBackoff
from shared.snapshots import ModelBundle, SnapshotMetadata, load_snapshot, verify_snapshot

logger = logging.getLogger(__name__)

Arm = Literal["champion", "challenger"]
ARMS: tuple[Arm, ...] = ("champion", "challenger")

PERMANENT_REASONS = frozenset(
    {"verification_failed", "version_mismatch", "river_version_mismatch", "deserialisation_failed"}
)
# The blob header as shared.snapshots documents it: magic, format version, metadata length.
_BLOB_HEADER = struct.Struct(">8sBI")


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A verified snapshot, unpickled and ready to score; never changed after loading."""

    arm: Arm
    metadata: SnapshotMetadata
    bundle: ModelBundle
    loaded_at: float

    @property
    def slot(self) -> str:
        """The registry model name the snapshot was loaded from."""
        return self.metadata.model_name

    @property
    def version(self) -> int:
        """The snapshot version."""
        return self.metadata.version

    @property
    def model_version(self) -> str:
        """The identifier returned to callers and logged with impressions: ``<name>:<version>``."""
        return f"{self.metadata.model_name}:{self.metadata.version}"

    def age_seconds(self, now: float) -> float:
        """Return the seconds since the trainer created the snapshot."""
        return max(0.0, now - self.metadata.created_at.timestamp())


@dataclass(frozen=True, slots=True)
class ServingModels:
    """The models served at one moment, by arm; None where no verified model is loaded."""

    champion: LoadedModel | None = None
    challenger: LoadedModel | None = None

    def get(self, arm: Arm) -> LoadedModel | None:
        """Return the model of an arm."""
        return self.champion if arm == "champion" else self.challenger


@dataclass(frozen=True, slots=True)
class RegistryStatus:
    """The reloader's latest contact with the model registry, in Unix seconds.

    ``reachable`` is None before the first attempt. ``error`` and
    ``unreachable_since`` are set only while the registry is unreachable.
    """

    reachable: bool | None = None
    last_success_at: float | None = None
    error: str | None = None
    unreachable_since: float | None = None


@dataclass(frozen=True, slots=True)
class ReloadFailure:
    """The last snapshot of an arm that could not be loaded, and why."""

    arm: Arm
    slot: str
    version: int | None
    reason: str
    message: str
    at: float


class ModelHolder:
    """The served models, swapped as a whole, and the last reload failure of each arm.

    Readers take ``models`` without a lock. Writers hold ``_write_lock`` so
    that two writers cannot lose each other's update.
    """

    def __init__(self, models: ServingModels | None = None) -> None:
        self.models = models or ServingModels()
        self.failures: Mapping[str, ReloadFailure] = {}
        self.registry = RegistryStatus()
        self._write_lock = threading.Lock()

    def install(self, model: LoadedModel) -> None:
        """Serve ``model`` on its arm from the next request on."""
        with self._write_lock:
            self.models = dataclasses.replace(self.models, **{model.arm: model})
            self.failures = {arm: f for arm, f in self.failures.items() if arm != model.arm}

    def record_failure(self, failure: ReloadFailure) -> None:
        """Remember the latest failure of an arm, for /readyz."""
        with self._write_lock:
            self.failures = {**self.failures, failure.arm: failure}

    def set_registry_status(self, status: RegistryStatus) -> None:
        """Replace what /readyz shows about the registry."""
        with self._write_lock:
            self.registry = status


class ReloadError(Exception):
    """A snapshot could not be loaded; ``reason`` is one of the documented reasons."""

    def __init__(self, reason: str, message: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.key_id = key_id


def unverified_key_id(blob: bytes) -> str | None:
    """Return the key id a blob's metadata claims, or None when it cannot be read.

    The value is unverified and only fit for log lines.
    """
    try:
        magic, _, length = _BLOB_HEADER.unpack_from(blob)
        if magic != snapshots.MAGIC:
            return None
        fields = orjson.loads(blob[_BLOB_HEADER.size : _BLOB_HEADER.size + length])
    except (struct.error, orjson.JSONDecodeError):
        return None
    key_id = fields.get("key_id") if isinstance(fields, dict) else None
    return key_id if isinstance(key_id, str) else None


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def load_model(
    registry: ModelRegistry, arm: Arm, slot: str, version: int, clock: Clock
) -> LoadedModel:
    """Fetch, verify and unpickle one version; raise ReloadError with the failure's reason.

    The signature is checked before anything is unpickled, and the River
    version before unpickling too, so that each failure gets its own reason.
    ``load_snapshot`` checks the signature a second time, which costs one
    HMAC over the blob per reload.
    """
    keys = registry.keys
    assert keys is not None, "the scorer's registry is built with verification keys"
    try:
        blob = registry.fetch(slot, version)
    except UnavailableError as error:
        raise ReloadError("unavailable", str(error)) from None
    if blob is None:
        raise ReloadError(
            "not_found",
            f"snapshot {slot!r} version {version} is no longer stored; a newer version "
            "replaced it, and the next poll loads that one",
        )

    try:
        metadata, _ = verify_snapshot(blob, keys)
    except SnapshotError as error:
        raise ReloadError("verification_failed", str(error), unverified_key_id(blob)) from None
    if metadata.model_name != slot or metadata.version != version:
        raise ReloadError(
            "version_mismatch",
            f"snapshot stored as {slot!r} version {version} is signed as "
            f"{metadata.model_name!r} version {metadata.version}, so it was copied between keys; "
            "republish the model from the trainer",
            metadata.key_id,
        )

    installed_river = snapshots.RIVER_VERSION
    if not registry.allow_other_river and _major_minor(metadata.river_version) != _major_minor(
        installed_river
    ):
        raise ReloadError(
            "river_version_mismatch",
            f"snapshot {slot!r} version {version} was pickled with River "
            f"{metadata.river_version} but River {installed_river} is installed; align the "
            "trainer's and the scorer's River, or set ONLINE_CTR_ALLOW_OTHER_RIVER_VERSION=true",
            metadata.key_id,
        )

    try:
        metadata, bundle = load_snapshot(blob, keys, allow_other_river=registry.allow_other_river)
    except SnapshotError as error:
        raise ReloadError("deserialisation_failed", str(error), metadata.key_id) from None
    return LoadedModel(arm=arm, metadata=metadata, bundle=bundle, loaded_at=clock.time())


class ModelReloader:
    """Keep the holder's models at the newest stored snapshot of each slot.

    A thread listens for the registry's announcements and also polls every
    ``poll_interval_seconds``, because Redis pub/sub drops messages sent
    while a subscriber is disconnected. The newest stored version is served;
    when it cannot be loaded, the previous model stays.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        holder: ModelHolder,
        slots: Mapping[Arm, str],
        metrics: ScorerMetrics,
        poll_interval_seconds: float,
        clock: Clock | None = None,
    ) -> None:
        self.registry = registry
        self.holder = holder
        self.slots = dict(slots)
        self.metrics = metrics
        self.poll_interval_seconds = poll_interval_seconds
        self.clock = clock or SystemClock()
        # The newest version of each arm that failed for a permanent reason.
        self._rejected: dict[Arm, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_all(self) -> None:
        """Load the newest version of every slot that is not served yet.

        Raises UnavailableError when Redis cannot be reached.
        """
        for arm in self.slots:
            self.check(arm)

    def check(self, arm: Arm) -> None:
        """Load the newest version of one arm's slot unless it is served or was rejected."""
        slot = self.slots[arm]
        latest = self.registry.latest_version(slot)
        self._mark_reachable()
        if latest is None:
            return
        current = self.holder.models.get(arm)
        if current is not None and current.version == latest:
            return
        if self._rejected.get(arm) == latest:
            return

        try:
            model = load_model(self.registry, arm, slot, latest, self.clock)
        except ReloadError as error:
            self._reject(arm, slot, latest, error)
            return

        self.holder.install(model)
        self.metrics.model_reloads.labels(arm=arm).inc()
        self.metrics.model_version.labels(arm=arm).set(model.version)
        self.metrics.model_age.labels(arm=arm).set(model.age_seconds(self.clock.time()))
        logger.info(
            "Serving %s on the %s arm (examples seen %d, signed with key id %s)",
            model.model_version,
            arm,
            model.metadata.examples_seen,
            model.metadata.key_id,
        )

    def _reject(self, arm: Arm, slot: str, version: int, error: ReloadError) -> None:
        if error.reason in PERMANENT_REASONS:
            self._rejected[arm] = version
        if error.reason == "unavailable":
            self._mark_unreachable(error)
        self.metrics.model_reload_failures.labels(arm=arm, reason=error.reason).inc()
        self.holder.record_failure(
            ReloadFailure(arm, slot, version, error.reason, str(error), self.clock.time())
        )
        current = self.holder.models.get(arm)
        logger.error(
            "Rejected snapshot %r version %d (key id %s, reason %s); still serving %s: %s",
            slot,
            version,
            describe_value(error.key_id),
            error.reason,
            current.model_version if current else "nothing",
            error,
        )

    def start(self) -> None:
        """Start the reloader thread."""
        self._thread = threading.Thread(target=self._run, name="model-reloader", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait up to ``timeout_s`` for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        backoff = ExponentialBackoff()
        subscription: AnnouncementSubscription | None = None
        next_poll = 0.0
        while not self._stop.is_set():
            try:
                if subscription is None:
                    subscription = self.registry.subscribe()
                    self._mark_reachable()
                    # Announcements sent while unsubscribed are lost, so poll at once.
                    next_poll = 0.0

                if self.clock.monotonic() >= next_poll:
                    self.check_all()
                    next_poll = self.clock.monotonic() + self.poll_interval_seconds

                # Wake at least once a second so that stop() is noticed quickly.
                wait_s = min(1.0, max(0.0, next_poll - self.clock.monotonic()))
                announcement = subscription.get(timeout_s=wait_s)
                if announcement is not None:
                    self._on_announcement(announcement)
                backoff.reset()
            except (UnavailableError, redis.RedisError) as error:
                subscription = self._close(subscription)
                self.record_unavailable(error)
                delay = backoff.next_delay()
                logger.warning("Model registry unavailable (%s); retrying in %.1f s", error, delay)
                self._stop.wait(delay)
            # The thread must outlive any bug in a model or in a check, because the
            # scorer would otherwise serve the current model forever without a word.
            except Exception:
                subscription = self._close(subscription)
                delay = backoff.next_delay()
                logger.exception("Model reloader failed; retrying in %.1f s", delay)
                self._stop.wait(delay)
        self._close(subscription)

    def _on_announcement(self, announcement: Announcement) -> None:
        for arm, slot in self.slots.items():
            if slot == announcement.model_name:
                self.check(arm)

    def record_unavailable(self, error: Exception) -> None:
        """Count a failed registry contact for every arm and show it on /readyz."""
        for arm in self.slots:
            self.metrics.model_reload_failures.labels(arm=arm, reason="unavailable").inc()
        self._mark_unreachable(error)

    def _mark_reachable(self) -> None:
        now = self.clock.time()
        previous = self.holder.registry
        self.holder.set_registry_status(RegistryStatus(reachable=True, last_success_at=now))
        self.metrics.registry_last_success.set(now)
        if previous.unreachable_since is not None:
            logger.info(
                "Model registry reachable again after %.1f s unreachable",
                now - previous.unreachable_since,
            )

    def _mark_unreachable(self, error: Exception) -> None:
        now = self.clock.time()
        previous = self.holder.registry
        since = previous.unreachable_since if previous.unreachable_since is not None else now
        self.holder.set_registry_status(
            RegistryStatus(
                reachable=False,
                last_success_at=previous.last_success_at,
                error=str(error),
                unreachable_since=since,
            )
        )

    @staticmethod
    def _close(subscription: AnnouncementSubscription | None) -> None:
        if subscription is not None:
            try:
                subscription.close()
            except redis.RedisError as error:
                logger.debug("Closing the announcement subscription failed: %s", error)
        return None


class ScoringError(Exception):
    """A model raised an error while scoring an impression."""

    def __init__(self, arm: Arm, model_version: str, error: Exception) -> None:
        super().__init__(
            f"model {model_version} on the {arm} arm failed to score the impression: "
            f"{type(error).__name__}: {describe_value(str(error))}; the features do not fit "
            "what the model was trained on"
        )
        self.arm = arm


@dataclass(frozen=True, slots=True)
class Scored:
    """The outcome of scoring one impression."""

    arm: Arm
    model: LoadedModel
    probability: float
    baseline_probability: float
    # The challenger's probability in shadow mode, else None.
    shadow_probability: float | None
    # The champion's probability when the champion scored, for drift metrics.
    champion_probability: float | None


class ArmRouter:
    """Decide which model scores an impression, and score it.

    The split key is the user id, or the impression id without one. A
    request goes to the challenger when the keyed BLAKE2b hash of its split
    key falls in the lowest ``challenger_share`` of the hash range. So each
    user stays on one arm for as long as the share and the salt stay the same.
    """

    def __init__(
        self, challenger_share: float, shadow_mode: bool, salt: str, metrics: ScorerMetrics
    ) -> None:
        self.challenger_share = challenger_share
        self.shadow_mode = shadow_mode
        self._salt = salt.encode()
        self.metrics = metrics

    def split_position(self, split_key: str) -> float:
        """Return the key's position in [0, 1) of the hash range."""
        digest = hashlib.blake2b(split_key.encode(), digest_size=8, key=self._salt).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    def score(self, models: ServingModels, features: dict[str, Any], split_key: str) -> Scored:
        """Score one impression; the caller checks that a champion is loaded.

        Raises ScoringError when the serving model raises. An error of the
        shadow challenger is counted and logged, and the champion's score
        is returned without it.
        """
        champion = models.champion
        challenger = models.challenger
        assert champion is not None, "score only once a champion is loaded"

        if challenger is not None and self.shadow_mode:
            probability, baseline = _score_with(champion, features)
            shadow = self._shadow_score(challenger, features)
            return Scored("champion", champion, probability, baseline, shadow, probability)

        if (
            challenger is not None
            and self.challenger_share > 0.0
            and self.split_position(split_key) < self.challenger_share
        ):
            probability, baseline = _score_with(challenger, features)
            return Scored("challenger", challenger, probability, baseline, None, None)

        probability, baseline = _score_with(champion, features)
        return Scored("champion", champion, probability, baseline, None, probability)

    def _shadow_score(self, challenger: LoadedModel, features: dict[str, Any]) -> float | None:
        try:
            return _score_with(challenger, features)[0]
        except ScoringError as error:
            self.metrics.scoring_errors.labels(arm="challenger").inc()
            logger.debug("Shadow scoring failed: %s", error)
            return None


def _score_with(model: LoadedModel, features: dict[str, Any]) -> tuple[float, float]:
    try:
        probability, baseline = model.bundle.score(features)
        return _checked(probability), _checked(baseline)
    except Exception as error:
        raise ScoringError(model.arm, model.model_version, error) from error


def _checked(probability: float) -> float:
    probability = float(probability)
    if not math.isfinite(probability):
        raise ValueError(f"the model returned the probability {probability!r}")
    # Floating-point rounding can put a probability a hair outside [0, 1].
    return min(1.0, max(0.0, probability))

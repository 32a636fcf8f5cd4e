"""The model registry: signed snapshots of each named model in Redis.

Redis layout for a model named ``<name>`` under the namespace ``<ns>``
(``octr:models`` by default); no key has a TTL:

=========================  ======  ==========================================
key                        type    contents
=========================  ======  ==========================================
``<ns>:{<name>}:counter``  string  the last version number handed out (INCR)
``<ns>:{<name>}:versions`` zset    retained versions, member and score both
                                   the version number
``<ns>:{<name>}:blob:<v>`` string  the signed snapshot of version ``<v>``
=========================  ======  ==========================================

The braces are a Redis Cluster hash tag, so one model's keys share a slot.
Each publish sends ``{"model_name": ..., "version": ...}`` as JSON on the
channel ``<ns>:announce``. ``docs/snapshots.md`` describes the layout too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic
import redis
from pydantic import BaseModel, ConfigDict, Field

from shared.clock import Clock, SystemClock
from shared.drift import ReferenceProfile
from shared.errors import ConfigError, SnapshotError, UnavailableError, describe_value
from shared.snapshots import (
    NAME_PATTERN,
    ModelBundle,
    SigningKeys,
    SnapshotMetadata,
    build_snapshot,
    load_snapshot,
)

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "octr:models"
DEFAULT_RETAIN = 10

# Store a signed blob, index it, drop versions beyond the newest `retain`
# with their blobs, and announce the new version if it is still retained.
# KEYS[1]: the versions zset. KEYS[2]: the new version's blob key.
# ARGV[1]: the version. ARGV[2]: the blob. ARGV[3]: how many versions to keep.
# ARGV[4]: the blob key prefix, to which an old version number is appended.
# ARGV[5]: the announcement channel. ARGV[6]: the announcement JSON.
# Returns {number of versions dropped, 1 if the new version was kept else 0}.
# NOTE: the script deletes old blob keys that it builds from ARGV[4] instead
# of receiving them in KEYS. Standalone Redis allows this, and the hash tag
# keeps them in the script's slot, but Redis Cluster does not promise to.
_STORE_SCRIPT = """
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[1])
local keep = tonumber(ARGV[3])
local dropped = redis.call('ZRANGE', KEYS[1], 0, -(keep + 1))
for _, old_version in ipairs(dropped) do
    redis.call('DEL', ARGV[4] .. old_version)
end
if #dropped > 0 then
    redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(keep + 1))
end
local retained = 0
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    retained = 1
    redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return {#dropped, retained}
"""

# Read the newest version and its blob in one step, so a concurrent publish
# cannot drop the blob between the two reads.
# KEYS[1]: the versions zset. ARGV[1]: the blob key prefix.
# Returns {version, blob or nil}, or nil when no version is stored.
_FETCH_LATEST_SCRIPT = """
local newest = redis.call('ZRANGE', KEYS[1], -1, -1)
if #newest == 0 then
    return false
end
return {newest[1], redis.call('GET', ARGV[1] .. newest[1])}
"""

# Invalid announcements are logged for the first one and then every this many.
_INVALID_ANNOUNCEMENT_LOG_EVERY = 100
# Reads per wait, so a flood of other messages cannot keep `get` looping.
_MAX_READS_PER_WAIT = 10_000
_SUBSCRIBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ModelKeys:
    """The Redis key names of one model."""

    counter: str
    versions: str
    blob_prefix: str

    def blob(self, version: int) -> str:
        """Return the key of one version's blob."""
        return f"{self.blob_prefix}{version}"


class Announcement(BaseModel):
    """A message on the announcement channel: a new snapshot version is stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(pattern=NAME_PATTERN.pattern)
    version: int = Field(ge=1)


@contextlib.contextmanager
def _redis_errors(action: str) -> Iterator[None]:
    """Raise Redis connection failures and timeouts as UnavailableError."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise UnavailableError(
            f"Redis unavailable while {action}: {error}; check that Redis is running and "
            "reachable, then retry"
        ) from error


def _check_name(model_name: str) -> None:
    if not NAME_PATTERN.match(model_name):
        raise ConfigError(
            f"invalid model name {describe_value(model_name)}; use 1 to 64 characters from "
            "letters, digits, '.', '_' and '-'"
        )


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"invalid snapshot version {version!r}; versions are integers from 1")


class ModelRegistry:
    """Publish and read signed model snapshots, keeping the newest ``retain`` per model.

    ``keys`` may be None for a reader that only lists versions and fetches raw
    blobs; publishing and loading need keys.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: SigningKeys | None,
        namespace: str = DEFAULT_NAMESPACE,
        retain: int = DEFAULT_RETAIN,
        allow_other_river: bool = False,
        clock: Clock | None = None,
    ) -> None:
        if retain < 1:
            raise ConfigError(f"invalid snapshot retention {retain}; keep at least 1 version")
        if not namespace or "{" in namespace or "}" in namespace:
            raise ConfigError(
                f"invalid registry namespace {describe_value(namespace)}; use a non-empty "
                "prefix without braces, such as 'octr:models'"
            )
        if client.get_connection_kwargs().get("decode_responses"):
            raise ConfigError(
                "the registry's Redis client has decode_responses=True, which would decode "
                "binary snapshots as text; build the client with decode_responses=False"
            )
        self.client = client
        self.keys = keys
        self.namespace = namespace
        self.retain = retain
        self.allow_other_river = allow_other_river
        self.clock = clock or SystemClock()
        self._store = client.register_script(_STORE_SCRIPT)
        self._fetch_latest = client.register_script(_FETCH_LATEST_SCRIPT)

    @property
    def channel(self) -> str:
        """The pub/sub channel on which new versions are announced."""
        return f"{self.namespace}:announce"

    def keys_for(self, model_name: str) -> ModelKeys:
        """Return the Redis key names of a model."""
        _check_name(model_name)
        prefix = f"{self.namespace}:{{{model_name}}}"
        return ModelKeys(
            counter=f"{prefix}:counter",
            versions=f"{prefix}:versions",
            blob_prefix=f"{prefix}:blob:",
        )

    def _signing_keys(self, action: str) -> SigningKeys:
        if self.keys is None:
            raise ConfigError(
                f"cannot {action} without signing keys; build the ModelRegistry with SigningKeys"
            )
        return self.keys

    def publish(
        self,
        bundle: ModelBundle,
        *,
        examples_seen: int,
        metrics: Mapping[str, float | None] | None = None,
        reference: ReferenceProfile | None = None,
    ) -> SnapshotMetadata:
        """Sign and store a bundle as the model's next version, then announce it.

        Returns the stored metadata. The version comes from INCR on the
        model's counter before signing, because the signed metadata contains
        it. Storing, indexing, trimming and announcing then happen in one Lua
        script. A publisher that fails between the two steps leaves a gap in
        the version numbers, which readers tolerate.
        """
        keys = self._signing_keys("publish a snapshot")
        model_keys = self.keys_for(bundle.model_name)

        with _redis_errors(f"assigning a version to model {bundle.model_name!r}"):
            version = int(self.client.incr(model_keys.counter))

        draft = SnapshotMetadata(
            model_name=bundle.model_name,
            version=version,
            created_at=dt.datetime.fromtimestamp(self.clock.time(), dt.UTC),
            examples_seen=examples_seen,
            metrics=dict(metrics or {}),
            reference=reference,
        )
        metadata, blob = build_snapshot(bundle, draft, keys)
        announcement = Announcement(model_name=bundle.model_name, version=version)

        with _redis_errors(f"storing model {bundle.model_name!r} version {version}"):
            dropped, retained = self._store(
                keys=[model_keys.versions, model_keys.blob(version)],
                args=[
                    version,
                    blob,
                    self.retain,
                    model_keys.blob_prefix,
                    self.channel,
                    announcement.model_dump_json(),
                ],
            )

        if not retained:
            logger.warning(
                "snapshot dropped at once: newer versions of the model fill the retention",
                extra={"model_name": bundle.model_name, "version": version, "retain": self.retain},
            )
        logger.info(
            "published snapshot",
            extra={
                "model_name": bundle.model_name,
                "version": version,
                "key_id": metadata.key_id,
                "blob_bytes": len(blob),
                "dropped_versions": int(dropped),
            },
        )
        return metadata

    def versions(self, model_name: str) -> list[int]:
        """Return the retained versions of a model, oldest first."""
        model_keys = self.keys_for(model_name)
        with _redis_errors(f"listing the versions of model {model_name!r}"):
            members = self.client.zrange(model_keys.versions, 0, -1)
        return [int(member) for member in members]

    def latest_version(self, model_name: str) -> int | None:
        """Return the newest retained version of a model, or None when none is stored."""
        model_keys = self.keys_for(model_name)
        with _redis_errors(f"reading the latest version of model {model_name!r}"):
            newest = self.client.zrange(model_keys.versions, -1, -1)
        return int(newest[0]) if newest else None

    def fetch(self, model_name: str, version: int | None = None) -> bytes | None:
        """Return the stored blob of a version, or of the newest one; None when it is not stored.

        The blob is returned as stored, unverified.
        """
        found = self._fetch(model_name, version)
        return None if found is None else found[1]

    def _fetch(self, model_name: str, version: int | None) -> tuple[int, bytes] | None:
        model_keys = self.keys_for(model_name)
        if version is not None:
            _check_version(version)
            with _redis_errors(f"fetching model {model_name!r} version {version}"):
                blob = self.client.get(model_keys.blob(version))
            return None if blob is None else (version, blob)

        with _redis_errors(f"fetching the latest version of model {model_name!r}"):
            result = self._fetch_latest(keys=[model_keys.versions], args=[model_keys.blob_prefix])
        if result is None or result[1] is None:
            return None
        return int(result[0]), result[1]

    def load(
        self, model_name: str, version: int | None = None
    ) -> tuple[SnapshotMetadata, ModelBundle] | None:
        """Fetch, verify and unpickle a version, or the newest one; None when it is not stored.

        Raises SnapshotError when verification fails or when the signed
        metadata names another model or version than the key it was read from.
        """
        keys = self._signing_keys("load a snapshot")
        found = self._fetch(model_name, version)
        if found is None:
            return None
        stored_version, blob = found

        metadata, bundle = load_snapshot(blob, keys, allow_other_river=self.allow_other_river)
        if metadata.model_name != model_name or metadata.version != stored_version:
            raise SnapshotError(
                f"snapshot stored as model {model_name!r} version {stored_version} is signed "
                f"as model {metadata.model_name!r} version {metadata.version} with key id "
                f"{metadata.key_id!r}, so it was copied between keys; do not load it, and "
                "republish the model from the trainer"
            )
        return metadata, bundle

    def load_latest(self, model_name: str) -> tuple[SnapshotMetadata, ModelBundle] | None:
        """Fetch, verify and unpickle the newest version; None when none is stored."""
        return self.load(model_name)

    def subscribe(self, timeout_s: float = _SUBSCRIBE_TIMEOUT_S) -> AnnouncementSubscription:
        """Subscribe to announcements; return once Redis has confirmed the subscription.

        Announcements published after this returns are delivered. Close the
        subscription when done, or use it as a context manager.
        """
        pubsub = self.client.pubsub()
        try:
            with _redis_errors(f"subscribing to {self.channel!r}"):
                pubsub.subscribe(self.channel)
                _wait_for_confirmation(pubsub, self.channel, timeout_s)
        except BaseException:
            pubsub.close()
            raise
        return AnnouncementSubscription(pubsub, self.channel)


def _wait_for_confirmation(pubsub: Any, channel: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for _ in range(_MAX_READS_PER_WAIT):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        message = pubsub.get_message(timeout=remaining)
        if message is not None and message["type"] == "subscribe":
            return
    raise UnavailableError(
        f"Redis did not confirm the subscription to {channel!r} within {timeout_s} s; "
        "check that Redis is reachable, then retry"
    )


class AnnouncementSubscription:
    """Announcements of new snapshot versions, read with a timeout."""

    def __init__(self, pubsub: Any, channel: str) -> None:
        self.pubsub = pubsub
        self.channel = channel
        self.invalid_messages = 0

    def get(self, timeout_s: float) -> Announcement | None:
        """Return the next announcement, or None when none arrives within ``timeout_s``.

        Messages that are not valid announcements are logged and skipped.
        """
        deadline = time.monotonic() + timeout_s
        for _ in range(_MAX_READS_PER_WAIT):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with _redis_errors(f"reading announcements from {self.channel!r}"):
                message = self.pubsub.get_message(timeout=remaining)
            if message is None or message["type"] != "message":
                continue
            announcement = self._parse(message["data"])
            if announcement is not None:
                return announcement
        return None

    def _parse(self, data: bytes) -> Announcement | None:
        try:
            return Announcement.model_validate_json(data)
        except pydantic.ValidationError as error:
            self.invalid_messages += 1
            if self.invalid_messages % _INVALID_ANNOUNCEMENT_LOG_EVERY == 1:
                logger.warning(
                    "skipped invalid announcement",
                    extra={
                        "channel": self.channel,
                        "data": describe_value(data),
                        "error": str(error.errors(include_url=False)[0].get("msg")),
                        "invalid_messages": self.invalid_messages,
                    },
                )
            return None

    def close(self) -> None:
        """Unsubscribe and release the connection."""
        self.pubsub.close()

    def __enter__(self) -> AnnouncementSubscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

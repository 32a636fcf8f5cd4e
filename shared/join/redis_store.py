"""A :class:`~shared.join.store.JoinStore` in Redis, for the live joiner service.

Each partition owns six keys, whatever the number of impressions, and every
key of partition ``p`` carries the hash tag ``{p<p>}``, so that in Redis
Cluster one partition's keys share a slot and one Lua script may touch them
all. ``docs/redis-layout.md`` has the full table; in short:

============  =====  ==========================================================
key           type   contents
============  =====  ==========================================================
meta          HASH   ``max_event_time``, ``pending`` (open windows), ``outbox_seq``
records       HASH   impression id -> ``<state> <timer> <impression JSON>``, the
                     JSON without ``type``, ``schema_version`` and ``impression_id``
held          HASH   impression id -> ``<click_time> <hold_until>``
timers        ZSET   ``r:<id>`` (record) or ``h:<id>`` (held click), score = timer
outbox        HASH   dedup key -> labelled example JSON
outbox_order  ZSET   dedup key, score = emission sequence number
============  =====  ==========================================================

Times travel as ``repr(float)`` strings, which parse back to the same double
in Python, in Lua's ``tonumber`` and in Redis's score parser, so timers and
event times round-trip exactly.

``load`` and ``commit`` are one Lua script call each, so a batch costs two
round trips and a commit is atomic. Every commit sets an EXPIRE of
``safety_ttl_seconds`` on all six keys. That TTL is a leak guard in wall time,
for partitions that no joiner commits to any more. Event time drives the real
expiry through the timers.

The store assumes one writer per partition: the Kafka consumer group gives
each partition to one joiner at a time. Two writers on one partition would
interleave ``load`` and ``commit`` and lose updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import orjson
import pydantic
import redis

from shared.errors import ConfigError, OnlineCtrError
from shared.events import Impression, LabeledExample, encode
from shared.join.store import ChangeSet, HeldClick, ImpressionRecord, PartitionState, RecordState

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "octr:join"
DEFAULT_SAFETY_TTL_SECONDS = 7 * 24 * 3600

# A record value leaves out the impression fields it can restore: the hash
# field is the impression id, and type and schema_version are constants of
# the event schema. That saves about 90 bytes per record.
_IMPRESSION_FIELDS_LEFT_OUT = frozenset({"type", "schema_version", "impression_id"})
_META_MAX_EVENT_TIME = "max_event_time"
_META_PENDING = "pending"

# KEYS[1] meta HASH, KEYS[2] records HASH, KEYS[3] held HASH, KEYS[4] timers ZSET.
# ARGV[1] is the batch's maximum event time and ARGV[2] the allowed lateness in
# seconds, both as repr(float) strings. ARGV[3..] are the impression ids of the batch.
# Returns {stored max_event_time or false, {id, record, ...}, {id, held click, ...}}
# with the records and held clicks of the ids and those whose timer is at or
# below the watermark max(stored, batch maximum) - lateness. It writes nothing.
# NOTE: the reply has no size limit. A flush (batch maximum = inf) returns every
# record of the partition at once, and Redis serves no other client meanwhile.
_LOAD_SCRIPT = """
local stored_max = redis.call('HGET', KEYS[1], 'max_event_time')
local new_max = tonumber(ARGV[1])
if stored_max and tonumber(stored_max) > new_max then
    new_max = tonumber(stored_max)
end
local watermark = new_max - tonumber(ARGV[2])

local records, held, requested = {}, {}, {}
for i = 3, #ARGV do
    local id = ARGV[i]
    requested[id] = true
    local record = redis.call('HGET', KEYS[2], id)
    if record then
        records[#records + 1] = id
        records[#records + 1] = record
    end
    local click = redis.call('HGET', KEYS[3], id)
    if click then
        held[#held + 1] = id
        held[#held + 1] = click
    end
end

-- Redis converts a Lua number argument with %.17g, which round-trips every
-- double, so ZRANGEBYSCORE compares against the exact watermark.
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', watermark)
for _, member in ipairs(due) do
    local id = string.sub(member, 3)
    if not requested[id] then
        if string.sub(member, 1, 2) == 'r:' then
            local record = redis.call('HGET', KEYS[2], id)
            if record then
                records[#records + 1] = id
                records[#records + 1] = record
            end
        else
            local click = redis.call('HGET', KEYS[3], id)
            if click then
                held[#held + 1] = id
                held[#held + 1] = click
            end
        end
    end
end

return {stored_max, records, held}
"""

# KEYS[1] meta HASH, KEYS[2] records HASH, KEYS[3] held HASH, KEYS[4] timers ZSET,
# KEYS[5] outbox HASH, KEYS[6] outbox_order ZSET.
# ARGV[1] is the new max_event_time as a repr(float) string, or '' to remove it.
# ARGV[2] is the safety TTL in seconds. ARGV[3..7] are the counts of record
# deletes, record upserts, held-click deletes, held-click upserts and emitted
# examples. The five sections follow in that order: ids, (id, timer, record)
# triples, ids, (id, hold_until, held click) triples, (dedup key, example JSON) pairs.
# Returns the change in the number of pending records.
_COMMIT_SCRIPT = """
local meta, records, held, timers, outbox, outbox_order =
    KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
-- A record value starts with its RecordState digit, and PENDING is 0.
local PENDING_BYTE = string.byte('0')

local function was_pending(id)
    local old = redis.call('HGET', records, id)
    if old and string.byte(old, 1) == PENDING_BYTE then
        return 1
    end
    return 0
end

local pending_delta = 0
local i = 8

for _ = 1, tonumber(ARGV[3]) do
    local id = ARGV[i]
    i = i + 1
    pending_delta = pending_delta - was_pending(id)
    redis.call('HDEL', records, id)
    redis.call('ZREM', timers, 'r:' .. id)
end

for _ = 1, tonumber(ARGV[4]) do
    local id, timer, record = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    pending_delta = pending_delta - was_pending(id)
    if string.byte(record, 1) == PENDING_BYTE then
        pending_delta = pending_delta + 1
    end
    redis.call('HSET', records, id, record)
    redis.call('ZADD', timers, timer, 'r:' .. id)
end

for _ = 1, tonumber(ARGV[5]) do
    local id = ARGV[i]
    i = i + 1
    redis.call('HDEL', held, id)
    redis.call('ZREM', timers, 'h:' .. id)
end

for _ = 1, tonumber(ARGV[6]) do
    local id, hold_until, click = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    redis.call('HSET', held, id, click)
    redis.call('ZADD', timers, hold_until, 'h:' .. id)
end

-- A dedup key already in the outbox keeps its place and takes the new body.
for _ = 1, tonumber(ARGV[7]) do
    local key, example = ARGV[i], ARGV[i + 1]
    i = i + 2
    if redis.call('HSET', outbox, key, example) == 1 then
        local sequence = redis.call('HINCRBY', meta, 'outbox_seq', 1)
        redis.call('ZADD', outbox_order, sequence, key)
    end
end

if pending_delta ~= 0 then
    redis.call('HINCRBY', meta, 'pending', pending_delta)
end
if ARGV[1] == '' then
    redis.call('HDEL', meta, 'max_event_time')
else
    redis.call('HSET', meta, 'max_event_time', ARGV[1])
end

for _, key in ipairs(KEYS) do
    redis.call('EXPIRE', key, ARGV[2])
end
return pending_delta
"""


@dataclass(frozen=True, slots=True)
class _PartitionKeys:
    meta: str
    records: str
    held: str
    timers: str
    outbox: str
    outbox_order: str

    def all(self) -> list[str]:
        return [self.meta, self.records, self.held, self.timers, self.outbox, self.outbox_order]


class RedisJoinStore:
    """A :class:`~shared.join.store.JoinStore` whose state lives in Redis and survives restarts.

    ``client`` may decode responses or not. Redis connection and timeout
    errors propagate unchanged, so the caller decides when to retry.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = DEFAULT_NAMESPACE,
        safety_ttl_seconds: int = DEFAULT_SAFETY_TTL_SECONDS,
    ) -> None:
        _check_namespace(namespace)
        _check_safety_ttl(safety_ttl_seconds)
        self.client = client
        self.namespace = namespace
        self.safety_ttl_seconds = safety_ttl_seconds
        self._load_script = client.register_script(_LOAD_SCRIPT)
        self._commit_script = client.register_script(_COMMIT_SCRIPT)

    def __repr__(self) -> str:
        return f"<RedisJoinStore namespace={self.namespace!r} on {self.client!r}>"

    # The JoinStore protocol.

    def load(
        self,
        partition: int,
        impression_ids: Collection[str],
        batch_max_event_time: float,
        allowed_lateness_seconds: float,
    ) -> PartitionState:
        keys = self._keys(partition)
        args = [
            _time_arg(batch_max_event_time, "batch_max_event_time"),
            _time_arg(allowed_lateness_seconds, "allowed_lateness_seconds"),
            *impression_ids,
        ]
        stored_max, record_items, held_items = self._load_script(
            keys=[keys.meta, keys.records, keys.held, keys.timers], args=args
        )

        records: dict[str, ImpressionRecord] = {}
        for impression_id, value in _pairs(record_items):
            records[impression_id] = _decode_record(value, keys.records, impression_id)
        held: dict[str, HeldClick] = {}
        for impression_id, value in _pairs(held_items):
            held[impression_id] = _decode_held_click(value, keys.held, impression_id)

        max_event_time = None
        if stored_max is not None:
            max_event_time = _decode_time(stored_max, keys.meta, _META_MAX_EVENT_TIME)
        return PartitionState(max_event_time, records, held)

    def commit(self, partition: int, change: ChangeSet) -> None:
        keys = self._keys(partition)
        max_event_time = ""
        if change.max_event_time is not None:
            max_event_time = _time_arg(change.max_event_time, "max_event_time")
        args: list[str | bytes | int] = [
            max_event_time,
            self.safety_ttl_seconds,
            len(change.deletes),
            len(change.upserts),
            len(change.held_deletes),
            len(change.held_upserts),
            len(change.emitted),
        ]
        args.extend(change.deletes)
        for impression_id, record in change.upserts.items():
            args += [impression_id, _time_arg(record.timer, "timer"), _encode_record(record)]
        args.extend(change.held_deletes)
        for impression_id, click in change.held_upserts.items():
            hold_until = _time_arg(click.hold_until, "hold_until")
            args += [impression_id, hold_until, _encode_held_click(click)]
        for example in change.emitted:
            args += [example.dedup_key, encode(example)]

        pending_delta = self._commit_script(keys=keys.all(), args=args)
        logger.debug(
            "committed partition %d: %d upserts, %d deletes, %d held upserts, %d held deletes, "
            "%d examples, pending %+d",
            partition,
            len(change.upserts),
            len(change.deletes),
            len(change.held_upserts),
            len(change.held_deletes),
            len(change.emitted),
            pending_delta,
        )

    def outbox(self, partition: int) -> list[LabeledExample]:
        keys = self._keys(partition)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrange(keys.outbox_order, 0, -1)
            pipe.hgetall(keys.outbox)
            order, bodies = pipe.execute()

        bodies = {_text(key): value for key, value in bodies.items()}
        examples: list[LabeledExample] = []
        for raw_key in order:
            dedup_key = _text(raw_key)
            body = bodies.get(dedup_key)
            if body is None:
                raise _corrupt(keys.outbox, dedup_key, "is missing, but outbox_order lists it")
            examples.append(_decode_example(body, keys.outbox, dedup_key))
        return examples

    def acknowledge(self, partition: int, dedup_keys: Collection[str]) -> None:
        if not dedup_keys:
            return
        keys = self._keys(partition)
        dedup_keys = list(dedup_keys)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.outbox, *dedup_keys)
            pipe.zrem(keys.outbox_order, *dedup_keys)
            pipe.execute()

    def max_event_time(self, partition: int) -> float | None:
        meta = self._keys(partition).meta
        value = self.client.hget(meta, _META_MAX_EVENT_TIME)
        return None if value is None else _decode_time(value, meta, _META_MAX_EVENT_TIME)

    def pending_count(self, partition: int) -> int:
        """Return the number of open windows, read from a counter that ``commit`` keeps."""
        meta = self._keys(partition).meta
        value = self.client.hget(meta, _META_PENDING)
        if value is None:
            return 0
        try:
            return int(value)
        except ValueError:
            raise _corrupt(meta, _META_PENDING, f"has value {value!r}, not an integer") from None

    # Introspection for tests and metrics.

    def keys_of(self, partition: int) -> list[str]:
        """Return the names of the partition's keys, whether they exist or not."""
        return self._keys(partition).all()

    def record_count(self, partition: int) -> int:
        """Return the number of impressions remembered, pending or decided."""
        return int(self.client.hlen(self._keys(partition).records))

    def held_click_count(self, partition: int) -> int:
        """Return the number of orphan clicks waiting for their impression."""
        return int(self.client.hlen(self._keys(partition).held))

    def _keys(self, partition: int) -> _PartitionKeys:
        if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
            raise ValueError(f"invalid partition {partition!r}; expected an integer of at least 0")
        prefix = f"{self.namespace}:{{p{partition}}}:"
        return _PartitionKeys(
            meta=prefix + "meta",
            records=prefix + "records",
            held=prefix + "held",
            timers=prefix + "timers",
            outbox=prefix + "outbox",
            outbox_order=prefix + "outbox_order",
        )


# Settings checks.


def _check_namespace(namespace: str) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise ConfigError(f"invalid Redis namespace {namespace!r}; expected a non-empty string")
    if "{" in namespace or "}" in namespace:
        # Redis Cluster hashes the first {...} of a key, which must be the partition tag.
        raise ConfigError(
            f"invalid Redis namespace {namespace!r}: it must not contain '{{' or '}}', because "
            "the partition hash tag must be the first braces in every key"
        )


def _check_safety_ttl(safety_ttl_seconds: int) -> None:
    if (
        isinstance(safety_ttl_seconds, bool)
        or not isinstance(safety_ttl_seconds, int)
        or safety_ttl_seconds < 1
    ):
        raise ConfigError(
            f"invalid safety_ttl_seconds {safety_ttl_seconds!r}; expected a whole number of "
            "seconds of at least 1, longer than any partition stays without a commit"
        )


# Encoding. Values are ASCII headers followed by JSON, so they survive a
# client that decodes responses as UTF-8.


def _time_arg(value: float, name: str) -> str:
    """Format a time for Redis so that it parses back to the same double."""
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"invalid {name}: NaN; expected a number of seconds")
    return repr(value)


def _encode_record(record: ImpressionRecord) -> bytes:
    header = f"{int(record.state)} {float(record.timer)!r} ".encode()
    # The same JSON as shared.events.encode, without the fields left out.
    fields = record.impression.model_dump(
        mode="json", exclude_none=True, exclude=set(_IMPRESSION_FIELDS_LEFT_OUT)
    )
    return header + orjson.dumps(fields)


def _encode_held_click(click: HeldClick) -> bytes:
    return f"{float(click.click_time)!r} {float(click.hold_until)!r}".encode()


def _decode_record(value: bytes | str, key: str, field: str) -> ImpressionRecord:
    raw = _bytes(value)
    try:
        state_text, timer_text, body = raw.split(b" ", 2)
        state = RecordState(int(state_text))
        timer = float(timer_text)
    except ValueError as error:
        raise _corrupt(key, field, f"has an invalid header ({error})") from error
    # The body always has event_time and item_id, so it is never "{}".
    impression_json = b'{"impression_id":' + orjson.dumps(field) + b"," + body[1:]
    try:
        impression = Impression.model_validate_json(impression_json)
    except pydantic.ValidationError as error:
        problem = f"has an invalid impression ({_first_message(error)})"
        raise _corrupt(key, field, problem) from error
    return ImpressionRecord(impression, state, timer)


def _decode_held_click(value: bytes | str, key: str, field: str) -> HeldClick:
    try:
        click_text, hold_text = _bytes(value).split(b" ")
        return HeldClick(click_time=float(click_text), hold_until=float(hold_text))
    except ValueError as error:
        raise _corrupt(key, field, f"is not '<click_time> <hold_until>' ({error})") from error


def _decode_example(value: bytes | str, key: str, field: str) -> LabeledExample:
    try:
        return LabeledExample.model_validate_json(_bytes(value))
    except pydantic.ValidationError as error:
        raise _corrupt(key, field, f"has an invalid example ({_first_message(error)})") from error


def _decode_time(value: bytes | str, key: str, field: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise _corrupt(key, field, f"has value {value!r}, not a number") from None


def _first_message(error: pydantic.ValidationError) -> str:
    detail = error.errors(include_url=False)[0]
    location = ".".join(str(part) for part in detail.get("loc", ())) or "$"
    return f"{location}: {detail.get('msg', 'invalid')}"


def _corrupt(key: str, field: str, problem: str) -> OnlineCtrError:
    return OnlineCtrError(
        f"invalid join state in Redis: field {field!r} of key {key!r} {problem}; "
        "check that only RedisJoinStore of this version writes to this namespace, "
        f"or remove the field with HDEL {key} {field} to drop its state"
    )


def _pairs(flat: Sequence[bytes | str]) -> list[tuple[str, bytes | str]]:
    return [(_text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value

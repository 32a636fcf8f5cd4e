"""Signed, versioned, compressed model snapshots.

The trainer pickles a :class:`ModelBundle`, compresses it and signs it with
HMAC-SHA256. The scorer checks the signature, the payload digest and the
River version before it unpickles anything, because unpickling runs code that
the bytes name.

Blob layout, all integers big-endian::

    offset       size  field
    0            8     magic, the ASCII bytes ``OCTRSNAP``
    8            1     format version, 1
    9            4     N, the length of the metadata in bytes (unsigned)
    13           N     metadata: SnapshotMetadata as UTF-8 JSON
    13 + N       32    tag: HMAC-SHA256 over bytes [0, 13 + N) and the payload
    45 + N       rest  payload: the pickled ModelBundle, zlib-compressed

The tag covers the magic, the format version, the metadata length, the
metadata and the payload, so a change to any of them fails verification. The
metadata names the key id that signed the blob and the SHA-256 of the
payload. Verification reads the key id before it checks the tag, so error
messages quote unverified metadata values as such.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import pickle
import platform
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import orjson
import pydantic
import river
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from river import base, compose

from shared.drift import ReferenceProfile
from shared.errors import ConfigError, SnapshotError, describe_value
from shared.events import UtcDatetime

logger = logging.getLogger(__name__)

MAGIC = b"OCTRSNAP"
FORMAT_VERSION = 1
METADATA_SCHEMA_VERSION = 1
TAG_BYTES = 32
_HEADER = struct.Struct(">8sBI")
HEADER_BYTES = _HEADER.size

MIN_KEY_BYTES = 32
# Key ids and model names appear in Redis keys and log lines, so they are
# limited to these characters.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
GENERATE_KEY_COMMAND = 'python -c "import secrets; print(secrets.token_hex(32))"'

# The limit stops a garbled length field from making the reader allocate
# gigabytes. It leaves ample room for the drift reference profile.
MAX_METADATA_BYTES = 16 * 1024 * 1024
# Upper bound on the decompressed pickle. It guards against a runaway model,
# and was not sized from a measured snapshot.
DEFAULT_MAX_PICKLE_BYTES = 1024 * 1024 * 1024
PICKLE_PROTOCOL = 5
ZLIB_LEVEL = 6

# Read at signing time, so tests can stand in another River release.
RIVER_VERSION: str = river.__version__
PYTHON_VERSION: str = platform.python_version()


class SigningKeys:
    """The HMAC keys that sign and verify snapshots, by key id.

    The active key signs new snapshots, and every key in the set verifies.
    To rotate, add the new key, make it active, and drop the old key once no
    retained snapshot is signed with it. ``repr`` shows the key ids only.
    """

    def __init__(self, active_key_id: str, secrets: Mapping[str, SecretStr]) -> None:
        if not secrets:
            raise ConfigError(
                "no snapshot signing keys configured; give at least one as 'key-id:secret', "
                f"generating the secret with: {GENERATE_KEY_COMMAND}"
            )
        for key_id, secret in secrets.items():
            _check_key(key_id, secret)
        if active_key_id not in secrets:
            raise ConfigError(
                f"active signing key id {active_key_id!r} is not among the configured key ids "
                f"({', '.join(sorted(secrets))}); set the active key id to one of them"
            )
        self.active_key_id = active_key_id
        self._secrets: Mapping[str, SecretStr] = MappingProxyType(dict(secrets))

    @classmethod
    def parse(cls, text: str | SecretStr, active_key_id: str) -> SigningKeys:
        """Parse keys written as ``"k2:secret-two,k1:secret-one"``.

        Whitespace around entries is ignored. A secret may contain ``:`` but
        not ``,``. Errors name the entry by its position, never by its text,
        because a malformed entry may be a bare secret.
        """
        raw = text.get_secret_value() if isinstance(text, SecretStr) else text
        secrets: dict[str, SecretStr] = {}
        for position, entry in enumerate(raw.split(","), start=1):
            entry = entry.strip()
            key_id, separator, secret = entry.partition(":")
            key_id = key_id.strip()
            if not separator or not key_id:
                raise ConfigError(
                    f"signing key entry {position} is not in the form 'key-id:secret'; "
                    "write the keys as 'k2:secret-two,k1:secret-one'"
                )
            if key_id in secrets:
                raise ConfigError(
                    f"signing key id {key_id!r} appears twice; give each key a distinct id"
                )
            secrets[key_id] = SecretStr(secret)
        return cls(active_key_id.strip(), secrets)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The configured key ids, sorted."""
        return tuple(sorted(self._secrets))

    def secret(self, key_id: str) -> bytes | None:
        """Return the key's bytes, or None when the key id is not configured."""
        secret = self._secrets.get(key_id)
        return None if secret is None else secret.get_secret_value().encode()

    def __repr__(self) -> str:
        return f"SigningKeys(active_key_id={self.active_key_id!r}, key_ids={list(self.key_ids)!r})"


def _check_key(key_id: str, secret: SecretStr) -> None:
    if not NAME_PATTERN.match(key_id):
        raise ConfigError(
            f"invalid signing key id {describe_value(key_id)}; use 1 to 64 characters "
            "from letters, digits, '.', '_' and '-'"
        )
    length = len(secret.get_secret_value().encode())
    if length < MIN_KEY_BYTES:
        # An id as long as a key may be a secret written first ("secret:k1"),
        # so it is not repeated in the message.
        named = f"signing key {key_id!r}" if len(key_id) < 16 else "a signing key"
        raise ConfigError(
            f"{named} is {length} bytes long, but at least {MIN_KEY_BYTES} are required "
            f"(entries are written key-id:secret); generate one with: {GENERATE_KEY_COMMAND}"
        )


class SnapshotMetadata(BaseModel):
    """Metadata of a snapshot: the model, its version, how it was trained and signed.

    ``key_id``, ``payload_sha256``, ``river_version`` and ``python_version``
    are set by :func:`build_snapshot`; the values a caller passes are replaced.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    schema_version: Literal[1] = METADATA_SCHEMA_VERSION
    model_name: str = Field(pattern=NAME_PATTERN.pattern)
    version: int = Field(ge=1)
    created_at: UtcDatetime
    examples_seen: int = Field(ge=0)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    river_version: str = RIVER_VERSION
    python_version: str = PYTHON_VERSION
    key_id: str = ""
    payload_sha256: str = Field(default="", pattern=r"^[0-9a-f]{64}$")
    compression: Literal["zlib"] = "zlib"
    reference: ReferenceProfile | None = None


@dataclass
class ModelBundle:
    """A model and its baseline, as the trainer publishes and the scorer serves them."""

    model: base.Classifier
    baseline: base.Classifier
    model_name: str
    # The trainer's consumer position when the bundle was taken, keyed by
    # "topic/partition": a restarted trainer resumes exactly there.
    source_offsets: dict[str, int] = field(default_factory=dict)

    def score(self, features: dict[str, Any]) -> tuple[float, float]:
        """Return the model's and the baseline's click probability, without learning.

        Only ``predict_proba_one`` is called. Inside
        ``river.compose.learn_during_predict()``, which sets a flag on the
        Pipeline class for every thread, a Pipeline's prediction also updates
        its unsupervised steps (a StandardScaler, say). Scoring raises
        RuntimeError while that flag is set instead of changing the model.
        """
        # River 0.26 keeps the flag in this private class attribute.
        if getattr(compose.Pipeline, "_LEARN_UNSUPERVISED_DURING_PREDICT", False):
            raise RuntimeError(
                "refusing to score inside river.compose.learn_during_predict(), which would "
                "update the served model's unsupervised steps; score outside that context"
            )
        model_probability = self.model.predict_proba_one(features).get(True, 0.0)
        baseline_probability = self.baseline.predict_proba_one(features).get(True, 0.0)
        return model_probability, baseline_probability


def build_snapshot(
    bundle: ModelBundle, metadata: SnapshotMetadata, keys: SigningKeys
) -> tuple[SnapshotMetadata, bytes]:
    """Pickle, compress and sign a bundle; return the final metadata and the blob.

    The final metadata is ``metadata`` with the key id, payload digest and the
    installed River and Python versions filled in.
    """
    if bundle.model_name != metadata.model_name:
        raise ValueError(
            f"bundle is for model {bundle.model_name!r} but the metadata names "
            f"{metadata.model_name!r}; build both for the same model"
        )
    payload = zlib.compress(pickle.dumps(bundle, protocol=PICKLE_PROTOCOL), ZLIB_LEVEL)
    final = metadata.model_copy(
        update={
            "key_id": keys.active_key_id,
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "river_version": RIVER_VERSION,
            "python_version": PYTHON_VERSION,
            "compression": "zlib",
        }
    )
    metadata_bytes = final.model_dump_json().encode()
    if len(metadata_bytes) > MAX_METADATA_BYTES:
        raise ValueError(
            f"snapshot metadata is {len(metadata_bytes)} bytes, more than the "
            f"{MAX_METADATA_BYTES} readers accept; profile fewer features"
        )
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(metadata_bytes))
    secret = keys.secret(keys.active_key_id)
    assert secret is not None  # SigningKeys checks that the active key exists.
    tag = _tag(secret, header, metadata_bytes, payload)
    return final, b"".join((header, metadata_bytes, tag, payload))


def sign_snapshot(bundle: ModelBundle, metadata: SnapshotMetadata, keys: SigningKeys) -> bytes:
    """Pickle, compress and sign a bundle with the active key; return the blob."""
    return build_snapshot(bundle, metadata, keys)[1]


def _tag(secret: bytes, header: bytes, metadata_bytes: bytes, payload: bytes) -> bytes:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    mac.update(header)
    mac.update(metadata_bytes)
    mac.update(payload)
    return mac.digest()


@dataclass(frozen=True)
class _Parts:
    header: bytes
    metadata_bytes: bytes
    tag: bytes
    payload: bytes


def _split(blob: bytes) -> _Parts:
    if len(blob) < HEADER_BYTES:
        raise SnapshotError(
            f"invalid snapshot: {len(blob)} bytes is shorter than the {HEADER_BYTES}-byte "
            "header, so the blob is truncated or not a snapshot; republish it from the trainer"
        )
    magic, format_version, metadata_length = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise SnapshotError(
            f"invalid snapshot: it starts with {describe_value(magic)} instead of {MAGIC!r}, "
            "so it is not an online-ctr snapshot; check what wrote this key"
        )
    if format_version != FORMAT_VERSION:
        raise SnapshotError(
            f"unsupported snapshot format version {format_version}; this reader supports "
            f"version {FORMAT_VERSION}, so upgrade the reader or republish with a matching trainer"
        )
    if metadata_length > MAX_METADATA_BYTES:
        raise SnapshotError(
            f"invalid snapshot: metadata length {metadata_length} exceeds the "
            f"{MAX_METADATA_BYTES}-byte limit, so the header is garbled; republish the snapshot"
        )
    payload_start = HEADER_BYTES + metadata_length + TAG_BYTES
    if len(blob) <= payload_start:
        raise SnapshotError(
            f"invalid snapshot: {len(blob)} bytes is too short for a {metadata_length}-byte "
            "metadata block, the tag and a payload, so the blob is truncated; republish it"
        )
    return _Parts(
        header=blob[:HEADER_BYTES],
        metadata_bytes=blob[HEADER_BYTES : HEADER_BYTES + metadata_length],
        tag=blob[HEADER_BYTES + metadata_length : payload_start],
        payload=blob[payload_start:],
    )


def _describe_unverified(fields: Mapping[str, Any]) -> str:
    """Name a snapshot by its model, version and key id as the blob claims them."""
    return (
        f"snapshot {describe_value(fields.get('model_name'))} "
        f"version {describe_value(fields.get('version'))} "
        f"signed with key id {describe_value(fields.get('key_id'))}"
    )


def _read_unverified_fields(metadata_bytes: bytes) -> dict[str, Any]:
    try:
        fields = orjson.loads(metadata_bytes)
    except orjson.JSONDecodeError:
        fields = None
    if not isinstance(fields, dict) or not isinstance(fields.get("key_id"), str):
        raise SnapshotError(
            "invalid snapshot: its metadata is not a JSON object with a key_id, so the blob "
            "is garbled or not a snapshot; republish it from the trainer"
        )
    return fields


def verify_snapshot(
    blob: bytes, keys: SigningKeys, max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES
) -> tuple[SnapshotMetadata, bytes]:
    """Check a blob's signature and payload digest; return the metadata and the pickle bytes.

    Nothing is unpickled. The pickle bytes are the decompressed payload.
    Raises SnapshotError when the blob is malformed, signed with a key id not
    in ``keys``, fails the HMAC check, carries invalid metadata, or when the
    payload's SHA-256 or decompression fails.
    """
    parts = _split(blob)
    fields = _read_unverified_fields(parts.metadata_bytes)
    name = _describe_unverified(fields)

    secret = keys.secret(fields["key_id"])
    if secret is None:
        raise SnapshotError(
            f"unknown signing key: cannot verify {name} (unverified) because that key id is "
            f"not among the configured ones ({', '.join(keys.key_ids)}); add the key to the "
            "reader's signing keys or republish the snapshot with a configured key"
        )
    expected_tag = _tag(secret, parts.header, parts.metadata_bytes, parts.payload)
    if not hmac.compare_digest(expected_tag, parts.tag):
        raise SnapshotError(
            f"signature check failed for {name} (unverified): the blob was changed after "
            "signing or signed with a different secret under that key id; do not load it, "
            "and republish it from the trainer"
        )

    try:
        metadata = SnapshotMetadata.model_validate_json(parts.metadata_bytes)
    except pydantic.ValidationError as error:
        detail = error.errors(include_url=False)[0]
        location = ".".join(str(part) for part in detail.get("loc", ())) or "$"
        raise SnapshotError(
            f"invalid metadata in {name}: field {location!r} {detail.get('msg', 'is invalid')}; "
            "the signer wrote a metadata schema this reader does not accept, so upgrade the "
            "reader or republish with a matching trainer"
        ) from None

    digest = hashlib.sha256(parts.payload).hexdigest()
    if not hmac.compare_digest(digest, metadata.payload_sha256):
        raise SnapshotError(
            f"payload SHA-256 mismatch in {name}: the metadata records "
            f"{metadata.payload_sha256!r} but the payload hashes to {digest!r}; the signer "
            "wrote inconsistent metadata, so republish the snapshot from the trainer"
        )
    return metadata, _decompress(parts.payload, metadata, max_pickle_bytes)


def _decompress(payload: bytes, metadata: SnapshotMetadata, max_pickle_bytes: int) -> bytes:
    decompressor = zlib.decompressobj()
    try:
        pickled = decompressor.decompress(payload, max_pickle_bytes)
    except zlib.error as error:
        raise SnapshotError(
            f"decompression failed for {_describe(metadata)}: {error}; "
            "republish the snapshot from the trainer"
        ) from None
    if decompressor.unconsumed_tail:
        raise SnapshotError(
            f"payload of {_describe(metadata)} decompresses to more than {max_pickle_bytes} "
            "bytes; raise max_pickle_bytes if a model this large is expected"
        )
    if not decompressor.eof:
        raise SnapshotError(
            f"payload of {_describe(metadata)} is an incomplete zlib stream; "
            "republish the snapshot from the trainer"
        )
    return pickled


def _describe(metadata: SnapshotMetadata) -> str:
    return (
        f"snapshot {metadata.model_name!r} version {metadata.version} "
        f"signed with key id {metadata.key_id!r}"
    )


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def load_snapshot(
    blob: bytes,
    keys: SigningKeys,
    allow_other_river: bool = False,
    max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES,
) -> tuple[SnapshotMetadata, ModelBundle]:
    """Verify a blob, then unpickle its bundle; return the metadata and the bundle.

    Verification comes first (see :func:`verify_snapshot`). A snapshot from a
    River release whose major.minor differs from the installed one is
    rejected unless ``allow_other_river`` is true, because River does not
    promise that pickles load across releases. Every failure, including an
    error raised while unpickling, is raised as SnapshotError.
    """
    metadata, pickled = verify_snapshot(blob, keys, max_pickle_bytes=max_pickle_bytes)

    if not allow_other_river and _major_minor(metadata.river_version) != _major_minor(
        RIVER_VERSION
    ):
        raise SnapshotError(
            f"River version mismatch for {_describe(metadata)}: it was pickled with River "
            f"{metadata.river_version} but River {RIVER_VERSION} is installed; install River "
            f"{'.'.join(_major_minor(metadata.river_version))}.x in the reader or republish "
            "the snapshot with a trainer on the same River release"
        )

    try:
        bundle = pickle.loads(pickled)
    # Unpickling can raise almost any exception (AttributeError for a moved
    # class, ModuleNotFoundError, EOFError, ...), and every one must reach the
    # caller as SnapshotError.
    except Exception as error:
        raise SnapshotError(
            f"unpickling failed for {_describe(metadata)}: {type(error).__name__}: "
            f"{describe_value(str(error))}; the reader's code or packages differ from the "
            "trainer's, so align them or republish the snapshot"
        ) from error
    if not isinstance(bundle, ModelBundle):
        raise SnapshotError(
            f"{_describe(metadata)} contains a {type(bundle).__name__}, not a ModelBundle; "
            "republish it with the trainer"
        )
    return metadata, bundle

"""Signed snapshots: round trip, tampering, key rotation and a read path that never learns."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import pickle
import random
import struct
import zlib

import pytest
from river import compose, linear_model, preprocessing

from shared import snapshots
from shared.drift import FeatureProfileBuilder
from shared.errors import ConfigError, SnapshotError
from shared.learn.models import build_model
from shared.snapshots import (
    HEADER_BYTES,
    MAGIC,
    TAG_BYTES,
    ModelBundle,
    SigningKeys,
    SnapshotMetadata,
    build_snapshot,
    load_snapshot,
    sign_snapshot,
    verify_snapshot,
)

SECRET_ONE = "secret-one-" + "1" * 32
SECRET_TWO = "secret-two-" + "2" * 32
CREATED_AT = dt.datetime(2024, 12, 4, 12, 0, tzinfo=dt.UTC)


def keys_one() -> SigningKeys:
    return SigningKeys.parse(f"k1:{SECRET_ONE}", "k1")


def keys_both(active: str = "k2") -> SigningKeys:
    return SigningKeys.parse(f"k2:{SECRET_TWO},k1:{SECRET_ONE}", active)


def examples(count: int, seed: int = 7):
    rng = random.Random(seed)
    for _ in range(count):
        features = {
            "item_id": f"item-{rng.randrange(40)}",
            "price": round(rng.uniform(1.0, 50.0), 2),
            "position": rng.randrange(5),
            "mobile": rng.random() < 0.5,
        }
        yield features, rng.random() < 0.05


def trained_bundle(model_name: str = "logreg", examples_count: int = 500) -> ModelBundle:
    bundle = ModelBundle(build_model(model_name), build_model("prior"), "champion")
    for features, label in examples(examples_count):
        bundle.model.learn_one(features, label)
        bundle.baseline.learn_one(features, label)
    return bundle


def metadata(version: int = 3) -> SnapshotMetadata:
    return SnapshotMetadata(
        model_name="champion",
        version=version,
        created_at=CREATED_AT,
        examples_seen=500,
        metrics={"log_loss": 0.12, "auc": None},
    )


def forge_blob(metadata_fields: dict, pickled: bytes, secret: str) -> bytes:
    """Build a blob from the documented layout, signing whatever metadata it is given."""
    payload = zlib.compress(pickled)
    metadata_bytes = SnapshotMetadata.model_validate(metadata_fields).model_dump_json().encode()
    header = MAGIC + struct.pack(">BI", 1, len(metadata_bytes))
    tag = hmac.new(secret.encode(), header + metadata_bytes + payload, hashlib.sha256).digest()
    return header + metadata_bytes + tag + payload


def signed_fields(payload_pickle: bytes, **overrides) -> dict:
    fields = metadata().model_dump()
    fields["key_id"] = "k1"
    fields["payload_sha256"] = hashlib.sha256(zlib.compress(payload_pickle)).hexdigest()
    fields.update(overrides)
    return fields


class Unloadable:
    """Raises on unpickling, like a class whose constructor changed between releases."""

    def __reduce__(self):
        return (_raise_on_load, ())


def _raise_on_load():
    raise AttributeError("module 'river.linear_model' has no attribute 'OldClassifier'")


# Signing keys


def test_keys_parse_ids_and_active():
    keys = keys_both()

    assert keys.active_key_id == "k2"
    assert keys.key_ids == ("k1", "k2")
    assert keys.secret("k1") == SECRET_ONE.encode()
    assert keys.secret("missing") is None


def test_keys_reject_short_secret():
    with pytest.raises(ConfigError) as caught:
        SigningKeys.parse("k1:too-short", "k1")

    assert "secrets.token_hex(32)" in str(caught.value)
    assert "too-short" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "active"),
    [
        (SECRET_ONE, "k1"),  # a bare secret with no key id
        (f"k1:{SECRET_ONE},k1:{SECRET_TWO}", "k1"),  # duplicate id
        (f"k1:{SECRET_ONE}", "k9"),  # active id not configured
        (f"bad id:{SECRET_ONE}", "bad id"),  # id with a space
        ("", "k1"),
    ],
)
def test_keys_reject_malformed_without_echoing(text, active):
    with pytest.raises(ConfigError) as caught:
        SigningKeys.parse(text, active)

    assert SECRET_ONE not in str(caught.value)
    assert SECRET_TWO not in str(caught.value)


def test_keys_repr_hides_secrets():
    keys = keys_both()

    assert SECRET_ONE not in repr(keys)
    assert SECRET_TWO not in repr(keys)
    assert "k1" in repr(keys)


# Round trip and format


def test_round_trip_scores_identically():
    bundle = trained_bundle()
    features = {"item_id": "item-3", "price": 10.0, "position": 1, "mobile": True}

    blob = sign_snapshot(bundle, metadata(), keys_one())
    loaded_metadata, loaded = load_snapshot(blob, keys_one())

    assert loaded.score(features) == bundle.score(features)
    assert loaded.model_name == "champion"
    assert loaded_metadata.version == 3
    assert loaded_metadata.key_id == "k1"
    assert loaded_metadata.created_at == CREATED_AT
    assert loaded_metadata.metrics == {"log_loss": 0.12, "auc": None}
    assert loaded_metadata.compression == "zlib"
    assert loaded_metadata.river_version == snapshots.RIVER_VERSION


def test_round_trip_keeps_reference_profile():
    builder = FeatureProfileBuilder()
    for features, label in examples(300):
        builder.update(features, 0.02 if label else 0.01)
    reference = builder.build()

    blob = sign_snapshot(
        trained_bundle(), metadata().model_copy(update={"reference": reference}), keys_one()
    )
    loaded_metadata, _ = load_snapshot(blob, keys_one())

    assert loaded_metadata.reference == reference


def test_blob_layout_matches_documented_format():
    final, blob = build_snapshot(trained_bundle(), metadata(), keys_one())

    magic, format_version, metadata_length = struct.unpack_from(">8sBI", blob)
    metadata_bytes = blob[HEADER_BYTES : HEADER_BYTES + metadata_length]
    tag = blob[HEADER_BYTES + metadata_length : HEADER_BYTES + metadata_length + TAG_BYTES]
    payload = blob[HEADER_BYTES + metadata_length + TAG_BYTES :]

    assert magic == b"OCTRSNAP"
    assert format_version == 1
    assert HEADER_BYTES == 13
    assert SnapshotMetadata.model_validate_json(metadata_bytes) == final
    assert hashlib.sha256(payload).hexdigest() == final.payload_sha256
    signed = blob[: HEADER_BYTES + metadata_length] + payload
    assert tag == hmac.new(SECRET_ONE.encode(), signed, hashlib.sha256).digest()
    assert isinstance(pickle.loads(zlib.decompress(payload)), ModelBundle)


def test_verify_returns_pickle_without_unpickling():
    blob = sign_snapshot(
        ModelBundle(Unloadable(), build_model("prior"), "champion"), metadata(), keys_one()
    )

    verified_metadata, pickled = verify_snapshot(blob, keys_one())

    assert verified_metadata.version == 3
    assert pickled.startswith(b"\x80")  # a pickle protocol marker


def test_bundle_and_metadata_names_must_match():
    bundle = ModelBundle(build_model("logreg"), build_model("prior"), "challenger")

    with pytest.raises(ValueError, match="challenger"):
        sign_snapshot(bundle, metadata(), keys_one())


# Rejected blobs


def test_tampered_payload_byte_rejected():
    blob = bytearray(sign_snapshot(trained_bundle(), metadata(), keys_one()))
    blob[-10] ^= 0x01

    with pytest.raises(SnapshotError, match="signature check failed") as caught:
        load_snapshot(bytes(blob), keys_one())

    assert "version 3" in str(caught.value)
    assert "'k1'" in str(caught.value)


def test_tampered_metadata_byte_rejected():
    blob = sign_snapshot(trained_bundle(), metadata(), keys_one())
    position = blob.index(b'"examples_seen":500') + len(b'"examples_seen":')
    tampered = blob[:position] + b"9" + blob[position + 1 :]

    with pytest.raises(SnapshotError, match="signature check failed"):
        load_snapshot(tampered, keys_one())


def test_tampered_tag_rejected():
    blob = bytearray(sign_snapshot(trained_bundle(), metadata(), keys_one()))
    metadata_length = struct.unpack_from(">I", blob, 9)[0]
    blob[HEADER_BYTES + metadata_length] ^= 0xFF

    with pytest.raises(SnapshotError, match="signature check failed"):
        load_snapshot(bytes(blob), keys_one())


def test_unknown_key_id_rejected():
    blob = sign_snapshot(trained_bundle(), metadata(), keys_both(active="k2"))

    with pytest.raises(SnapshotError, match="unknown signing key") as caught:
        load_snapshot(blob, keys_one())

    assert "'k2'" in str(caught.value)
    assert "version 3" in str(caught.value)


def test_same_key_id_other_secret_rejected():
    other = SigningKeys.parse("k1:" + "x" * 40, "k1")
    blob = sign_snapshot(trained_bundle(), metadata(), other)

    with pytest.raises(SnapshotError, match="signature check failed"):
        load_snapshot(blob, keys_one())


def test_rotated_key_verifies_until_removed():
    old_blob = sign_snapshot(trained_bundle(), metadata(version=1), keys_one())
    rotated = keys_both(active="k2")
    new_blob = sign_snapshot(trained_bundle(), metadata(version=2), rotated)
    after_removal = SigningKeys.parse(f"k2:{SECRET_TWO}", "k2")

    assert load_snapshot(old_blob, rotated)[0].key_id == "k1"
    assert load_snapshot(new_blob, rotated)[0].key_id == "k2"
    assert load_snapshot(new_blob, after_removal)[0].version == 2
    with pytest.raises(SnapshotError, match="unknown signing key"):
        load_snapshot(old_blob, after_removal)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"not a snapshot at all, just some text that is long enough",
        pickle.dumps({"model": "pretend"}),
        MAGIC + b"\x02" + b"\x00" * 64,  # a future format version
        MAGIC + b"\x01" + b"\xff\xff\xff\xff" + b"\x00" * 64,  # garbled metadata length
        MAGIC + b"\x01" + struct.pack(">I", 4) + b"nope" + b"\x00" * 40,  # metadata not JSON
        MAGIC + b"\x01" + struct.pack(">I", 2) + b"{}" + b"\x00" * 40,  # metadata without key id
    ],
    ids=["empty", "text", "bare-pickle", "future-format", "huge-length", "not-json", "no-key-id"],
)
def test_garbage_blob_rejected(blob):
    with pytest.raises(SnapshotError, match="snapshot"):
        load_snapshot(blob, keys_one())


@pytest.mark.parametrize("keep_fraction", [0.0, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_truncated_blob_rejected(keep_fraction):
    blob = sign_snapshot(trained_bundle(), metadata(), keys_one())
    truncated = blob[: int(len(blob) * keep_fraction)]

    with pytest.raises(SnapshotError):
        load_snapshot(truncated, keys_one())


def test_payload_digest_mismatch_rejected():
    pickled = pickle.dumps(trained_bundle())
    fields = signed_fields(pickled, payload_sha256="0" * 64)
    blob = forge_blob(fields, pickled, SECRET_ONE)

    with pytest.raises(SnapshotError, match="SHA-256 mismatch") as caught:
        load_snapshot(blob, keys_one())

    assert "version 3" in str(caught.value)


def test_other_river_minor_rejected(monkeypatch):
    monkeypatch.setattr(snapshots, "RIVER_VERSION", "0.1.0")
    blob = sign_snapshot(trained_bundle(), metadata(), keys_one())
    monkeypatch.undo()

    with pytest.raises(SnapshotError, match="River version mismatch") as caught:
        load_snapshot(blob, keys_one())

    assert "0.1.0" in str(caught.value)
    assert load_snapshot(blob, keys_one(), allow_other_river=True)[0].river_version == "0.1.0"


def test_other_river_patch_accepted(monkeypatch):
    major, minor, *_ = snapshots.RIVER_VERSION.split(".")
    monkeypatch.setattr(snapshots, "RIVER_VERSION", f"{major}.{minor}.999")
    blob = sign_snapshot(trained_bundle(), metadata(), keys_one())
    monkeypatch.undo()

    assert load_snapshot(blob, keys_one())[0].river_version == f"{major}.{minor}.999"


def test_unpickling_error_becomes_snapshot_error():
    bundle = ModelBundle(Unloadable(), build_model("prior"), "champion")
    blob = sign_snapshot(bundle, metadata(), keys_one())

    with pytest.raises(SnapshotError, match="unpickling failed") as caught:
        load_snapshot(blob, keys_one())

    assert "AttributeError" in str(caught.value)
    assert "'k1'" in str(caught.value)


def test_signed_non_bundle_rejected():
    pickled = pickle.dumps({"model": "not a bundle"})
    blob = forge_blob(signed_fields(pickled), pickled, SECRET_ONE)

    with pytest.raises(SnapshotError, match="not a ModelBundle"):
        load_snapshot(blob, keys_one())


def test_oversized_pickle_rejected():
    blob = sign_snapshot(trained_bundle(), metadata(), keys_one())

    with pytest.raises(SnapshotError, match="max_pickle_bytes"):
        load_snapshot(blob, keys_one(), max_pickle_bytes=100)


def test_secrets_absent_from_errors_and_logs(caplog):
    caplog.set_level(logging.DEBUG)
    blob = sign_snapshot(trained_bundle(), metadata(), keys_both(active="k1"))
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    messages = []
    for candidate, keys in [
        (tampered, keys_both()),
        (blob, SigningKeys.parse(f"k2:{SECRET_TWO}", "k2")),
        (blob[:40], keys_both()),
        (b"garbage", keys_both()),
    ]:
        with pytest.raises(SnapshotError) as caught:
            load_snapshot(candidate, keys)
        messages.append(str(caught.value))
    for text, active in [("k1:short", "k1"), (SECRET_ONE, "k1"), (f"k1:{SECRET_ONE}", "k2")]:
        with pytest.raises(ConfigError) as caught:
            SigningKeys.parse(text, active)
        messages.append(str(caught.value))
    messages.append(caplog.text)

    for message in messages:
        assert SECRET_ONE not in message
        assert SECRET_TWO not in message


# The read path never learns


def scaler_pipeline() -> compose.Pipeline:
    return compose.Pipeline(preprocessing.StandardScaler(), linear_model.LogisticRegression())


def numeric(features: dict) -> dict:
    return {"price": features["price"], "position": float(features["position"])}


def test_scoring_never_changes_scaler_pipeline():
    bundle = ModelBundle(scaler_pipeline(), build_model("prior"), "champion")
    for features, label in examples(500):
        bundle.model.learn_one(numeric(features), label)
        bundle.baseline.learn_one(features, label)
    before = pickle.dumps(bundle)

    for features, _ in examples(1_000, seed=11):
        bundle.score(numeric(features))

    assert pickle.dumps(bundle) == before


@pytest.mark.parametrize("model_name", ["hoeffding", "prior"])
def test_scoring_never_changes_registry_model(model_name):
    bundle = trained_bundle(model_name)
    before = pickle.dumps(bundle)

    for features, _ in examples(1_000, seed=11):
        bundle.score(features)

    assert pickle.dumps(bundle) == before


def test_scoring_never_changes_logreg():
    bundle = trained_bundle("logreg")
    before = pickle.dumps(bundle)

    for features, _ in examples(1_000, seed=11):
        bundle.score(features)

    assert pickle.dumps(bundle) == before


def test_scoring_keeps_logreg_weights():
    bundle = trained_bundle("logreg")
    classifier = bundle.model[-1]
    weights_before = dict(classifier._weights)
    intercept_before = classifier.intercept

    for features, _ in examples(1_000, seed=11):
        bundle.score({**features, "unseen_feature": "never-learned"})

    assert dict(classifier._weights) == weights_before
    assert classifier.intercept == intercept_before


def test_scoring_loaded_snapshot_never_changes_it():
    blob = sign_snapshot(trained_bundle("hoeffding"), metadata(), keys_one())
    _, bundle = load_snapshot(blob, keys_one())
    before = pickle.dumps(bundle)

    for features, _ in examples(1_000, seed=11):
        bundle.score(features)

    assert pickle.dumps(bundle) == before


def test_scoring_refused_during_learn_during_predict():
    bundle = ModelBundle(scaler_pipeline(), build_model("prior"), "champion")
    for features, label in examples(50):
        bundle.model.learn_one(numeric(features), label)
    scaler_counts = dict(bundle.model["StandardScaler"].counts)

    with compose.learn_during_predict(), pytest.raises(RuntimeError, match="learn_during_predict"):
        bundle.score({"price": 3.0, "position": 1.0})

    assert dict(bundle.model["StandardScaler"].counts) == scaler_counts

"""Helpers for the scorer tests: models, settings, an in-thread server and a recording sink."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from river import base

from services.scorer.logging_sink import ServedImpression
from services.scorer.models import Arm, LoadedModel, ModelHolder, ServingModels
from services.scorer.settings import ScorerSettings
from shared.drift import ReferenceProfile
from shared.learn.models import build_model
from shared.localstack import find_free_port
from shared.snapshots import ModelBundle, SigningKeys, SnapshotMetadata

# The same key as the live pipeline tests, so snapshots verify in both.
SIGNING_KEY = "k1:" + "ab" * 32
KEYS = SigningKeys.parse(SIGNING_KEY, "k1")
SERVER_START_TIMEOUT_S = 10.0


class FixedProbability(base.Classifier):
    """A stub model: the probability in feature ``feature``, or ``probability`` without it."""

    def __init__(self, probability: float = 0.5, feature: str | None = None) -> None:
        self.probability = probability
        self.feature = feature

    @property
    def _multiclass(self) -> bool:
        return False

    def learn_one(self, x: dict, y: bool, w: float = 1.0) -> None:
        pass

    def predict_proba_one(self, x: dict) -> dict[bool, float]:
        probability = x.get(self.feature, self.probability) if self.feature else self.probability
        return {False: 1.0 - probability, True: probability}


def trained_bundle(name: str = "champion", seed: int = 0, examples: int = 200) -> ModelBundle:
    """A logistic regression and its baseline trained on a small deterministic stream."""
    model = build_model("logreg")
    baseline = build_model("prior")
    for index in range(examples):
        features = {"item_id": f"item-{(index + seed) % 7}", "position": index % 4}
        label = (index * (seed + 3)) % 5 == 0
        model.learn_one(features, label)
        baseline.learn_one(features, label)
    return ModelBundle(model, baseline, name)


def stub_bundle(probability: float = 0.5, name: str = "champion", feature: str | None = None):
    """A bundle whose model returns a fixed probability, or the one given in a feature."""
    return ModelBundle(FixedProbability(probability, feature), FixedProbability(0.01), name)


def loaded(
    bundle: ModelBundle,
    version: int = 1,
    arm: Arm = "champion",
    reference: ReferenceProfile | None = None,
    created_at: dt.datetime | None = None,
) -> LoadedModel:
    """Wrap a bundle as a loaded model, without Redis."""
    metadata = SnapshotMetadata(
        model_name=bundle.model_name,
        version=version,
        created_at=created_at or dt.datetime.now(dt.UTC),
        examples_seen=100,
        reference=reference,
    )
    return LoadedModel(arm=arm, metadata=metadata, bundle=bundle, loaded_at=time.time())


def holder_with(
    champion: LoadedModel | None = None, challenger: LoadedModel | None = None
) -> ModelHolder:
    return ModelHolder(ServingModels(champion=champion, challenger=challenger))


def scorer_settings(**overrides: Any) -> ScorerSettings:
    """Scorer settings for in-process tests: no impression log unless asked for."""
    values: dict[str, Any] = {
        "log_impressions": False,
        "signing_keys": SIGNING_KEY,
        "signing_key_id": "k1",
        "http_host": "127.0.0.1",
    }
    values.update(overrides)
    return ScorerSettings(**values)


def scorer_process_env(redis_url: str, namespace: str) -> dict[str, str]:
    """Environment for an ``online-ctr scorer`` process that needs only Redis.

    The impression log is off, so no broker is needed, and the HTTP port is
    a free loopback port.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("ONLINE_CTR_")}
    env.update(
        {
            "ONLINE_CTR_REDIS_URL": redis_url,
            "ONLINE_CTR_REGISTRY_NAMESPACE": namespace,
            "ONLINE_CTR_SIGNING_KEYS": SIGNING_KEY,
            "ONLINE_CTR_SIGNING_KEY_ID": "k1",
            "ONLINE_CTR_HTTP_HOST": "127.0.0.1",
            "ONLINE_CTR_HTTP_PORT": str(find_free_port()),
            "ONLINE_CTR_LOG_IMPRESSIONS": "false",
            "ONLINE_CTR_LOG_LEVEL": "INFO",
        }
    )
    return env


def is_ready(url: str) -> bool:
    """Return whether the scorer at ``url`` returns 200 on /readyz."""
    try:
        return httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


class RecordingSink:
    """An impression sink that keeps what it is offered."""

    def __init__(self) -> None:
        self.records: list[ServedImpression] = []

    def offer(self, record: ServedImpression) -> bool:
        self.records.append(record)
        return True

    def start(self) -> None:
        pass

    def close(self, timeout_s: float = 5.0) -> None:
        pass


class ThreadServer:
    """A uvicorn server on 127.0.0.1 in a background thread, with the lifespan run."""

    def __init__(self, app: FastAPI) -> None:
        self.port = find_free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, access_log=False, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"test server did not start within {SERVER_START_TIMEOUT_S} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[Callable[[FastAPI], httpx.Client]]:
    """Start an app in a thread server; return an httpx client for it. Both stop after the test."""
    servers: list[ThreadServer] = []
    clients: list[httpx.Client] = []

    def start(app: FastAPI) -> httpx.Client:
        server = ThreadServer(app).start()
        servers.append(server)
        client = httpx.Client(base_url=server.url, timeout=10.0)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.stop()

"""Measure the scorer's HTTP latency and throughput against a bare FastAPI endpoint.

Each server runs in its own process under uvicorn with the same options as
``online-ctr scorer`` (one worker, no access log), on 127.0.0.1 only. This
process is the load generator: threads that each keep one HTTP/1.1
connection alive and send requests with ``http.client``.

Phases, each bounded by ``--duration`` seconds:

1. closed loop, single impressions: every thread sends its next request as
   soon as the last one returns; gives the maximum throughput and its latency;
2. the same against a bare FastAPI endpoint that returns a constant, which
   gives the framework's ceiling on this machine. The server's CPU time per
   request, read from /proc, is reported too, because it depends less on
   what else runs on the machine;
3. open loop at a fixed ``--rate`` of single impressions per second, against
   both servers. Latency is measured from each request's scheduled send
   time, so a slow response that delays the next request counts against the
   server. The bare endpoint's p99 is the floor that the machine allows;
4. closed loop, batches of ``--batch-size`` impressions.

The scorer serves a logistic regression trained on synthetic traffic, with a
drift reference profile, and is given the model directly, without Redis. The
impression log is off unless ``--with-kafka`` starts a local Tansu broker.
The load generator shares the machine's cores with the server, so absolute
numbers are lower bounds for a server with cores of its own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOST = "127.0.0.1"
READY_TIMEOUT_SECONDS = 30.0
USERS = 10_000
ITEMS = 500


@dataclass
class PhaseResult:
    """Latency and throughput of one phase; latencies in milliseconds."""

    name: str
    requests: int
    errors: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    # Server CPU time (user + system) per request, from /proc; None where /proc is missing.
    server_cpu_ms_per_request: float | None = None


# Servers, run in child processes.


def _training_stream(count: int, seed: int) -> list[tuple[dict, bool]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        features = _features(rng)
        rate = 0.02 + 0.04 * (features["device"] == "mobile") + 0.01 * (features["position"] < 2)
        features["item_id"] = f"item-{rng.randrange(ITEMS)}"
        examples.append((features, rng.random() < rate))
    return examples


def _features(rng: random.Random) -> dict:
    return {
        "position": rng.randrange(10),
        "campaign": f"c{rng.randrange(20)}",
        "device": rng.choice(("mobile", "desktop", "tablet")),
        "hour": rng.randrange(24),
        "price": round(rng.uniform(1.0, 200.0), 2),
    }


def _build_holder():
    from services.scorer.models import LoadedModel, ModelHolder, ServingModels
    from shared.drift import FeatureProfileBuilder
    from shared.learn.models import build_model
    from shared.snapshots import ModelBundle, SnapshotMetadata

    model = build_model("logreg")
    baseline = build_model("prior")
    profile = FeatureProfileBuilder()
    for features, label in _training_stream(20_000, seed=1):
        profile.update(features, model.predict_proba_one(features).get(True, 0.0))
        model.learn_one(features, label)
        baseline.learn_one(features, label)
    metadata = SnapshotMetadata(
        model_name="champion",
        version=1,
        created_at=dt.datetime.now(dt.UTC),
        examples_seen=20_000,
        reference=profile.build(),
    )
    bundle = ModelBundle(model, baseline, "champion")
    loaded = LoadedModel("champion", metadata, bundle, loaded_at=time.time())
    return ModelHolder(ServingModels(champion=loaded))


def _serve(kind: str, port: int, kafka: str | None) -> None:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    from services.scorer.app import create_app
    from services.scorer.main import _uvicorn_options
    from services.scorer.settings import ScorerSettings

    settings = ScorerSettings(
        http_host=HOST,
        http_port=port,
        log_impressions=kafka is not None,
        kafka_bootstrap_servers=kafka or "127.0.0.1:9",
    )
    if kind == "scorer":
        app = create_app(settings, holder=_build_holder())
    else:
        app = FastAPI()

        @app.post("/v1/score")
        async def constant() -> Response:
            return Response(b'{"probability":0.5}', media_type="application/json")

        @app.get("/healthz")
        async def healthz() -> Response:
            return Response(b'{"status":"ok"}', media_type="application/json")

    uvicorn.Server(uvicorn.Config(app, **_uvicorn_options(settings))).run()


class ServerProcess:
    """A benchmark server in a child process, stopped on exit."""

    def __init__(self, kind: str, kafka: str | None) -> None:
        from shared.localstack import find_free_port

        self.kind = kind
        self.port = find_free_port()
        command = [sys.executable, __file__, "--serve", kind, "--port", str(self.port)]
        if kafka:
            command += ["--kafka", kafka]
        env = {key: value for key, value in os.environ.items() if not key.startswith("ONLINE_CTR_")}
        env["ONLINE_CTR_LOG_LEVEL"] = "WARNING"
        self.process = subprocess.Popen(command, env=env)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with code {self.process.returncode}")
            try:
                connection = http.client.HTTPConnection(HOST, self.port, timeout=1)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.kind} server not ready within {READY_TIMEOUT_SECONDS} s")

    def cpu_seconds(self) -> float | None:
        """Return the server's CPU time so far, user plus system, or None without /proc."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


# Load generation.


def _request_bodies(count: int, batch_size: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        items = [
            {
                "user_id": f"user-{rng.randrange(USERS)}",
                "item_id": f"item-{rng.randrange(ITEMS)}",
                "features": _features(rng),
            }
            for _ in range(batch_size)
        ]
        payload = items[0] if batch_size == 1 else {"requests": items}
        bodies.append(json.dumps(payload).encode())
    return bodies


class _Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.lock = threading.Lock()

    def add(self, latencies: list[float], errors: int) -> None:
        with self.lock:
            self.latencies.extend(latencies)
            self.errors += errors


def _post(connection: http.client.HTTPConnection, path: str, body: bytes) -> bool:
    connection.request("POST", path, body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status == 200


def closed_loop(
    name: str, port: int, path: str, bodies: list[bytes], threads: int, duration: float
) -> PhaseResult:
    """Send requests back to back from each thread for ``duration`` seconds."""
    recorder = _Recorder()
    started = time.perf_counter()
    end = started + duration

    def worker(offset: int) -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=10)
        latencies, errors = [], 0
        for index in itertools.count(offset, threads):
            sent = time.perf_counter()
            if sent >= end:
                break
            if not _post(connection, path, bodies[index % len(bodies)]):
                errors += 1
            latencies.append(time.perf_counter() - sent)
        connection.close()
        recorder.add(latencies, errors)

    _run_threads(worker, threads)
    return _result(name, recorder, time.perf_counter() - started)


def fixed_rate(
    name: str, port: int, path: str, bodies: list[bytes], rate: float, threads: int, duration: float
) -> PhaseResult:
    """Send ``rate`` requests per second on a fixed schedule; time each from its scheduled start."""
    recorder = _Recorder()
    schedule = itertools.count()
    schedule_lock = threading.Lock()
    started = time.perf_counter() + 0.1
    total = int(rate * duration)

    def worker(_: int) -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=10)
        latencies, errors = [], 0
        while True:
            with schedule_lock:
                index = next(schedule)
            if index >= total:
                break
            scheduled = started + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if not _post(connection, path, bodies[index % len(bodies)]):
                errors += 1
            latencies.append(time.perf_counter() - scheduled)
        connection.close()
        recorder.add(latencies, errors)

    _run_threads(worker, threads)
    return _result(name, recorder, time.perf_counter() - started)


def _run_threads(target, count: int) -> None:
    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _result(name: str, recorder: _Recorder, seconds: float) -> PhaseResult:
    latencies = sorted(recorder.latencies)
    if not latencies:
        raise RuntimeError(f"phase {name!r} completed no request")
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return PhaseResult(
        name=name,
        requests=len(latencies),
        errors=recorder.errors,
        seconds=round(seconds, 3),
        requests_per_second=round(len(latencies) / seconds, 1),
        p50_ms=round(quantiles[49] * 1000, 3),
        p99_ms=round(quantiles[98] * 1000, 3),
        max_ms=round(latencies[-1] * 1000, 3),
    )


# The run.


def _with_cpu(server: ServerProcess, run_phase) -> PhaseResult:
    before = server.cpu_seconds()
    result = run_phase()
    after = server.cpu_seconds()
    if before is not None and after is not None:
        result.server_cpu_ms_per_request = round((after - before) * 1000 / result.requests, 4)
    return result


def _measure(kind: str, args: argparse.Namespace, kafka: str | None) -> list[PhaseResult]:
    server = ServerProcess(kind, kafka)
    try:
        server.wait_ready()
        singles = _request_bodies(5_000, 1, seed=2)
        # Warm-up: first requests pay for imports and connection set-up.
        closed_loop("warm-up", server.port, "/v1/score", singles, args.threads, 1.0)
        results = [
            _with_cpu(
                server,
                lambda: closed_loop(
                    f"{kind} single, closed loop",
                    server.port,
                    "/v1/score",
                    singles,
                    args.threads,
                    args.duration,
                ),
            )
        ]
        # The same fixed rate against both servers: the bare endpoint's p99 is
        # the floor that the machine and the load generator allow.
        results.append(
            _with_cpu(
                server,
                lambda: fixed_rate(
                    f"{kind} single at {args.rate:g}/s",
                    server.port,
                    "/v1/score",
                    singles,
                    args.rate,
                    args.rate_threads,
                    args.duration,
                ),
            )
        )
        if kind == "scorer":
            batches = _request_bodies(200, args.batch_size, seed=3)
            results.append(
                _with_cpu(
                    server,
                    lambda: closed_loop(
                        f"scorer batch of {args.batch_size}, closed loop",
                        server.port,
                        "/v1/score/batch",
                        batches,
                        args.threads,
                        args.duration,
                    ),
                )
            )
        return results
    finally:
        server.stop()


def _report(results: list[PhaseResult], batch_size: int) -> dict:
    by_name = {result.name: result for result in results}
    scorer = by_name["scorer single, closed loop"]
    bare = by_name["bare single, closed loop"]
    lines = [
        f"{'phase':<36} {'requests':>9} {'errors':>6} {'req/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'server CPU ms/req':>18}"
    ]
    for result in results:
        cpu = result.server_cpu_ms_per_request
        lines.append(
            f"{result.name:<36} {result.requests:>9} {result.errors:>6} "
            f"{result.requests_per_second:>9.1f} {result.p50_ms:>8.2f} {result.p99_ms:>8.2f} "
            f"{result.max_ms:>8.2f} {'n/a' if cpu is None else f'{cpu:.3f}':>18}"
        )
    ratio = scorer.requests_per_second / bare.requests_per_second
    lines.append(f"throughput ratio scorer / bare endpoint: {ratio:.2f} (target >= 0.5)")
    cpu_ratio = None
    if scorer.server_cpu_ms_per_request and bare.server_cpu_ms_per_request:
        cpu_ratio = bare.server_cpu_ms_per_request / scorer.server_cpu_ms_per_request
        lines.append(
            f"server CPU per request, bare / scorer: {cpu_ratio:.2f} "
            "(the throughput ratio a server with a core of its own would reach)"
        )
    print("\n".join(lines))
    return {
        "phases": [asdict(result) for result in results],
        "throughput_ratio": round(ratio, 3),
        "cpu_per_request_ratio": None if cpu_ratio is None else round(cpu_ratio, 3),
        "batch_size": batch_size,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Measure the scorer's single and batch latency, its throughput relative to a bare "
            "FastAPI endpoint, and its p99 latency at a fixed request rate, on 127.0.0.1."
        )
    )

    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per phase, at most 120 (default: 10)"
    )
    parser.add_argument(
        "--threads", type=int, default=4, help="connections in the closed-loop phases (default: 4)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=500.0,
        help="requests per second of the fixed-rate phase (default: 500)",
    )
    parser.add_argument(
        "--rate-threads",
        type=int,
        default=8,
        help="connections in the fixed-rate phase (default: 8)",
    )

    parser.add_argument(
        "--batch-size", type=int, default=50, help="impressions per batch request (default: 50)"
    )
    parser.add_argument(
        "--with-kafka",
        action="store_true",
        help="start a local Tansu broker and log every scored impression to it",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")

    # Internal: the benchmark starts its servers by running this script again.
    parser.add_argument("--serve", choices=("scorer", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kafka", default=None, help=argparse.SUPPRESS)
    return parser


def main() -> int:
    args = _parser().parse_args()
    if args.serve:
        _serve(args.serve, args.port, args.kafka)
        return 0
    if not 0 < args.duration <= 120:
        raise SystemExit("--duration must be between 0 and 120 seconds")

    broker = None
    kafka = None
    if args.with_kafka:
        from shared.localstack import TansuBroker, create_topics

        broker = TansuBroker()
        broker.start()
        kafka = broker.bootstrap
        create_topics(kafka, {"impressions": 4})
    try:
        results = _measure("scorer", args, kafka) + _measure("bare", args, None)
    finally:
        if broker is not None:
            broker.close()

    report = _report(results, args.batch_size)
    report["impression_log"] = "kafka" if args.with_kafka else "off"
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``online-ctr`` command line: replay, import, generate and the services."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic

from shared.durations import parse_duration
from shared.errors import OnlineCtrError
from shared.logs import configure_logging

if TYPE_CHECKING:
    from shared.replay.runner import ReplayConfig
    from shared.replay.targets import Target

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE = Path("data/samples/obd-small.jsonl.gz")
DEFAULT_REPORT_DIR = Path("reports/replay")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_join_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("join")
    group.add_argument(
        "--window",
        type=_duration,
        action="append",
        default=None,
        metavar="DURATION",
        help="attribution window after each impression, e.g. 10m or 600 (default: 10m); "
        "give it several times to compare windows: the first one drives the main replay",
    )
    group.add_argument(
        "--lateness",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="how far the watermark trails the newest event time (default: 1m)",
    )
    group.add_argument(
        "--retention",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="how long after its window a decided impression is remembered, so that late "
        "clicks are recognised (default: one window)",
    )
    group.add_argument(
        "--late-clicks",
        choices=("drop", "correct"),
        default=None,
        help="clicks after their window closed: drop and count them, or also emit a "
        "positive correction (default: drop)",
    )


# Replay.

REPLAY_DESCRIPTION = """\
Replay a recorded stream in event time: score each impression as it arrives,
decide its label through the attribution window, learn, and report the model
against the running-click-rate baseline.

Every option can also come from a configuration file (--config, TOML or JSON)
that uses the names in the report's config.json; an option given on the
command line overrides the file. Each report writes config.json, so
`online-ctr replay --config reports/replay/config.json` repeats a run.
"""


def _moment(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"cannot read time {text!r}; write ISO 8601 with a zone, e.g. 2019-11-28T00:00:00Z"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"time {text!r} has no time zone; add one, e.g. {text}Z for UTC"
        )
    return moment


def _target(text: str) -> Target:
    from shared.replay.targets import Target

    try:
        return Target.parse(text)
    except (ValueError, pydantic.ValidationError) as error:
        raise argparse.ArgumentTypeError(str(error).splitlines()[0]) from None


def _add_replay(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "replay",
        help="replay a recorded stream through the join, the learner and the metrics",
        description=REPLAY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help="replay configuration file, .toml or .json; command-line options override it",
    )
    parser.add_argument(
        "--events",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"recorded stream, .jsonl or .jsonl.gz (default: {DEFAULT_SAMPLE})",
    )
    parser.add_argument("--model", default=None, help="model from the registry (default: ctr)")
    parser.add_argument(
        "--delayed-feedback",
        choices=("fake_negative", "none"),
        default=None,
        help="fake_negative: learn each impression as a negative when served and calibrate "
        "(no start-up bias); none: learn each example when its label is decided "
        "(default: fake_negative)",
    )
    _add_join_options(parser)
    parser.add_argument(
        "--segment-by",
        action="append",
        default=None,
        metavar="FEATURE",
        help="report metrics per value of this feature; repeat for several",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"directory for metrics, plots and index.html (default: {DEFAULT_REPORT_DIR})",
    )
    parser.add_argument(
        "--rolling-window",
        type=int,
        default=None,
        metavar="N",
        help="examples in the rolling metrics window (default: 10000)",
    )
    parser.add_argument(
        "--initial-snapshot",
        type=Path,
        default=None,
        metavar="PATH",
        help="start from this signed snapshot file (verified with ONLINE_CTR_SIGNING_KEYS) "
        "instead of an untrained model; `online-ctr snapshot export` writes one",
    )

    judging = parser.add_argument_group("success target and holdout")
    judging.add_argument(
        "--target",
        type=_target,
        action="append",
        default=None,
        metavar="METRIC<=VALUE",
        help="success criterion each model is judged by, e.g. 'normalized_entropy<=0.95' or "
        "'auc>=0.7'; metrics: normalized_entropy, log_loss, auc, calibration_error; repeat "
        "for several",
    )
    judging.add_argument(
        "--holdout-from",
        type=_moment,
        default=None,
        metavar="TIME",
        help="evaluate only impressions at or after TIME (ISO 8601 with a zone); everything "
        "before it is learned",
    )
    judging.add_argument(
        "--after-holdout",
        choices=("learn", "freeze"),
        default=None,
        help="after --holdout-from, keep learning or stop (default: learn)",
    )

    comparing = parser.add_argument_group("offline A/B")
    comparing.add_argument(
        "--compare",
        action="append",
        default=None,
        metavar="MODEL",
        help="also replay this registry model on the same examples and compare it with "
        "--model by paired bootstrap; repeat for several",
    )
    comparing.add_argument(
        "--confidence-level",
        type=float,
        default=None,
        metavar="LEVEL",
        help="confidence level of the bootstrap intervals (default: 0.95)",
    )
    comparing.add_argument(
        "--bootstrap-samples",
        type=int,
        default=None,
        metavar="N",
        help="bootstrap resamples, shared by every compared model and metric (default: 1000)",
    )
    comparing.add_argument(
        "--bootstrap-seed",
        type=int,
        default=None,
        metavar="SEED",
        help="seed of the bootstrap resampling (default: 0)",
    )

    fresh = parser.add_argument_group("freshness")
    fresh.add_argument(
        "--freshness",
        action="store_true",
        default=None,
        help="also replay the model frozen at --freeze-at and retrained from scratch every "
        "--retrain-every, and compare them with continuous learning",
    )
    fresh.add_argument(
        "--freeze-at",
        type=_moment,
        default=None,
        metavar="TIME",
        help="when the frozen and retrained copies stop learning online (default: "
        "--holdout-from, else the first event time plus --retrain-every)",
    )
    fresh.add_argument(
        "--retrain-every",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="event time between two retrains from scratch (default: 1d)",
    )

    slices = parser.add_argument_group("slices and window what-if")
    slices.add_argument(
        "--slice-min-count",
        type=int,
        default=None,
        metavar="N",
        help="segments with fewer served examples are grouped into one row (default: 500)",
    )
    slices.add_argument(
        "--calibration-tolerance",
        type=float,
        default=None,
        metavar="X",
        help="flag a segment whose calibration is off 1.0 by more than X (default: 0.2)",
    )
    slices.add_argument(
        "--max-missed-click-share",
        type=float,
        default=None,
        metavar="SHARE",
        help="with several --window values, recommend the smallest window that misses at "
        "most this share of clicks (default: 0.05)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_run_replay)


# Command-line option name -> ReplayConfig field, for the options that map one to one.
_REPLAY_FIELDS = {
    "events": "events",
    "model": "model",
    "delayed_feedback": "delayed_feedback",
    "segment_by": "segment_by",
    "rolling_window": "rolling_window",
    "initial_snapshot": "initial_snapshot",
    "target": "targets",
    "holdout_from": "holdout_from",
    "after_holdout": "after_holdout",
    "compare": "compare",
    "confidence_level": "confidence_level",
    "bootstrap_samples": "bootstrap_samples",
    "bootstrap_seed": "bootstrap_seed",
    "freshness": "freshness",
    "freeze_at": "freeze_at",
    "retrain_every": "retrain_every_seconds",
    "slice_min_count": "slice_min_count",
    "calibration_tolerance": "calibration_tolerance",
    "max_missed_click_share": "max_missed_click_share",
}
_JOIN_FIELDS = {
    "lateness": "allowed_lateness_seconds",
    "retention": "closed_retention_seconds",
    "late_clicks": "late_click_policy",
}


def replay_config_from(args: argparse.Namespace) -> tuple[ReplayConfig, Path]:
    """Build the replay configuration and report directory from a file and the options.

    An option given on the command line overrides the file; whatever neither
    gives keeps its default.
    """
    from shared.replay.runner import ReplayConfig

    values: dict[str, Any] = read_replay_config_file(args.config) if args.config else {}
    report_dir = Path(values.pop("report", None) or DEFAULT_REPORT_DIR)
    if args.report is not None:
        report_dir = args.report
    values.setdefault("events", str(DEFAULT_SAMPLE))

    for option, name in _REPLAY_FIELDS.items():
        value = getattr(args, option)
        if value is not None:
            values[name] = value
    join = dict(values.get("join") or {})
    for option, name in _JOIN_FIELDS.items():
        value = getattr(args, option)
        if value is not None:
            join[name] = value
    if args.window:
        join["window_seconds"] = args.window[0]
        values["what_if_windows"] = args.window if len(args.window) > 1 else []
    values["join"] = join

    source = f"in {str(args.config)!r}" if args.config else "on the command line"
    try:
        return ReplayConfig.model_validate(values), report_dir
    except pydantic.ValidationError as error:
        detail = error.errors(include_url=False)[0]
        field = ".".join(str(part) for part in detail.get("loc", ())) or "(whole file)"
        raise OnlineCtrError(
            f"invalid replay setting {field} {source}: {detail.get('msg')}; "
            "`online-ctr replay --help` lists the options"
        ) from None


def read_replay_config_file(path: Path) -> dict[str, Any]:
    """Read a replay configuration file, TOML or JSON by its suffix, into a plain dict."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise OnlineCtrError(f"cannot read replay config {str(path)!r}: {error}") from None
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise OnlineCtrError(
                f"replay config {str(path)!r} must end in .toml or .json to say its format"
            )
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise OnlineCtrError(f"replay config {str(path)!r} is not valid: {error}") from None
    if not isinstance(values, dict):
        raise OnlineCtrError(f"replay config {str(path)!r} must hold a table of settings")
    return values


def _run_replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from shared.replay.report import write_report
    from shared.replay.runner import run_replay
    from shared.replay.summary import format_summary

    config, report_dir = replay_config_from(args)
    if not config.events.exists():
        raise OnlineCtrError(
            f"recorded stream {str(config.events)!r} not found; pass --events PATH, or run "
            "`make replay` from the repository root to use the bundled sample"
        )

    size = config.events.stat().st_size
    passes = 2 if config.what_if_windows else 1
    with tqdm(
        total=size * passes,
        unit="B",
        unit_scale=True,
        desc="replay",
        disable=args.no_progress,
        file=sys.stderr,
    ) as bar:
        done = 0

        def advance(position: int) -> None:
            bar.update(done + position - bar.n)

        result = run_replay(config, on_progress=advance)
        if config.what_if_windows:
            from shared.replay.experiments.windows import run_what_if

            done = size
            bar.set_description(f"window what-if ({len(config.what_if_windows)} windows)")
            result.what_if = run_what_if(config, config.events, on_progress=advance)

    print(format_summary(result))
    index = write_report(result, report_dir)
    print(f"\nreport: {index}")
    return 0


# Import and generate.


def _add_import(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "import",
        help="convert a public click log into the recorded-stream format",
        description="Convert a public click log into the recorded-stream format (JSON Lines).",
    )
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")

    obd = sources.add_parser(
        "obd",
        help="Open Bandit Dataset (ZOZOTOWN), small version",
        description=(
            "Convert the Open Bandit Dataset small version (Saito et al., arXiv:2008.07146) "
            "into a recorded stream. Its clicks share the impression's timestamp."
        ),
    )
    obd.add_argument(
        "--source",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder holding the policy folders random/ and bts/ with their CSV files",
    )
    obd.add_argument("--out", type=Path, required=True, metavar="PATH", help="output .jsonl(.gz)")
    obd.set_defaults(handler=_run_import_obd)

    taobao = sources.add_parser(
        "taobao",
        help="Taobao UserBehavior (user_id,item_id,category_id,behavior,timestamp)",
        description=(
            "Convert Taobao UserBehavior CSV into a recorded stream: each pv is an impression, "
            "and a later buy (or cart, with --label cart) of the same user and item is its click."
        ),
    )
    taobao.add_argument("--source", type=Path, required=True, metavar="CSV", help="input CSV")
    taobao.add_argument(
        "--out", type=Path, required=True, metavar="PATH", help="output .jsonl(.gz)"
    )
    taobao.add_argument(
        "--label",
        action="append",
        choices=("buy", "cart", "fav"),
        default=None,
        help="behaviour that counts as a click; repeat for several (default: buy)",
    )
    taobao.set_defaults(handler=_run_import_taobao)


def _run_import_obd(args: argparse.Namespace) -> int:
    from shared.streams.obd import import_obd

    summary = import_obd(args.source, args.out)
    print(summary)
    return 0


def _run_import_taobao(args: argparse.Namespace) -> int:
    from shared.streams.taobao import import_taobao

    summary = import_taobao(args.source, args.out, label_behaviors=tuple(args.label or ("buy",)))
    print(summary)
    return 0


def _add_generate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate",
        help="write a synthetic stream with known click probabilities",
        description=(
            "Write a seeded synthetic stream whose true click probability is known for every "
            "impression, with configurable click delays and an optional drift."
        ),
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="PATH", help="output .jsonl(.gz)"
    )
    parser.add_argument(
        "--truth",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the truth per impression",
    )
    parser.add_argument("--impressions", type=int, default=50_000, help="number of impressions")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--delay-mean",
        type=_duration,
        default=120.0,
        metavar="DURATION",
        help="mean click delay, exponential distribution (default: 2m)",
    )
    parser.add_argument(
        "--delay-median",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="draw click delays from a log-normal distribution with this median instead, "
        "for a long tail of late clicks; needs --delay-sigma",
    )
    parser.add_argument(
        "--delay-sigma",
        type=float,
        default=None,
        metavar="SIGMA",
        help="standard deviation of the log-normal delay's logarithm, e.g. 2",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=10.0,
        metavar="PER_SECOND",
        help="impressions per second of event time (default: 10)",
    )
    parser.add_argument(
        "--click-rate", type=float, default=0.05, help="base click probability (default: 0.05)"
    )
    parser.add_argument(
        "--drift-at",
        type=float,
        default=None,
        metavar="FRACTION",
        help="switch click behaviour after this fraction of the stream, e.g. 0.5",
    )
    parser.add_argument(
        "--drift-click-rate",
        type=float,
        default=None,
        help="base click probability after the drift (default: half the base rate, unless "
        "--drift-flip is given)",
    )
    parser.add_argument(
        "--drift-flip",
        action="append",
        choices=("item", "category", "price", "segment"),
        default=None,
        help="negate this effect on the click logit after the drift; repeat for several",
    )
    parser.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from shared.streams.generate import (
        Drift,
        ExponentialDelay,
        GeneratorSettings,
        LognormalDelay,
        drift_time_at_fraction,
        write_generated,
    )

    if (args.delay_median is None) != (args.delay_sigma is None):
        raise OnlineCtrError(
            "log-normal click delays need both --delay-median and --delay-sigma; give both, "
            "or neither for exponential delays with --delay-mean"
        )
    delay = (
        ExponentialDelay(mean_seconds=args.delay_mean)
        if args.delay_median is None
        else LognormalDelay(median_seconds=args.delay_median, sigma=args.delay_sigma)
    )
    settings = GeneratorSettings(
        impressions=args.impressions,
        seed=args.seed,
        impressions_per_second=args.rate,
        base_click_rate=args.click_rate,
        delay=delay,
    )
    if args.drift_at is not None:
        flips = frozenset(args.drift_flip or ())
        drift_click_rate = args.drift_click_rate
        if drift_click_rate is None and not flips:
            drift_click_rate = args.click_rate / 2
        drift = Drift(
            at=drift_time_at_fraction(settings, args.drift_at),
            base_click_rate=drift_click_rate,
            flip_effects=flips,
        )
        settings = settings.model_copy(update={"drift": drift})
    summary = write_generated(settings, args.out, args.truth)
    print(summary)
    return 0


def _add_models(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="list the models in the registry")
    parser.set_defaults(handler=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from shared.learn.models import DEFAULT_MODEL, REGISTRY

    for name, spec in sorted(REGISTRY.items()):
        marker = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{marker}: {spec.description}")
    return 0


# Snapshots.


def _add_snapshot(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("snapshot", help="inspect and export model snapshots")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export",
        help="verify a snapshot in the Redis registry and write it to a file",
        description=(
            "Fetch a model snapshot from the Redis registry, verify its signature, and write "
            "the signed blob to a file, for example to replay from it. Uses ONLINE_CTR_REDIS_URL, "
            "ONLINE_CTR_REGISTRY_NAMESPACE and ONLINE_CTR_SIGNING_KEYS."
        ),
    )
    export.add_argument("--slot", default="champion", help="model slot name (default: champion)")
    export.add_argument("--version", type=int, default=None, help="version (default: newest)")
    export.add_argument("--out", type=Path, required=True, metavar="PATH", help="output file")
    export.set_defaults(handler=_run_snapshot_export)


def _run_snapshot_export(args: argparse.Namespace) -> int:
    from services.trainer.main import signing_keys
    from services.trainer.settings import TrainerSettings
    from shared.registry import ModelRegistry
    from shared.service import make_redis
    from shared.settings import load_settings
    from shared.snapshots import verify_snapshot

    settings = load_settings(TrainerSettings)
    keys = signing_keys(settings)
    registry = ModelRegistry(make_redis(settings), keys, namespace=settings.registry_namespace)
    blob = registry.fetch(args.slot, args.version)
    if blob is None:
        raise OnlineCtrError(
            f"no snapshot of {args.slot!r} (version {args.version or 'newest'}) in namespace "
            f"{settings.registry_namespace!r}; check --slot and ONLINE_CTR_REGISTRY_NAMESPACE"
        )
    metadata, _ = verify_snapshot(blob, keys)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(blob)
    print(
        f"wrote {args.out}: {metadata.model_name} version {metadata.version}, {len(blob):,} bytes"
    )
    return 0


# Live pipeline.


def _add_produce(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "produce",
        help="publish a recorded stream into the impressions and clicks topics",
        description=(
            "Publish a recorded stream into Kafka in event-time order, keyed by impression_id. "
            "Connection settings come from ONLINE_CTR_* variables (see `online-ctr settings`)."
        ),
    )
    parser.add_argument(
        "--events", type=Path, required=True, metavar="PATH", help="recorded stream"
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=None,
        metavar="X",
        help="pace at X times real time, e.g. 60 plays an hour per minute (default: unpaced)",
    )
    parser.add_argument(
        "--max-skew",
        type=_duration,
        default=30.0,
        metavar="DURATION",
        help="event-time skew allowed between the two topics before waiting for acknowledgements; "
        "keep it below the joiner's allowed lateness (default: 30s)",
    )
    parser.set_defaults(handler=_run_produce)


def _run_produce(args: argparse.Namespace) -> int:
    from shared.kafka import make_producer, wait_for_kafka
    from shared.settings import ServiceSettings, load_settings
    from shared.streams.produce import produce_events
    from shared.streams.recorded import read_events

    settings = load_settings(ServiceSettings)
    wait_for_kafka(settings)
    producer = make_producer(settings)
    try:
        summary = produce_events(
            producer,
            read_events(args.events),
            settings.topic_impressions,
            settings.topic_clicks,
            speed=args.speed,
            max_skew_seconds=args.max_skew,
        )
    finally:
        producer.close()
    print(summary)
    return 0


def _add_topics(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("topics", help="manage the pipeline's Kafka topics")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="create the impressions, clicks, examples and dead-letter topics",
        description="Create every topic the pipeline uses; existing topics are left alone.",
    )
    create.add_argument(
        "--partitions", type=int, default=4, help="partitions of the data topics (default: 4)"
    )
    create.add_argument(
        "--replication-factor", type=int, default=1, help="replicas per partition (default: 1)"
    )
    create.set_defaults(handler=_run_topics_create)


def _run_topics_create(args: argparse.Namespace) -> int:
    from kafka import KafkaConsumer

    from shared.kafka import (
        check_copartitioned,
        client_config,
        create_topics,
        make_admin,
        pipeline_topics,
        wait_for_kafka,
    )
    from shared.settings import ServiceSettings, load_settings

    settings = load_settings(ServiceSettings)
    wait_for_kafka(settings)
    admin = make_admin(settings)
    try:
        created = create_topics(
            admin, pipeline_topics(settings, args.partitions, args.replication_factor)
        )
    finally:
        admin.close()
    consumer = KafkaConsumer(**client_config(settings))
    try:
        check_copartitioned(consumer, settings.topic_impressions, settings.topic_clicks)
    finally:
        consumer.close()
    print(f"created: {', '.join(created) or 'nothing, all topics exist'}")
    return 0


def _add_service(
    commands: argparse._SubParsersAction,
    name: str,
    help_text: str,
    module: str,
    settings_class: str,
) -> None:
    parser = commands.add_parser(
        name,
        help=help_text,
        description=f"{help_text[0].upper()}{help_text[1:]}. Settings come from ONLINE_CTR_* "
        f"environment variables; `online-ctr settings {name}` lists them.",
    )
    parser.set_defaults(handler=_run_service, module=module, settings_class=settings_class)


def _run_service(args: argparse.Namespace) -> int:
    import importlib

    from shared.settings import load_settings

    settings_module, class_name = args.settings_class.rsplit(":", 1)
    settings_class = getattr(importlib.import_module(settings_module), class_name)
    settings = load_settings(settings_class)
    return importlib.import_module(args.module).run(settings)


SERVICES = {
    "joiner": (
        "join impressions and clicks from Kafka into labelled examples",
        "services.joiner.main",
        "services.joiner.settings:JoinerSettings",
    ),
    "trainer": (
        "learn from labelled examples and publish signed model snapshots",
        "services.trainer.main",
        "services.trainer.settings:TrainerSettings",
    ),
    "scorer": (
        "serve the newest model over HTTP",
        "services.scorer.main",
        "services.scorer.settings:ScorerSettings",
    ),
    "simulator": (
        "send closed-loop demo traffic through the scorer and click later",
        "services.simulator.main",
        "services.simulator.settings:SimulatorSettings",
    ),
}


def _add_services(commands: argparse._SubParsersAction) -> None:
    for name, (help_text, module, settings_class) in SERVICES.items():
        _add_service(commands, name, help_text, module, settings_class)


def _add_demo_local(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo-local",
        help="run the whole demo as local processes, for machines without Docker",
        description=(
            "Start Tansu, redis-server and Prometheus (and Grafana when it is installed) on "
            "loopback ports, then the joiner, trainer, scorer and traffic simulator, and print "
            "where to look. Ctrl-C stops everything. Needs redis-server and prometheus on PATH "
            "(`make install-services`)."
        ),
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=30.0,
        metavar="PER_SECOND",
        help="impressions per second the simulator sends (default: 30)",
    )
    parser.add_argument(
        "--drift-after",
        type=_duration,
        default=300.0,
        metavar="DURATION",
        help="when the simulated population changes behaviour, e.g. 5m (default: 5m)",
    )
    parser.add_argument(
        "--no-drift", action="store_true", help="keep the population's behaviour unchanged"
    )
    parser.add_argument(
        "--duration",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="stop by itself after this long, e.g. 10m (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory for logs and data (default: a new temporary directory)",
    )
    parser.set_defaults(handler=_run_demo_local)


def _run_demo_local(args: argparse.Namespace) -> int:
    from shared.demo_local import DemoOptions, run_demo

    if args.rate <= 0:
        raise OnlineCtrError(f"invalid --rate {args.rate:g}: it must be more than 0")
    options = DemoOptions(
        impressions_per_second=args.rate,
        drift_after_seconds=None if args.no_drift else args.drift_after,
        duration_seconds=args.duration,
        directory=args.dir,
    )
    return run_demo(options)


def _add_settings(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "settings",
        help="list a service's ONLINE_CTR_* settings with defaults",
        description="List the environment variables a service reads, with defaults.",
    )
    parser.add_argument("service", choices=sorted(SERVICES), help="service name")
    parser.set_defaults(handler=_run_settings)


def _run_settings(args: argparse.Namespace) -> int:
    import importlib

    from shared.settings import describe_settings

    settings_module, class_name = SERVICES[args.service][2].rsplit(":", 1)
    print(describe_settings(getattr(importlib.import_module(settings_module), class_name)))
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_replay,
    _add_import,
    _add_generate,
    _add_models,
    _add_snapshot,
    _add_produce,
    _add_topics,
    _add_services,
    _add_demo_local,
    _add_settings,
]


def build_parser() -> argparse.ArgumentParser:
    """Build the ``online-ctr`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="online-ctr",
        description=(
            "Learn click-through-rate models continuously from impression and click streams."
        ),
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default=None, help="log line format"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return args.handler(args)
    except (OnlineCtrError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    except pydantic.ValidationError as error:
        detail = error.errors(include_url=False)[0]
        field = ".".join(str(part) for part in detail.get("loc", ()))
        logger.error("invalid option %s: %s", field, detail.get("msg"))
        return 2
    except KeyboardInterrupt:
        logger.warning("Interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``online-ctr replay`` options and configuration files: one file reproduces a run."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from shared.cli import build_parser, main, replay_config_from
from shared.errors import OnlineCtrError
from shared.replay.report import CONFIG_FILE, METRICS_FILE
from shared.streams.generate import read_truth
from shared.streams.recorded import write_events
from tests.shared.replay.test_report import synthetic_events


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "stream.jsonl.gz"
    write_events(path, synthetic_events(impressions=300))
    return path


def config_from(argv: list[str]):
    return replay_config_from(build_parser().parse_args(["replay", *argv]))


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001

    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0, name
        assert "usage: online-ctr" in capsys.readouterr().out, name


def test_defaults_without_file() -> None:
    config, report_dir = config_from([])

    assert config.events == Path("data/samples/obd-small.jsonl.gz")
    assert config.model == "ctr"
    assert config.join.window_seconds == 600.0
    assert config.what_if_windows == []
    assert report_dir == Path("reports/replay")


def test_command_line_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "replay.toml"
    path.write_text(
        'events = "stream.jsonl"\n'
        'model = "logreg"\n'
        'compare = ["prior"]\n'
        'targets = [{metric = "auc", operator = ">=", value = 0.7}]\n'
        'report = "out"\n'
        "[join]\n"
        "window_seconds = 120\n"
        "allowed_lateness_seconds = 5\n",
        encoding="utf-8",
    )

    config, report_dir = config_from(
        ["--config", str(path), "--model", "ctr", "--lateness", "30s", "--target", "auc>=0.6"]
    )

    assert config.events == Path("stream.jsonl")
    assert config.model == "ctr"
    assert config.compare == ["prior"]
    assert [str(target) for target in config.targets] == ["auc >= 0.6"]
    assert config.join.window_seconds == 120
    assert config.join.allowed_lateness_seconds == 30
    assert report_dir == Path("out")


def test_several_windows_become_a_what_if() -> None:
    config, _ = config_from(["--window", "1m", "--window", "10m", "--window", "1h"])

    assert config.join.window_seconds == 60
    assert config.what_if_windows == [60, 600, 3600]


def test_holdout_time_needs_a_zone(capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = config_from(["--holdout-from", "2019-11-28T00:00:00Z"])
    assert config.holdout_from == dt.datetime(2019, 11, 28, tzinfo=dt.UTC)

    with pytest.raises(SystemExit):
        config_from(["--holdout-from", "2019-11-28T00:00:00"])
    assert "has no time zone; add one" in capsys.readouterr().err


def test_invalid_target_shows_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        config_from(["--target", "ne<0.9"])

    assert "write METRIC<=VALUE or METRIC>=VALUE" in capsys.readouterr().err


def test_unknown_setting_names_file(tmp_path: Path) -> None:
    path = tmp_path / "replay.json"
    path.write_text(json.dumps({"modle": "ctr"}), encoding="utf-8")

    with pytest.raises(OnlineCtrError, match=r"invalid replay setting modle in '.*replay.json'"):
        config_from(["--config", str(path)])


def test_config_file_needs_known_suffix(tmp_path: Path) -> None:
    path = tmp_path / "replay.yaml"
    path.write_text("model: ctr\n", encoding="utf-8")

    with pytest.raises(OnlineCtrError, match="must end in .toml or .json"):
        config_from(["--config", str(path)])


def test_repeated_compared_model_rejected() -> None:
    with pytest.raises(OnlineCtrError, match="listed twice"):
        config_from(["--model", "ctr", "--compare", "ctr"])


def test_written_config_reproduces_run(stream: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    argv = ["--events", str(stream), "--window", "2m", "--model", "logreg", "--no-progress"]
    assert main(["replay", *argv, "--report", str(first), "--segment-by", "ad"]) == 0

    second = tmp_path / "second"
    config_path = first / CONFIG_FILE
    assert main(["replay", "--config", str(config_path), "--report", str(second)]) == 0

    written = json.loads(config_path.read_text(encoding="utf-8"))
    assert written["model"] == "logreg"
    assert written["join"]["window_seconds"] == 120
    first_metrics = json.loads((first / METRICS_FILE).read_text(encoding="utf-8"))
    second_metrics = json.loads((second / METRICS_FILE).read_text(encoding="utf-8"))
    assert first_metrics == second_metrics


def test_missing_stream_exits_with_hint(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    status = main(["replay", "--events", str(tmp_path / "none.jsonl"), "--no-progress"])

    assert status == 2
    assert "not found; pass --events PATH" in capfd.readouterr().err


def test_retention_option_reaches_join() -> None:
    config, _ = config_from(["--window", "10m", "--retention", "1d"])

    assert config.join.closed_retention_seconds == 86_400


def test_generate_lognormal_delays_and_flip(tmp_path: Path) -> None:
    argv = ["generate", "--out", str(tmp_path / "s.jsonl"), "--truth", str(tmp_path / "t.jsonl")]
    argv += ["--impressions", "3000", "--delay-median", "10m", "--delay-sigma", "2"]
    argv += ["--drift-at", "0.5", "--drift-flip", "item"]

    assert main(argv) == 0

    truth = read_truth(tmp_path / "t.jsonl")
    delays = sorted(r.click_delay_seconds for r in truth if r.click_delay_seconds is not None)
    median = delays[len(delays) // 2]
    # With a median of 10 minutes and sigma 2, the 90th percentile is about 130 minutes.
    assert 300 < median < 1200
    assert delays[-len(delays) // 10] > 3600


def test_generate_median_needs_sigma(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    status = main(["generate", "--out", str(tmp_path / "s.jsonl"), "--delay-median", "10m"])

    assert status == 2
    assert "need both --delay-median and --delay-sigma" in capfd.readouterr().err

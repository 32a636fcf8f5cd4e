"""Success targets: met, missed and not measurable verdicts in the summary, report and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.events import Click, Impression
from shared.replay.experiments import verdicts
from shared.replay.report import METRICS_FILE, write_report
from shared.replay.runner import Replay, ReplayConfig, ReplayResult
from shared.replay.summary import SUMMARY_WIDTH, format_summary
from shared.replay.targets import Target
from shared.streams.generate import GeneratorSettings, generate


def generated_events(clicks: bool = True) -> list[Impression | Click]:
    events, _ = generate(GeneratorSettings(seed=4, impressions=2_000, base_click_rate=0.1))
    return [event for event in events if clicks or event.type == "impression"]


def replay(targets: list[str], clicks: bool = True, **settings) -> ReplayResult:
    config = ReplayConfig(
        events=Path("unused"), targets=[Target.parse(text) for text in targets], **settings
    )
    return Replay(config).replay(generated_events(clicks))


@pytest.fixture(scope="module")
def result() -> ReplayResult:
    return replay(["normalized_entropy<=2", "normalized_entropy<=0.5"], compare=["prior"])


def test_target_met_and_missed(result: ReplayResult) -> None:
    served = result.evaluation.served["model"].report()

    main = verdicts.judged_arms(result)[0]

    assert main.arm == "ctr"
    assert [verdict.measured for verdict in main.verdicts] == [served.normalized_entropy] * 2
    assert 0.5 < served.normalized_entropy <= 2
    assert [verdict.met for verdict in main.verdicts] == [True, False]
    assert (
        main.verdicts[0].describe()
        == f"met: normalized_entropy {served.normalized_entropy:.4f} <= 2"
    )
    assert main.verdicts[1].describe().startswith("missed: normalized_entropy")


def test_every_compared_model_judged(result: ReplayResult) -> None:
    judged = verdicts.judged_arms(result)

    assert [arm.arm for arm in judged] == ["ctr", "prior"]
    prior = result.arm("prior").learner.evaluation.served["model"].report()
    assert judged[1].verdicts[0].measured == prior.normalized_entropy


def test_overall_verdict_names_missed_target(result: ReplayResult) -> None:
    measured = result.evaluation.served["model"].report().normalized_entropy

    verdict = verdicts.overall_verdict(result)

    assert verdict == (
        "ctr missed 1 of 2 success targets on all served examples: "
        f"normalized_entropy {measured:.4f}, target <= 0.5"
    )
    assert verdicts.overall_outcome(result) is False


def test_summary_lists_verdicts(result: ReplayResult) -> None:
    summary = format_summary(result)

    assert "Success targets, served scores on all served examples" in summary
    assert "  ctr    met: normalized_entropy" in summary
    assert "  ctr    missed: normalized_entropy" in summary
    assert "  prior  " in summary
    assert summary.count("ctr missed 1 of 2 success targets") == 1
    assert "Targets: ctr missed 1 of 2 success targets" in summary
    for line in summary.splitlines():
        assert len(line) <= SUMMARY_WIDTH, line


def test_report_shows_targets_first(result: ReplayResult, tmp_path: Path) -> None:
    html_text = write_report(result, tmp_path).read_text(encoding="utf-8")

    # The top verdict paragraph carries the target verdict, before any other section.
    assert html_text.index('<p class="verdict worse">ctr missed 1 of 2') < html_text.index(
        "<h2>Plots</h2>"
    )
    assert "<h2>Success targets</h2>" in html_text
    assert "<td>normalized_entropy &lt;= 0.5</td>" in html_text
    assert "<td>missed</td>" in html_text
    metrics = json.loads((tmp_path / METRICS_FILE).read_text(encoding="utf-8"))
    document = metrics["experiments"]["targets"]
    assert document["all_met"] is False
    assert document["evaluated_from"] is None
    assert [arm["arm"] for arm in document["arms"]] == ["ctr", "prior"]
    assert [target["met"] for target in document["arms"][0]["targets"]] == [True, False]


def test_all_targets_met() -> None:
    result = replay(["normalized_entropy<=5", "log_loss<=5"])

    assert verdicts.overall_outcome(result) is True
    assert (
        verdicts.overall_verdict(result) == "ctr met all 2 success targets on all served examples"
    )


def test_calibration_error_target() -> None:
    # Most clicks of this 200-second stream come after every impression was served, so the
    # served scores under-predict.
    result = replay(["calibration_error<=0.95", "calibration_error<=0.1"])
    calibration = result.evaluation.served["model"].report().calibration

    main = verdicts.judged_arms(result)[0]

    assert main.verdicts[0].measured == pytest.approx(abs(calibration - 1.0))
    assert 0.1 < main.verdicts[0].measured <= 0.95
    assert main.verdicts[0].met is True
    assert main.verdicts[1].met is False


def test_auc_without_clicks_not_measurable(tmp_path: Path) -> None:
    result = replay(["auc>=0.7"], clicks=False)

    verdict = verdicts.judged_arms(result)[0].verdicts[0]

    assert verdict.measured is None
    assert verdict.met is None
    assert verdict.describe().startswith("not measurable")
    assert verdicts.overall_outcome(result) is None
    assert verdicts.overall_verdict(result) == (
        "ctr met 0 of 1 success target on all served examples; not measurable: auc"
    )
    html_text = write_report(result, tmp_path).read_text(encoding="utf-8")
    assert '<p class="verdict none">ctr met 0 of 1' in html_text
    assert "<td>not measurable</td>" in html_text


def test_missed_and_not_measurable() -> None:
    result = replay(["auc>=0.7", "log_loss<=0.0001"], clicks=False)
    log_loss = result.evaluation.served["model"].report().log_loss

    verdict = verdicts.overall_verdict(result)

    assert verdict == (
        "ctr missed 1 of 2 success targets on all served examples: "
        f"log_loss {log_loss:.4f}, target <= 0.0001; not measurable: auc"
    )
    assert verdicts.overall_outcome(result) is False


def test_freshness_copies_not_judged() -> None:
    result = replay(["auc>=0.5"], freshness=True, retrain_every_seconds=60.0)

    judged = verdicts.judged_arms(result)

    assert len(result.arms) == 3
    assert [arm.arm for arm in judged] == ["ctr"]


def test_no_targets_no_section(tmp_path: Path) -> None:
    result = Replay(ReplayConfig(events=Path("unused"))).replay(generated_events()[:200])

    assert verdicts.summary_lines(result) == []
    assert verdicts.document(result) is None
    assert "Targets:" not in format_summary(result)
    html_text = write_report(result, tmp_path).read_text(encoding="utf-8")
    assert "Success targets" not in html_text

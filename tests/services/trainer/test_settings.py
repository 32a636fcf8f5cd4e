"""Trainer settings: delayed feedback and negative downsampling."""

from __future__ import annotations

import pytest

from services.joiner.settings import JoinerSettings
from services.trainer.settings import TrainerSettings


def test_fake_negatives_reject_downsampling() -> None:
    with pytest.raises(ValueError, match="cannot be combined with negative downsampling"):
        TrainerSettings(delayed_feedback="fake_negative", negative_sampling_rate=0.5)


def test_fake_negatives_default_off() -> None:
    assert TrainerSettings().delayed_feedback == "none"
    assert JoinerSettings().join_settings().emit_served is False


def test_joiner_passes_served_setting() -> None:
    assert JoinerSettings(emit_served=True).join_settings().emit_served is True


def test_select_rejects_weighted_negatives() -> None:
    with pytest.raises(ValueError, match="cannot take weighted negatives"):
        TrainerSettings(
            model="select", negative_sampling_rate=0.5, negative_sampling_correction="weight"
        )

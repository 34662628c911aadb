"""Which calibrated thresholds a verifier judges a payload with: per model, per profile pair."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from protocol.rollouts import ComputeProfile
from verification.checks import (
    THRESHOLDS_FILE,
    UncalibratedPair,
    load_thresholds,
    model_key,
    thresholds_for,
    thresholds_path,
)

CPU = {"backend": "torch", "device": "cpu"}


def test_a_model_is_keyed_by_its_architecture_and_size() -> None:
    smollm2 = types.SimpleNamespace(model_type="llama", num_hidden_layers=30, hidden_size=576,
                                    vocab_size=49152)  # fmt: skip
    assert model_key(smollm2) == "llama-30x576-v49152"


def test_a_model_without_its_own_calibration_gets_the_default(tmp_path: Path) -> None:
    assert thresholds_path(None) == THRESHOLDS_FILE
    assert thresholds_path("llama-1x1-v1") == THRESHOLDS_FILE


def test_a_model_with_its_own_file_is_judged_by_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import verification.checks as checks

    own = tmp_path / "llama-3x8-v16.toml"
    own.write_text("[fp32]\nmax_margin = 0.5\nmax_logprob_diff = 0.25\nmax_drift = 0.125\n")
    monkeypatch.setattr(checks, "THRESHOLDS_DIR", tmp_path)
    fp32 = ComputeProfile(dtype="fp32", **CPU)
    mine = thresholds_for(fp32, fp32, model="llama-3x8-v16")
    assert (mine.max_margin, mine.max_logprob_diff, mine.max_drift) == (0.5, 0.25, 0.125)
    assert thresholds_for(fp32, fp32, model="other") == load_thresholds("fp32")
    with pytest.raises(UncalibratedPair):  # its file has no bf16: not judged with another's
        thresholds_for(ComputeProfile(dtype="bf16", **CPU), ComputeProfile(dtype="bf16", **CPU),
                       model="llama-3x8-v16")  # fmt: skip

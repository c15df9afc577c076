"""The chaos test, short: worker processes on PostgreSQL, one SIGKILLed mid-run and restarted.

Optuna's heartbeat finds the dead segment and its retry resumes the lineage from the last
checkpoint; nothing runs twice, nothing is lost, and every step of every curve has its checkpoint.
bench/chaos.py runs the long version (more kills, Optuna's heartbeat and our lease).
"""

from __future__ import annotations

import pytest

from conftest import POSTGRES_URL, _postgres_storage


@pytest.mark.postgres
def test_killed_workers_lose_nothing_and_their_lineages_resume(tmp_path) -> None:
    _postgres_storage()  # skips when no PostgreSQL server answers (never on CI)
    from bench import chaos

    (result,) = chaos.main([
        "--storage", POSTGRES_URL, "--mode", "heartbeat", "--budget", "18", "--workers", "3", "--kills", "1",
        "--kill-interval", "0.05", "0.15", "--time-limit", "300", "--out", str(tmp_path),
    ])
    assert result["kills"] >= 1 and result["crashed_segments"] >= 1
    assert result["double_thaws"] == 0
    assert result["lineages_lost"] == 0, result["lost_ids"]
    assert result["steps_with_missing_checkpoint"] == 0
    assert result["crashed_lineages_resumed"] >= 1
    assert result["compute_spent_steps"] >= result["useful_compute_steps"] > 0

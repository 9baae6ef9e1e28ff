"""Remaining time and bar fraction of long tasks (`cryowae.progress.EtaClock`), in
`--steps` and `--minutes` modes, and as a training run reports them."""

from __future__ import annotations

import numpy as np
import pytest

from cryowae.progress import EtaClock, ProgressReporter, format_duration


def test_steps_mode_rate_leaves_out_warm_up_and_resumed_steps():
    clock = EtaClock(100, now=0.0)
    assert clock.remaining(0.0) is None  # nothing measured yet
    clock.record(1, now=10.0)  # first step: 10 s of warm-up
    assert clock.remaining(10.0) == pytest.approx(99 * 10.0)
    clock.record(2, now=11.0)
    clock.record(3, now=12.0)
    assert clock.rate() == pytest.approx(1.0)  # the warm-up no longer counts
    assert clock.remaining(12.0) == pytest.approx(97.0)
    assert clock.remaining(12.5) == pytest.approx(96.5)  # counts down between steps
    assert clock.fraction(12.0) == pytest.approx(0.03) and not clock.time_bound(12.0)

    # resumed at step 50: the 50 steps of the earlier run are not speed
    resumed = EtaClock(100, done=50, now=0.0)
    resumed.record(51, now=2.0)
    resumed.record(52, now=4.0)
    assert resumed.rate() == pytest.approx(0.5)
    assert resumed.remaining(4.0) == pytest.approx(96.0)
    assert resumed.fraction(4.0) == pytest.approx(0.52)


def test_rate_follows_the_recent_window():
    clock = EtaClock(1000, now=0.0, window_s=30.0)
    t, done = 0.0, 0
    for _ in range(60):  # 1 step/s for a minute
        t, done = t + 1.0, done + 1
        clock.record(done, now=t)
    for _ in range(40):  # then 1 step every 2 s
        t, done = t + 2.0, done + 1
        clock.record(done, now=t)
    assert clock.rate() == pytest.approx(0.5)
    assert clock.remaining(t) == pytest.approx((1000 - 100) * 2.0)


def test_minutes_mode_counts_down_the_budget_not_a_step_guess():
    """`train --minutes 25` (the step total is the CLI's 10**9): the bug drew an ETA of
    hundreds of thousands of hours; the remaining time is what is left of the budget."""
    clock = EtaClock(10**9, now=0.0)
    clock.set_budget(25 * 60.0, spent_s=300.0)  # resumed after 5 of the 25 minutes
    assert clock.remaining(0.0) == pytest.approx(1200.0)
    for i in range(1, 4):
        clock.record(i, now=float(i))
    assert clock.time_bound(3.0)
    assert clock.remaining(3.0) == pytest.approx(1197.0)
    assert clock.fraction(3.0) == pytest.approx(303.0 / 1500.0)
    assert clock.remaining(5000.0) == 0.0 and clock.fraction(5000.0) == 1.0
    assert format_duration(clock.remaining(3.0)) == "19:57"

    # --steps 10 --minutes 25: the steps end first, so they decide
    both = EtaClock(10, now=0.0)
    both.set_budget(1500.0)
    for i in range(1, 4):
        both.record(i, now=float(i))
    assert not both.time_bound(3.0)
    assert both.remaining(3.0) == pytest.approx(7.0)
    assert both.fraction(3.0) == pytest.approx(0.3)


def test_format_duration():
    assert format_duration(None) == "-:--"
    assert format_duration(59.6) == "1:00"
    assert format_duration(3725.0) == "1:02:05"


def test_rich_count_hides_the_step_total_under_a_budget():
    from cryowae.cli.progress import count_text

    rep = ProgressReporter()
    rep.start(10**9, "training")
    rep.set_time_budget(60.0)
    rep.advance(1)
    assert count_text(rep) == "1"
    rep.start(20, "training", done=4)
    rep.advance(1)
    assert count_text(rep) == "5/20"


def test_rich_remaining_column_shows_the_budget():
    from cryowae.cli.progress import RichProgress, _Remaining

    rep = RichProgress(transient=True)
    rep.start(10**9, "training")
    rep.set_time_budget(25 * 60.0)
    rep.advance(1)
    text = _Remaining(rep).render(None).plain
    rep.finish()
    assert text in ("eta 25:00", "eta 24:59"), text


def test_training_with_a_budget_reports_the_budget(tmp_path):
    """A real run under --minutes semantics (0.5 min, step total 10**9), stopped after 4
    steps: every remaining time it reported was the budget left, not a step guess."""
    from cryowae.io import write_mrc
    from cryowae.progress import Cancelled
    from cryowae.training.config import TrainConfig
    from cryowae.training.data import load_sources
    from cryowae.training.loop import Trainer

    seen: list[tuple[float, float, bool]] = []

    class Recorder(ProgressReporter):
        def advance(self, n: int = 1, **info) -> None:
            super().advance(n, **info)
            seen.append((self.eta(), self.clock.budget_left_s(), self.clock.time_bound()))
            if self.done >= 4:
                self.cancel()

    rng = np.random.default_rng(0)
    write_mrc(tmp_path / "t.mrc", rng.normal(size=(24, 32, 32)).astype(np.float32), 10.0)
    cfg = TrainConfig.from_dict({
        "patch_size": 16, "channels": 4, "depth": 2, "latent_dim": 8, "batch_size": 2,
        "bank_size": 64, "log_every": 50, "checkpoint_every": 1000, "steps": 10**9,
        "minutes": 0.5, "check_prior_preference": False, "family": False})
    rec = Recorder()
    with pytest.raises(Cancelled, match="cancelled at step 4"):
        Trainer(load_sources([tmp_path / "t.mrc"], min_size=16), cfg, tmp_path / "run",
                progress=rec).run()
    assert rec.clock.budget_s == pytest.approx(30.0)
    assert len(seen) == 4
    for eta, left, bound in seen:
        assert bound and eta == pytest.approx(left, abs=0.05) and 0.0 < eta < 30.0
    assert [e for e, _, _ in seen] == sorted((e for e, _, _ in seen), reverse=True)


def test_budget_horizon_counts_the_steps_that_fit():
    from cryowae.training.schedule import budget_horizon

    assert budget_horizon(10, 10**9, 30.0, 2.0) == 25
    assert budget_horizon(10, 20, 30.0, 2.0) == 20  # --steps ends first
    assert budget_horizon(10, 10**9, -1.0, 2.0) == 10  # the budget is spent


@pytest.mark.slow
def test_budget_run_ends_its_learning_rate_schedule_with_the_budget(tmp_path):
    """A 0.2-minute run (step total 10**9): the LR's cosine follows the budget, re-timed
    every step, so it is still near its middle half-way and at its floor (0.1 lr) at the
    end; one estimate from the first steps (the old rule, where the first step's warm-up
    counts) often ended the cosine long before the budget."""
    import csv

    from cryowae.io import write_mrc
    from cryowae.training.config import TrainConfig
    from cryowae.training.data import load_sources
    from cryowae.training.loop import Trainer

    rng = np.random.default_rng(0)
    write_mrc(tmp_path / "t.mrc", rng.normal(size=(24, 32, 32)).astype(np.float32), 10.0)
    cfg = TrainConfig.from_dict({
        "patch_size": 16, "channels": 4, "depth": 2, "latent_dim": 8, "batch_size": 2,
        "bank_size": 64, "log_every": 1, "checkpoint_every": 10**6, "steps": 10**9,
        "minutes": 0.2, "lr": 1e-3, "check_prior_preference": False, "family": False})
    Trainer(load_sources([tmp_path / "t.mrc"], min_size=16), cfg, tmp_path / "run").run()
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["lr"]]
    lrs = [float(r["lr"]) for r in rows]
    assert len(lrs) >= 24, len(lrs)  # enough steps for the schedule to mean something
    past_warmup = lrs[10:]
    mid = past_warmup[len(past_warmup) // 2]
    assert 0.3e-3 < mid < 0.85e-3, mid  # cosine middle: 0.55 lr
    assert lrs[-1] < 0.15e-3, lrs[-1]  # at the floor when the budget ends
    # ... and not long before: the cosine itself is within 1% of the floor in the last
    # 2% of its steps (the last 4 of 190 on an idle machine), 5.5% above it at 95%
    assert min(lrs[10:int(0.95 * len(lrs))]) > 0.1e-3 * 1.01

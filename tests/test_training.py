"""End-to-end training with real processes: data parallelism and resume are exact."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_data_parallel_matches_single_process(train, tmp_path):
    single = train(name="single").losses()
    double_run = train(nproc=2, name="double")
    assert "tp 1 x pp 1 x dp 2" in double_run.output
    double = double_run.losses()
    assert sorted(single) == list(range(1, 11)) and sorted(double) == list(range(1, 11))
    print("max |loss(dp=1) - loss(dp=2)|:", max(abs(single[s] - double[s]) for s in single))
    for step in single:
        assert abs(single[step] - double[step]) <= 1e-5, (step, single[step], double[step])
    assert single[10] < single[1]  # it learns


def test_resume_is_exact(train, tmp_path):
    ckpt = tmp_path / "ckpt"
    straight = train("training.train_steps=20", name="straight").losses()
    first = train(f"checkpoint.save_dir={ckpt}", name="first").losses()
    second = train("training.train_steps=20", f"checkpoint.save_dir={ckpt}", name="second")
    resumed = {**first, **second.losses()}
    assert "steps 10->20" in second.output
    assert sorted(resumed) == list(range(1, 21))
    print("max |loss(straight) - loss(resumed)|:", max(abs(straight[s] - resumed[s]) for s in straight))
    for step in straight:
        assert abs(straight[step] - resumed[step]) <= 1e-6, (step, straight[step], resumed[step])

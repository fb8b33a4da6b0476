import numpy as np
import pytest
from edgepack.runtime.errors import UsageError
from edgepack.runtime.sampling import Sampler, SamplingConfig

LOGITS = np.array([0.1, 3.0, 2.9, -1.0, 0.5], dtype=np.float32)


def test_greedy_is_argmax():
    assert Sampler(SamplingConfig())(LOGITS) == 1


def test_top_k_one_equals_greedy():
    sampler = Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=0))
    assert {sampler(LOGITS) for _ in range(50)} == {1}


def test_top_k_restricts_to_k_best():
    sampler = Sampler(SamplingConfig(temperature=5.0, top_k=2, seed=0))
    assert {sampler(LOGITS) for _ in range(300)} == {1, 2}


def test_top_p_keeps_smallest_nucleus():
    # p(1) ~ 0.45, p(2) ~ 0.41 at temperature 1: top_p 0.5 needs both, 0.3 needs only the first.
    assert {Sampler(SamplingConfig(temperature=1.0, top_p=0.3, seed=1))(LOGITS) for _ in range(100)} == {1}
    sampler = Sampler(SamplingConfig(temperature=1.0, top_p=0.5, seed=1))
    assert {sampler(LOGITS) for _ in range(300)} == {1, 2}


def test_seed_reproduces_and_differs():
    def draw(seed):
        s = Sampler(SamplingConfig(temperature=2.0, seed=seed))
        return [s(LOGITS) for _ in range(40)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_sampling_follows_distribution():
    s = Sampler(SamplingConfig(temperature=1.0, seed=3))
    counts = np.bincount([s(LOGITS) for _ in range(4000)], minlength=5) / 4000
    probs = np.exp(LOGITS - LOGITS.max())
    probs /= probs.sum()
    assert np.abs(counts - probs).max() < 0.03


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_settings_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        SamplingConfig(**kwargs)

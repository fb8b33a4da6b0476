import pytest
from edgepack.toolchain.ressvd import ResSVDConfig, bfloat16, compress_, tune


@pytest.mark.parametrize("fast", [True, False])
def test_tune_uses_bfloat16_only_where_the_cpu_is_faster_with_it(monkeypatch, capsys, fast):
    """Without hardware bfloat16 torch emulates it (63x slower than float32 on an AVX2 EPYC): the tune must then
    run in float32, and say so."""
    import tiny

    seen = []
    real = tune._step_loss

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(bfloat16, "fast", lambda: fast)
    monkeypatch.setattr(tune, "_step_loss", spy)
    windows = [list(range(i, i + 32)) for i in range(0, 256, 32)]
    report = compress_(tiny.make_model(seed=5, layers=4), ResSVDConfig(ratio=0.3, layers=2, tune_steps=2), windows)
    assert len(report.tune_loss) == 2 and seen and set(seen) == {fast}
    assert ("runs in float32" in capsys.readouterr().err) is not fast


def test_fast_is_a_cached_measurement():
    assert bfloat16.fast() is bfloat16.fast() and isinstance(bfloat16.fast(), bool)

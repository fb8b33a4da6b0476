"""LFM2's convolution state in the fused decoder: one buffer per convolution layer, bound as its past and present,
carried across chunked prefills and steps; a cache that must go back to an earlier position starts over instead."""

import numpy as np
import pytest
from edgepack.runtime import load
from edgepack.runtime.generation import reuse_prefix

PROMPT = [5, 17, 33, 101, 7, 250, 3, 99, 12, 44, 61, 8, 200, 150, 31, 77]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import tiny_archs
    from edgepack.toolchain.build import BuildConfig, build

    root = tmp_path_factory.mktemp("lfm2")
    src = tiny_archs.save("lfm2", root / "src")
    build(BuildConfig(model=str(src), context=96), root / "pkg")
    return load(root / "pkg")


def test_the_package_has_convolution_states(model):
    assert model.decoder.state_names == ["past_conv.0"]  # layer 0 convolves, layer 1 attends
    assert model.decoder.num_layers == 1


def test_chunks_and_steps_give_the_logits_of_one_prefill(model):
    dec = model.decoder
    whole = dec.forward(PROMPT, dec.new_cache(), all_logits=True)
    cache = dec.new_cache()
    parts = [dec.forward(PROMPT[:5], cache, all_logits=True), dec.forward(PROMPT[5:9], cache, all_logits=True)]
    parts += [dec.forward([t], cache, all_logits=True) for t in PROMPT[9:]]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-4)
    assert np.abs(cache.states[0]).max() > 0


def test_going_back_starts_over_and_gives_the_same_logits(model):
    dec = model.decoder
    cache = dec.new_cache()
    dec.forward(PROMPT, cache)
    other = PROMPT[:10] + [300, 301, 302]
    todo = reuse_prefix(cache, other)
    assert cache.length == 0 and todo == other and not cache.tokens
    assert not np.any(cache.states[0])
    np.testing.assert_allclose(dec.forward(todo, cache), dec.forward(other, dec.new_cache()), atol=1e-5)


def test_a_prefix_that_matches_is_kept(model):
    dec = model.decoder
    cache = dec.new_cache()
    dec.forward(PROMPT[:12], cache)
    assert reuse_prefix(cache, PROMPT) == PROMPT[12:] and cache.length == 12
    np.testing.assert_allclose(dec.forward(PROMPT[12:], cache), dec.forward(PROMPT, dec.new_cache()), atol=1e-4)


def test_a_session_answers_as_fresh_generations_do(model):
    session = model.session(system="Be brief.")
    answers = [session.ask(q, max_new_tokens=6) for q in ("hello", "and then", "why")]
    fresh = model.session(system="Be brief.")
    for q, answer in zip(("hello", "and then", "why"), answers):
        fresh.cache = model.decoder.new_cache()  # no reuse: every turn prefilled from the start
        assert fresh.ask(q, max_new_tokens=6) == answer

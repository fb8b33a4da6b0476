"""Mamba in the fused decoder: no KV cache, a convolution and an SSM state per layer, each one buffer bound as its
past and present, carried across chunked prefills and steps to the model's own logits."""

import numpy as np
import pytest
from edgepack.runtime import load
from edgepack.runtime.generation import reuse_prefix

PROMPT = [5, 17, 33, 101, 7, 250, 3, 99, 12, 44, 61, 8, 200, 150, 31, 77]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import tiny_archs
    from edgepack.toolchain.build import BuildConfig, build

    root = tmp_path_factory.mktemp("mamba")
    src = tiny_archs.save("mamba", root / "src")
    manifest = build(BuildConfig(model=str(src), context=96), root / "pkg")
    return src, manifest, load(root / "pkg")


def test_the_package_has_states_and_no_kv_cache(built):
    _, manifest, model = built
    assert manifest.plan["graph"] == "fused"
    assert model.decoder.past_names == [] and model.decoder.num_layers == 0
    assert model.decoder.state_names == ["past_conv.0", "past_ssm.0", "past_conv.1", "past_ssm.1"]
    assert manifest.model["shape"]["kv_layers"] == 0  # the planner counts no KV cache for it


def test_chunks_and_steps_give_the_models_logits(built):
    import tiny_archs
    import torch

    src, _, model = built
    dec = model.decoder
    cache = dec.new_cache()
    parts = [dec.forward(PROMPT[:5], cache, all_logits=True), dec.forward(PROMPT[5:9], cache, all_logits=True)]
    parts += [dec.forward([t], cache, all_logits=True) for t in PROMPT[9:]]
    with torch.no_grad():
        want = tiny_archs.make_model("mamba")(torch.tensor([PROMPT])).logits[0].numpy()
    np.testing.assert_allclose(np.concatenate(parts), want, atol=1e-4)
    assert all(np.abs(state).max() > 0 for state in cache.states)


def test_going_back_starts_over_and_gives_the_same_logits(built):
    dec = built[2].decoder
    cache = dec.new_cache()
    dec.forward(PROMPT, cache)
    other = PROMPT[:10] + [300, 301, 302]
    todo = reuse_prefix(cache, other)
    assert cache.length == 0 and todo == other and not any(np.any(s) for s in cache.states)
    np.testing.assert_allclose(dec.forward(todo, cache), dec.forward(other, dec.new_cache()), atol=1e-5)

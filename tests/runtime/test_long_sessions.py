"""Long and concurrent sessions: many turns past the context stay bounded, and sessions run from
threads on one loaded model give exactly the greedy answers they give one after another."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from edgepack.runtime import load

PROMPTS = ["tell me about the for statement", "what does a while loop do", "explain iterators",
           "how are exceptions raised", "what is a class"]


@pytest.fixture(scope="module", params=["fused", "optimum"])
def model(request, tiny_model_dir, tmp_path_factory):
    from edgepack.toolchain.build import BuildConfig, build

    out = tmp_path_factory.mktemp("graphs") / request.param
    build(BuildConfig(model=str(tiny_model_dir), graph=request.param, context=96), out)
    return load(out)


def conversation(model, offset, turns=6):
    session = model.session(system="Be brief.")
    return [session.ask(PROMPTS[(offset + i) % len(PROMPTS)], max_new_tokens=12) for i in range(turns)]


def test_many_turns_stay_within_the_context(model):
    session = model.session(system="S")
    ctx = model.generation.context_length
    for i in range(60):
        session.ask(f"{i}: {PROMPTS[i % len(PROMPTS)]}", max_new_tokens=12)
        assert session.cache.length < ctx
        assert len(model.tokenizer.encode_chat(session.messages[:-1])) <= ctx - 12
    assert session.messages[0]["role"] == "system" and len(session.messages) < 20


def test_threads_match_serial_runs(model):
    serial = [conversation(model, k) for k in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda k: conversation(model, k), range(4)))
    assert threaded == serial

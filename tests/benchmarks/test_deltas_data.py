"""The delta benchmark's text domains (disjoint, deterministic splits) and its fine-tune loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "deltas"))

import domains  # noqa: E402
import finetune  # noqa: E402


@pytest.mark.parametrize("domain", domains.DOMAINS)
def test_splits_are_nonempty(domain):
    parts = {s: domains.text(domain, s) for s in domains.SPLITS}
    assert all(len(t) > 5_000 for t in parts.values())
    assert len(parts["valid"]) < len(parts["train"]) and len(parts["valid"]) < len(parts["test"])


def test_code_splits_share_no_passage():
    # (docs splits are disjoint by topic, tested below; pydoc's topics themselves repeat some paragraphs)
    parts = {s: domains.text("code", s) for s in domains.SPLITS}
    for a in domains.SPLITS:
        for b in domains.SPLITS:
            if a != b:
                probes = [p for p in parts[a].split("\n\n") if len(p) > 400][:20]
                assert probes and not any(p in parts[b] for p in probes), (a, b)


def test_docs_valid_is_the_tail_of_calibration():
    from edgepack.runtime.text import calibration_text, evaluation_text

    train, valid = domains.text("docs", "train"), domains.text("docs", "valid")
    assert calibration_text().startswith(train) and calibration_text().endswith(valid)
    assert domains.text("docs", "test") == evaluation_text()


def test_code_files_go_to_one_split_and_skip_tests():
    files = domains.stdlib_files()
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels) and len(rels) > 100
    assert not any(r.startswith(("test/", "idlelib/", "lib2to3/", "site-packages/", "pydoc_data/")) for r in rels)
    assert not any("/test/" in r or "/tests/" in r for r in rels)
    by_split = {s: {r for r in rels if domains.code_split(r) == s} for s in domains.SPLITS}
    assert all(by_split.values())
    for split in domains.SPLITS:
        headers = {line[2:] for line in domains.text("code", split).splitlines() if line.startswith("# ")}
        used = headers & set(rels)
        assert used and used <= by_split[split]
        assert len(domains.text("code", split)) <= domains.CODE_CAPS[split] + len(used)


def test_text_is_the_same_in_a_fresh_process():
    here = str(Path(domains.__file__).parent)
    code = (f"import sys; sys.path.insert(0, {here!r}); import domains; "
            "print(*(domains.fingerprint(d, s) for d in domains.DOMAINS for s in domains.SPLITS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [domains.fingerprint(d, s) for d in domains.DOMAINS for s in domains.SPLITS]


def test_unknown_domain_or_split_is_refused():
    with pytest.raises(ValueError, match="domain"):
        domains.text("poetry", "train")
    with pytest.raises(ValueError, match="split"):
        domains.text("docs", "dev")


def _train_tiny(seed: int):
    import tiny

    model, tok = tiny.make_model(), tiny.make_tokenizer()
    ids = tok(domains.text("docs", "train")[:40_000], add_special_tokens=False)["input_ids"]
    config = finetune.FinetuneConfig(domain="docs", steps=12, lr=3e-3, batch=2, seq_len=64, warmup=2, seed=seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = finetune.train(model, ids, config, progress=False)
    return model, tok, before, stats


def test_finetune_moves_only_decoder_linears_and_learns():
    model, tok, before, stats = _train_tiny(seed=0)
    for name, p in model.named_parameters():
        linear = name.split(".")[-2] in finetune.LINEAR_NAMES
        assert (not (p == before[name]).all()) == linear, name
    assert len(stats["losses"]) == 12
    assert sum(stats["losses"][-3:]) < sum(stats["losses"][:3])
    held_out = domains.text("docs", "test")[:6_000]
    import tiny

    fresh = tiny.make_model()
    assert (finetune.perplexity(model, tok, held_out, 64).perplexity
            < finetune.perplexity(fresh, tok, held_out, 64).perplexity)


def test_finetune_is_deterministic():
    a, _, _, stats_a = _train_tiny(seed=0)
    b, _, _, stats_b = _train_tiny(seed=0)
    assert stats_a["losses"] == stats_b["losses"]
    assert all((pa == pb).all() for pa, pb in zip(a.parameters(), b.parameters()))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="domain"):
        finetune.FinetuneConfig(domain="poetry")
    with pytest.raises(ValueError, match="learning rate"):
        finetune.FinetuneConfig(domain="code", lr=0.0)


def test_every_domain_has_default_settings():
    assert set(finetune.DEFAULTS) == set(domains.DOMAINS)
    assert all(config.domain == domain for domain, config in finetune.DEFAULTS.items())

"""GGUF files of every causal architecture transformers reads from GGUF, written as llama.cpp writes them
(tests/gguf_writer.py): edgepack loads each as the model it was written from, where transformers' own reader
drops settings the file holds (toolchain/gguf_repair.py), and refuses by name what it cannot read (an unknown rope
scaling)."""

import gguf_writer
import numpy as np
import pytest
import torch
from edgepack.runtime.errors import UnsupportedArchitecture
from edgepack.toolchain import sources

PROMPT = [5, 17, 33, 101, 7, 250, 3, 99, 12, 44] * 4  # longer than the rope factors' smallest wavelengths


def _write(variant, folder):
    import tiny

    model = gguf_writer.make_model(variant)
    path = gguf_writer.write(model, tiny.make_tokenizer(), folder / f"{variant}.gguf")
    if variant == "lfm2":  # transformers has no converter for an LFM2 GGUF's tokenizer: read from beside it
        tiny.make_tokenizer().save_pretrained(folder)
    return model, path


def _logits(model, prompt=PROMPT):
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].numpy()


@pytest.mark.parametrize("variant", list(gguf_writer.VARIANTS))
def test_a_gguf_loads_as_the_model_it_was_written_from(variant, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    model, path = _write(variant, tmp_path)
    loaded = sources.load(str(path))
    want = _logits(model)
    np.testing.assert_allclose(_logits(loaded.model)[:, :want.shape[1]], want, atol=1e-4)


def test_what_was_read_from_the_header_is_said_and_kept_in_the_float32_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    model, path = _write("phi3", tmp_path)
    sources.load(str(path))
    err = capsys.readouterr().err
    assert "leaves out: partial_rotary_factor=0.5, original_max_position_embeddings=128, rope_scaling=" in err
    again = sources.load(str(path))  # from the copy: the repaired config, no GGUF read
    assert again.model.config.rope_scaling["type"] == "longrope"
    np.testing.assert_allclose(_logits(again.model), _logits(model), atol=1e-4)


def test_an_unknown_rope_scaling_is_refused_by_name(tmp_path, monkeypatch):
    import tiny

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    model = gguf_writer.make_model("qwen2")
    path = gguf_writer.write(model, tiny.make_tokenizer(), tmp_path / "q.gguf",
                             extra={"qwen2.rope.scaling.type": "fancy"})
    with pytest.raises(UnsupportedArchitecture, match="rope scaling 'fancy'"):
        sources.load(str(path))


def _llama3_style_tokenizer():
    """A byte-level BPE trained with Llama 3's split rule (one to three digits a piece, punctuation joined to the
    next word or newlines), which GPT-2's rule splits otherwise."""
    from pydoc_data.topics import topics

    import tiny
    from edgepack.toolchain import gguf_repair
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf_repair._LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(topics.values())[:20], trainers.BpeTrainer(
        vocab_size=tiny.VOCAB, special_tokens=tiny.SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def _held_out_text():
    from pydoc_data.topics import topics

    return "\n".join(list(topics.values())[30:33])  # not in the tokenizer's training text


def test_a_llama3_tokenizer_gets_its_own_split_rule(tmp_path, monkeypatch):
    """transformers converts a Llama GGUF's byte-level BPE with GPT-2's split rule, which Llama 3 ('llama-bpe')
    does not use: the tokens differ. edgepack applies the rule the file names, so the ids are the original's."""
    from tokenizers import pre_tokenizers

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    original, text = _llama3_style_tokenizer(), _held_out_text()
    path = gguf_writer.write(gguf_writer.make_model("llama"), original, tmp_path / "l3.gguf", pre="llama-bpe")
    want = original(text)["input_ids"]
    loaded = sources.load(str(path))
    assert loaded.tokenizer(text)["input_ids"] == want
    assert loaded.tokenizer.decode(want, clean_up_tokenization_spaces=False) == text
    from edgepack.runtime import load
    from edgepack.toolchain.build import BuildConfig, build

    build(BuildConfig(model=str(path), context=64), tmp_path / "pkg")  # the runtime's tokenizer (no transformers)
    assert load(tmp_path / "pkg").tokenizer.encode(text) == want
    gpt2_rule = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    loaded.tokenizer.backend_tokenizer.pre_tokenizer = gpt2_rule  # what transformers alone gives
    assert loaded.tokenizer(text)["input_ids"] != want


def test_a_split_rule_edgepack_does_not_carry_is_said_and_a_tokenizer_beside_the_gguf_is_read(tmp_path, monkeypatch,
                                                                                             capsys):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    original, text = _llama3_style_tokenizer(), _held_out_text()
    path = gguf_writer.write(gguf_writer.make_model("llama"), original, tmp_path / "n.gguf", pre="tekken")
    first = sources.load(str(path))
    assert "split rule 'tekken' is not one edgepack carries, so transformers' GPT-2 rule is used" in \
        capsys.readouterr().err
    assert first.tokenizer(text)["input_ids"] != original(text)["input_ids"]
    original.save_pretrained(tmp_path)  # the model's own tokenizer.json, beside the GGUF
    again = sources.load(str(path))  # not the float32 copy made above, which holds the converted tokenizer
    assert "reading the tokenizer.json beside it" in capsys.readouterr().err
    assert again.tokenizer(text)["input_ids"] == original(text)["input_ids"]


@pytest.mark.parametrize("variant", ["llama-rope3", "phi3", "falcon", "qwen2_moe"])
def test_a_package_built_from_a_gguf_computes_its_model(variant, tmp_path, monkeypatch):
    from edgepack.runtime import load
    from edgepack.toolchain.build import BuildConfig, build

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    model, path = _write(variant, tmp_path)
    manifest = build(BuildConfig(model=str(path), context=64), tmp_path / "pkg")
    assert manifest.plan["graph"] == "fused" and manifest.model["source"]["kind"] == "gguf"
    decoder = load(tmp_path / "pkg").decoder
    ours = decoder.forward(PROMPT, decoder.new_cache(), all_logits=True)
    np.testing.assert_allclose(ours, _logits(model), atol=1e-3)


@pytest.mark.parametrize("variant", ["qwen3", "qwen3_moe", "qwen2_moe", "phi3"])
def test_the_planner_lays_out_a_gguf_as_its_model(variant, tmp_path, monkeypatch):
    """`edgepack plan` reads a GGUF's config without its weights, with the same repairs as the load."""
    import tiny
    from edgepack.toolchain.planner import plan

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    model, path = _write(variant, tmp_path)
    model.save_pretrained(tmp_path / "hf")
    tiny.make_tokenizer().save_pretrained(tmp_path / "hf")
    assert plan.model_shape(str(path)) == plan.model_shape(str(tmp_path / "hf"))

    sources.load(str(path))  # now with a float32 copy, whose config.json the planner reads instead
    assert sources.gguf_copy(sources.resolve(str(path))) is not None
    assert plan.model_shape(str(path)) == plan.model_shape(str(tmp_path / "hf"))

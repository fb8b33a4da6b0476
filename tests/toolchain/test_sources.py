import json

import pytest
from edgepack.runtime.errors import ModelSourceError, UnsupportedArchitecture
from edgepack.toolchain import sources


def test_missing_path(tmp_path):
    with pytest.raises(ModelSourceError, match="model not found"):
        sources.resolve(str(tmp_path / "nope"))


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"hello")
    with pytest.raises(ModelSourceError, match="not a .gguf"):
        sources.resolve(str(f))


def test_gguf_with_bad_magic(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ModelSourceError, match="bad magic"):
        sources.resolve(str(f))


def test_truncated_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\3\0\0\0" + b"\0" * 7)
    with pytest.raises(ModelSourceError):
        sources.load(str(f))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        sources.resolve(str(tmp_path))


def test_non_causal_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    with pytest.raises(UnsupportedArchitecture, match="vit"):
        sources.load(str(tmp_path))


def test_architecture_the_exporter_lacks_is_refused_before_loading(tmp_path):
    from edgepack.export.onnx_export import check_exportable

    # bert loads as a causal LM in transformers, but has no KV-cache export: refused from its config alone.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertLMHeadModel"]}))
    with pytest.raises(UnsupportedArchitecture, match="'bert' cannot be exported"):
        sources.load(str(tmp_path), check=check_exportable)


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "fancy-new-lm"}))
    with pytest.raises((UnsupportedArchitecture, ModelSourceError), match="fancy-new-lm"):
        sources.load(str(tmp_path))


def test_corrupt_weights(tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelSourceError, match="cannot load"):
        sources.load(str(broken))


def test_loads_hf_folder(tiny_model_dir):
    loaded = sources.load(str(tiny_model_dir))
    assert loaded.source.kind == "hf-folder"
    assert loaded.model.config.num_hidden_layers == 2
    assert loaded.tokenizer.is_fast


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """The tiny model written as a real GGUF with the gguf package, and a cache of its own."""
    import gguf_writer
    import tiny

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    model = tiny.make_model(seed=4)
    path = gguf_writer.write(model, tiny.make_tokenizer(), tmp_path / "tiny.gguf")
    return path, model


def test_gguf_source_loads(tiny_gguf):
    import numpy as np

    path, model = tiny_gguf
    loaded = sources.load(str(path))
    assert loaded.source.kind == "gguf" and loaded.source.sha256
    ours = loaded.model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(ours, model.model.embed_tokens.weight.detach().numpy(), atol=1e-6)


def test_gguf_is_read_from_its_float32_copy_after_the_first_load(tiny_gguf, monkeypatch):
    import torch
    from edgepack.toolchain import gguf_cache

    path, _ = tiny_gguf
    first = sources.load(str(path))
    copy = gguf_cache.lookup(first.source.sha256)
    assert copy is not None and (copy / "model.safetensors").is_file()

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was parsed again")

    monkeypatch.setattr("gguf.GGUFReader", no_gguf)  # what transformers reads every GGUF with
    second = sources.load(str(path))
    assert second.source == first.source  # the manifest still names the GGUF it came from
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "def f(x):\n    return x + 1  # hello"
    assert first.tokenizer(text).input_ids == second.tokenizer(text).input_ids


def test_damaged_gguf_copy_is_not_used_and_is_rewritten(tiny_gguf, capsys):
    import torch
    from edgepack.toolchain import gguf_cache

    path, _ = tiny_gguf
    first = sources.load(str(path))
    copy = gguf_cache.lookup(first.source.sha256)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8  # a flipped float: the safetensors header is still valid, the checksum is not
    weights.write_bytes(bytes(data))
    assert gguf_cache.lookup(first.source.sha256) is None
    assert "damaged" in capsys.readouterr().err
    again = sources.load(str(path))
    a, b = first.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert gguf_cache.lookup(first.source.sha256) is not None


def test_gguf_copy_can_be_turned_off(tiny_gguf, monkeypatch):
    from edgepack.toolchain import gguf_cache

    monkeypatch.setenv("EDGEPACK_GGUF_CACHE", "0")
    path, _ = tiny_gguf
    loaded = sources.load(str(path))
    assert gguf_cache.lookup(loaded.source.sha256) is None


def test_an_lfm2_gguf_builds_a_package_that_computes_its_model(tmp_path, monkeypatch):
    """LFM2 ships as GGUF too: transformers reads its layer kinds from the per-layer key-value heads; the package
    built from the GGUF (fused graph, convolution states) gives the source model's logits, and its tokenizer comes from
    the files beside the GGUF, since transformers cannot convert an LFM2 GGUF's own."""
    import gguf_writer
    import numpy as np
    import tiny
    import tiny_archs
    import torch
    from edgepack.runtime import load
    from edgepack.toolchain.build import BuildConfig, build

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    model = tiny_archs.make_model("lfm2", seed=3)
    gguf_writer.write(model, tiny.make_tokenizer(), tmp_path / "lfm2.gguf")
    # transformers 4.57 has no converter for an LFM2 GGUF's tokenizer: the files beside it are asked for, then read
    with pytest.raises(ModelSourceError, match="tokenizer.json .* beside it"):
        sources.load(str(tmp_path / "lfm2.gguf"))
    tiny.make_tokenizer().save_pretrained(tmp_path)
    manifest = build(BuildConfig(model=str(tmp_path / "lfm2.gguf"), context=64), tmp_path / "pkg")
    assert manifest.plan["graph"] == "fused" and manifest.model["source"]["kind"] == "gguf"
    prompt = [5, 17, 33, 101, 7, 250, 3, 99, 12, 44]
    decoder = load(tmp_path / "pkg").decoder
    ours = decoder.forward(prompt, decoder.new_cache(), all_logits=True)
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(ours, want, atol=1e-3)


def test_gguf_cut_off_in_its_tensor_data_is_named_as_such(tmp_path):
    import gguf
    import numpy as np

    whole, cut = tmp_path / "whole.gguf", tmp_path / "cut.gguf"
    writer = gguf.GGUFWriter(whole, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cut.write_bytes(whole.read_bytes()[:-4096])
    with pytest.raises(ModelSourceError, match="truncated or corrupt"):
        sources.load(str(cut))


def test_model_with_its_own_code_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "my_custom", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}))
    (tmp_path / "configuration_my.py").write_text("raise RuntimeError('never run')\n")
    with pytest.raises(UnsupportedArchitecture, match="auto_map"):
        sources.load(str(tmp_path))


def test_folder_without_tokenizer_or_with_a_broken_one_is_named(tiny_model_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    with pytest.raises(ModelSourceError, match="has no tokenizer files"):
        sources.load(str(bare))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.json").write_text("{garbage")
    with pytest.raises(ModelSourceError, match="cannot load the tokenizer"):
        sources.load(str(broken))


def test_checkpoint_missing_weights_is_refused(tiny_model_dir, tmp_path):
    # transformers would fill them in at random, with a warning only in its log
    import shutil

    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match="1 weights of a llama model are not in the checkpoint"):
        sources.load(str(broken))


def test_a_multimodal_gemma3_packages_its_language_model(tmp_path, capsys):
    """Gemma 3 4B and up are multimodal checkpoints (a vision tower beside the language model): edgepack loads the
    language model alone, says so, and the package (fused graph) gives the full model's logits on text."""
    import numpy as np
    import tiny_archs
    import torch
    from edgepack.runtime import load
    from edgepack.toolchain.build import BuildConfig, build
    from edgepack.toolchain.planner.plan import model_config

    src = tiny_archs.save("gemma3", tmp_path / "src")
    loaded = sources.load(str(src))
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert "packaging its language model ('gemma3_text') alone" in capsys.readouterr().err
    assert model_config(str(src))["model_type"] == "gemma3_text"  # the planner lays out the same model
    manifest = build(BuildConfig(model=str(src), context=64), tmp_path / "pkg")
    assert manifest.plan["graph"] == "fused"
    prompt = [5, 17, 33, 101, 7, 250, 3, 99, 12, 44]
    decoder = load(tmp_path / "pkg").decoder
    ours = decoder.forward(prompt, decoder.new_cache(), all_logits=True)
    full = tiny_archs.make_model("gemma3")  # the multimodal model itself, vision tower and all
    assert type(full).__name__ == "Gemma3ForConditionalGeneration"
    with torch.no_grad():
        want = full(torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(ours, want, atol=1e-4)


def test_a_multimodal_checkpoint_whose_language_model_does_not_load_is_refused(tmp_path):
    # Llava keeps its language model under names LlamaForCausalLM does not read: refused, not filled in at random
    import tiny
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = dict(model_type="llama", vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision,
                                              image_token_index=tiny.VOCAB - 1)).save_pretrained(tmp_path)
    tiny.make_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match="cannot package its text part yet"):
        sources.load(str(tmp_path))


def test_a_folder_with_pickled_weights_only_is_refused_unread(tmp_path, monkeypatch):
    """No pickle is unpickled: a folder whose weights are pytorch_model.bin only is refused by name, before
    transformers (which would read it with torch's restricted unpickler) is asked to."""
    import tiny
    import tiny_archs
    import torch

    folder = tmp_path / "old"
    tiny_archs.make_model("llama").save_pretrained(folder, safe_serialization=False)
    tiny.make_tokenizer().save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))

    def unpickle(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", unpickle)
    with pytest.raises(ModelSourceError, match=r"pickle \(pytorch_model.bin\) and no .safetensors file"):
        sources.load(str(folder))

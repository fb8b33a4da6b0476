import pytest
from edgepack.runtime.errors import PackageError, UsageError
from edgepack.runtime.package import open_package
from edgepack.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_package):
    pkg = open_package(tiny_package)
    return Tokenizer(pkg.tokenizer_path, pkg.chat_template, "<|im_start|>", "<|im_end|>")


def test_encode_decode_round_trip(tok):
    text = "Python's for statement iterates over items — naïve café ☕ 日本"
    assert tok.decode(tok.encode(text)) == text


def test_stream_decoder_concatenates_to_full_decode(tok):
    text = "def f(x):\n    return x ** 2  # naïve ☕ 日本語 ok"
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # partial UTF-8 sequences are held back


def test_chat_template_matches_transformers(tok, tiny_model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is a list?"}]
    ours = tok.encode_chat(messages)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ours == list(theirs)


def test_chat_template_is_sandboxed(tiny_package):
    pkg = open_package(tiny_package)
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    tok = Tokenizer(pkg.tokenizer_path, evil)
    with pytest.raises(UsageError, match="unsafe"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_template_raise_exception_is_a_usage_error(tiny_package):
    pkg = open_package(tiny_package)
    tok = Tokenizer(pkg.tokenizer_path, "{{ raise_exception('only user turns allowed') }}")
    with pytest.raises(UsageError, match="only user turns allowed"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_broken_template_and_tokenizer_are_package_errors(tiny_package, tmp_path):
    pkg = open_package(tiny_package)
    with pytest.raises(PackageError, match="chat template"):
        Tokenizer(pkg.tokenizer_path, "{% for x in %}")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(PackageError, match="tokenizer"):
        Tokenizer(bad)


def test_compact_merges_is_the_same_tokenizer(tiny_package):
    from edgepack.runtime.tokenizer import compact_merges
    from tokenizers import Tokenizer as HFTokenizer

    text = (tiny_package / "tokenizer.json").read_text(encoding="utf-8")
    compact = compact_merges(text)
    assert '"merges":[[' in text.replace(" ", "") and '"merges":[[' not in compact.replace(" ", "")
    assert len(compact) < len(text)
    original, rewritten = HFTokenizer.from_str(text), HFTokenizer.from_str(compact)
    assert rewritten.to_str() == original.to_str()
    sample = "Python's for statement — naïve café ☕ 日本\n\tdef f(x): return x ** 2"
    assert rewritten.encode(sample).ids == original.encode(sample).ids


def test_compact_merges_leaves_merges_it_cannot_write_as_strings():
    from edgepack.runtime.tokenizer import compact_merges

    spaced = '{"model":{"merges":[["a","b"],["c d","e"]]}}'
    escaped = '{"model":{"merges":[["a","b"],["c\\u0020d","e"]]}}'
    legacy = '{"model":{"merges":["a b","c e"]}}'
    for text in (spaced, escaped, legacy, '{"model":{"merges":[]}}'):
        assert compact_merges(text) == text
    assert compact_merges('{"merges": [ ["a", "b\\"q"] , ["\\u00e9", "c"] ], "x": 1}') == \
        '{"merges": ["a b\\"q","\\u00e9 c"], "x": 1}'


def test_unreadable_tokenizer_is_a_package_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(PackageError, match="cannot read tokenizer"):
        Tokenizer(bad)
    with pytest.raises(PackageError, match="cannot read tokenizer"):
        Tokenizer(tmp_path / "missing.json")

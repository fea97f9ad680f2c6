"""Text <-> token ids, from the three places a model's vocabulary lives.

- a HF directory: `tokenizer.json` (run by the `tokenizers` library) or `tokenizer.model` (by `sentencepiece`),
  with `tokenizer_config.json` for the special tokens, add_bos_token and the chat template;
- a GGUF file: llama.cpp's `tokenizer.ggml.*` arrays, rebuilt here as a `tokenizers.Tokenizer`:
  "gpt2" is byte-level BPE with the file's merges and the split regex its `tokenizer.ggml.pre` names,
  "llama" is sentencepiece-style BPE whose merges come from the piece scores, with `<0x..>` byte fallback.

One `Tokenizer` class fronts them all; `IncrementalDecoder` turns a stream of generated ids into text pieces.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

# llama.cpp's token types (tokenizer.ggml.token_type), as in sentencepiece's ModelProto.SentencePiece.Type.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# Byte-level split regexes by `tokenizer.ggml.pre`: each vocabulary's merges were learned on text cut this way.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 is Llama 3's regex with digits one at a time.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLIT_BY_PRE = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# GPT-2's own regex (built into tokenizers' ByteLevel), after cutting every digit apart: StarCoder's
# tokenizer.json and llama.cpp's pre-tokenizer for these names.
_DIGITS_THEN_GPT2 = frozenset(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"))
_PLAIN_GPT2 = frozenset(("default", "gpt2", "gpt-2", "olmo", "mpt", "jais"))


class Tokenizer:
    """encode/decode, the special token ids generation stops on, and the model's chat template.

    Build one with `from_hf_dir` or `from_gguf`; `save` writes a directory `from_hf_dir` reads back.
    """

    def __init__(
        self,
        backend: _HFBackend | _SentencePieceBackend,
        *,
        special_tokens: dict[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ):
        """Prefer the from_* constructors. special_tokens: "bos_token"/"eos_token"/"unk_token"/"pad_token" -> text.
        add_bos_token/add_eos_token: what the backend does on encode(add_special_tokens=True), recorded for `save`
        (None: the backend's own post-processor decides)."""
        self._backend = backend
        self.special_tokens = {name: text for name, text in (special_tokens or {}).items() if text is not None}
        bos = self.special_tokens.get("bos_token")
        self._bos_token_id = backend.token_to_id(bos) if bos is not None else None
        eos_ids = list(eos_token_ids)
        if "eos_token" in self.special_tokens:
            eos_ids.insert(0, backend.token_to_id(self.special_tokens["eos_token"]))
        self._eos_token_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        self._chat_template = chat_template
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token

    # ----------------------------------------------------------------------------------------------- interface

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special tokens written in the text ("<|im_start|>") become their single ids. add_special_tokens adds
        BOS/EOS where the tokenizer's source asks for them (add_bos_token, a tokenizer.json post-processor)."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A decoder for generated ids, fed one at a time."""
        return IncrementalDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for a conversation; encode it with add_special_tokens=False (the template writes BOS)."""
        from jaxinfer.chat_template import render_chat_template

        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template; format the prompt yourself or pass token ids")
        return render_chat_template(
            self._chat_template, messages, add_generation_prompt, **{**self.special_tokens, **kwargs}
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """The prompt ids of a conversation: the chat template rendered, then encoded without a second BOS."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Every id decode knows, added tokens included."""
        return self._backend.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a turn (eos, and eot/eom or generation_config's extra eos ids where given)."""
        return self._eos_token_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_token_ids(self) -> frozenset[int]:
        """The ids decode(skip_special_tokens=True) drops."""
        return self._backend.special_ids

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    # ---------------------------------------------------------------------------------------------- constructors

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json, else tokenizer.model; tokenizer_config.json (and chat_template.jinja,
        generation_config.json) where present."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"tokenizer directory {str(path)!r} does not exist")
        config = _read_json(path / "tokenizer_config.json")
        special_tokens = {
            name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        if (path / "tokenizer.json").is_file():
            tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            if add_bos is not None or add_eos is not None:
                # transformers rebuilds the post-processor from these flags, overriding tokenizer.json's.
                tokenizer.post_processor = _bos_eos_processor(
                    tokenizer,
                    special_tokens["bos_token"] if add_bos else None,
                    special_tokens["eos_token"] if add_eos else None,
                )
            backend = _HFBackend(tokenizer)
        elif (path / "tokenizer.model").is_file():
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            for name, sp_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
                if special_tokens[name] is None and sp_id >= 0:
                    special_tokens[name] = sp.id_to_piece(sp_id)
            # transformers' LlamaTokenizer adds BOS unless told otherwise.
            add_bos = True if add_bos is None else bool(add_bos)
            add_eos = bool(add_eos)
            backend = _SentencePieceBackend(
                sp,
                bos_id=sp.piece_to_id(special_tokens["bos_token"]) if add_bos and special_tokens["bos_token"] else None,
                eos_id=sp.piece_to_id(special_tokens["eos_token"]) if add_eos and special_tokens["eos_token"] else None,
            )
        else:
            raise ValueError(f"{str(path)!r} has no tokenizer.json or tokenizer.model")
        chat_template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            chat_template = (path / "chat_template.jinja").read_text()
        if isinstance(chat_template, list):
            # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {entry["name"]: entry["template"] for entry in chat_template}
            chat_template = named.get("default", next(iter(named.values()), None))
        eos_ids = list(config.get("eos_token_ids", ()))
        generation_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        if generation_eos is not None:
            eos_ids += generation_eos if isinstance(generation_eos, list) else [generation_eos]
        return cls(
            backend,
            special_tokens=special_tokens,
            eos_token_ids=eos_ids,
            chat_template=chat_template,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
        )

    @classmethod
    def from_gguf(cls, path_or_reader) -> Tokenizer:
        """The vocabulary in a GGUF file (a path, or a `gguf.GGUFReader` already open on it)."""
        import gguf

        if isinstance(path_or_reader, gguf.GGUFReader):
            reader = path_or_reader
        else:
            path = Path(path_or_reader)
            if not path.is_file():
                raise ValueError(f"GGUF file {str(path)!r} does not exist")
            reader = gguf.GGUFReader(str(path))

        def field(key, default=None):
            found = reader.fields.get(f"tokenizer.{key}")
            return default if found is None else _gguf_value(found, gguf.GGUFValueType)

        kind = field("ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ValueError(
                f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, "
                f"'llama' sentencepiece BPE)"
            )
        tokens = field("ggml.tokens")
        if not tokens:
            raise ValueError("the GGUF file has no tokenizer.ggml.tokens")
        token_types = field("ggml.token_type") or [_NORMAL] * len(tokens)
        ids = {name: field(f"ggml.{name}_token_id") for name in ("bos", "eos", "unknown", "padding", "eot", "eom")}
        special_tokens = {
            f"{name}_token": tokens[ids[key]]
            for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
            if ids[key] is not None and 0 <= ids[key] < len(tokens)
        }
        if kind == "gpt2":
            tokenizer = _byte_level_bpe(tokens, field("ggml.merges") or [], field("ggml.pre"))
            add_bos = bool(field("ggml.add_bos_token", False))
        else:
            scores = field("ggml.scores")
            if scores is None:
                raise ValueError("a 'llama' GGUF vocabulary needs tokenizer.ggml.scores")
            tokenizer = _sentencepiece_bpe(
                tokens,
                scores,
                token_types,
                field("ggml.merges"),
                special_tokens.get("unk_token"),
                add_space_prefix=bool(field("ggml.add_space_prefix", True)),
            )
            # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
            add_bos = bool(field("ggml.add_bos_token", True))
        add_eos = bool(field("ggml.add_eos_token", False))
        special_ids = {ids[key] for key in ("bos", "eos", "unknown", "padding") if ids[key] is not None}
        _add_vocab_tokens(tokenizer, tokens, token_types, special_ids)
        tokenizer.post_processor = _bos_eos_processor(
            tokenizer,
            special_tokens.get("bos_token") if add_bos else None,
            special_tokens.get("eos_token") if add_eos else None,
        )
        eos_ids = [ids[key] for key in ("eot", "eom") if ids[key] is not None]
        return cls(
            _HFBackend(tokenizer),
            special_tokens=special_tokens,
            eos_token_ids=eos_ids,
            chat_template=field("chat_template"),
            add_bos_token=add_bos,
            add_eos_token=add_eos,
        )

    def save(self, path: str | Path) -> None:
        """tokenizer.json (tokenizer.model for a sentencepiece one) + tokenizer_config.json, chat template included."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._backend.save(path)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        if self._add_bos_token is not None:
            config["add_bos_token"] = self._add_bos_token
        if self._add_eos_token is not None:
            config["add_eos_token"] = self._add_eos_token
        if len(self._eos_token_ids) > 1:
            config["eos_token_ids"] = list(self._eos_token_ids)
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class IncrementalDecoder:
    """Generated ids in, newly completed text out; the pieces add up to `tokenizer.decode(all_ids)`.

    Each step decodes only a short window, from an anchor token already emitted to the newest id, and hands out
    what the window adds beyond what was already handed out. Text is held back while it ends in U+FFFD, which
    is what a character cut between tokens (half a UTF-8 sequence) decodes to, and while the window ends in a
    run of `<0x..>` byte-fallback pieces: tokenizers decodes such a run all at once, every byte becoming U+FFFD
    if any of the run is not UTF-8, so no part of it is final before the run ends. `flush()` hands out anything
    still held when the stream ends.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Tokens that cannot anchor a window: skipped specials decode to nothing, and decoders that strip a
        # leading space (sentencepiece's) would then strip the next token's; a byte piece would split its run.
        self._no_anchor = tokenizer._backend.byte_run_ids | (
            tokenizer.special_token_ids if skip_special_tokens else frozenset()
        )
        self._ids: list[int] = []
        self._anchor = 0  # the window starts here: an emitted token that sets leading-space context
        self._emitted = 0  # characters of decode(ids[anchor:]) already handed out
        self.text = ""  # everything handed out so far

    def feed(self, token_id: int) -> str:
        """Add one id; return the text that became final (often "", never half a character)."""
        self._ids.append(int(token_id))
        # The trailing byte run; skipped specials vanish before decoding, so a run goes on through them.
        run_start = len(self._ids)
        while run_start > self._anchor and self._ids[run_start - 1] in self._no_anchor:
            run_start -= 1
        window = self._decode(self._ids[self._anchor : run_start])
        final = len(window.rstrip("\ufffd"))
        piece = window[self._emitted : final]
        self._emitted = max(self._emitted, final)
        last = len(self._ids) - 1
        # When the newest token ends on a character boundary, a window starting at it decodes the same way in
        # every later step.
        if final == len(window) and run_start == len(self._ids) and last > self._anchor:
            self._anchor = last
            self._emitted = len(self._decode(self._ids[last:]))
        self.text += piece
        return piece

    def flush(self) -> str:
        """The text held back at the end of the stream (a real trailing U+FFFD or a cut-off character)."""
        window = self._decode(self._ids[self._anchor :])
        piece = window[self._emitted :]
        self._emitted = len(window)
        self.text += piece
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


# ------------------------------------------------------------------------------------------------------ backends


class _HFBackend:
    """A `tokenizers.Tokenizer`: tokenizer.json, or a GGUF vocabulary rebuilt as one."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = frozenset(
            token_id for token_id, added in tokenizer.get_added_tokens_decoder().items() if added.special
        )
        # ByteFallback decodes a run of these together (see IncrementalDecoder).
        self.byte_run_ids = frozenset(
            token_id for token, token_id in tokenizer.get_vocab().items() if _BYTE_PIECE.fullmatch(token)
        )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def save(self, path: Path) -> None:
        self.tokenizer.save(str(path / "tokenizer.json"))


class _SentencePieceBackend:
    """A sentencepiece tokenizer.model, run by sentencepiece itself so ids match it exactly.

    sentencepiece never matches control pieces ("<s>") in text; as transformers does, the text is cut at them
    first and each cut encoded alone (so the piece after one gets sentencepiece's dummy-prefix space).
    """

    def __init__(self, sp, bos_id: int | None, eos_id: int | None):
        self.sp = sp
        self.bos_id, self.eos_id = bos_id, eos_id
        self.special_ids = frozenset(i for i in range(sp.get_piece_size()) if sp.is_control(i))
        # sentencepiece decodes invalid bytes one at a time, so its byte pieces need no special care.
        self.byte_run_ids = frozenset()
        controls = sorted((sp.id_to_piece(i) for i in self.special_ids), key=len, reverse=True)
        controls = [piece for piece in controls if piece]
        self._control_ids = {sp.id_to_piece(i): i for i in self.special_ids}
        self._control_re = re.compile("(" + "|".join(map(re.escape, controls)) + ")") if controls else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        parts = self._control_re.split(text) if self._control_re is not None else [text]
        ids = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._control_ids[part])
            elif part:
                ids += self.sp.encode(part)
        if add_special_tokens:
            ids = ([self.bos_id] if self.bos_id is not None else []) + ids
            ids += [self.eos_id] if self.eos_id is not None else []
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        text, run = "", []
        for i in ids:
            if i in self.special_ids:
                text += self.sp.decode(run) + self.sp.id_to_piece(i) if run else self.sp.id_to_piece(i)
                run = []
            else:
                run.append(i)
        return text + (self.sp.decode(run) if run else "")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        # piece_to_id answers unk_id for an unknown piece.
        return token_id if self.sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.sp.get_piece_size() else None

    def save(self, path: Path) -> None:
        (path / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())


# -------------------------------------------------------------------------------------- GGUF vocabularies rebuilt


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> tokenizers.Tokenizer:
    """GPT-2 style BPE: tokens are spelled in the byte alphabet ("Ġ" is a space), merges are "left right"."""
    vocab = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, pairs, fuse_unk=False))
    if pre in _SPLIT_BY_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGITS_THEN_GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        if pre is not None and pre not in _PLAIN_GPT2:
            warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known here; splitting text with GPT-2's regex")
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(
    tokens: list[str],
    scores: list[float],
    token_types: list[int],
    merges: list[str] | None,
    unk_token: str | None,
    add_space_prefix: bool,
) -> tokenizers.Tokenizer:
    """A sentencepiece BPE vocabulary ("▁" is a space) as a tokenizers BPE.

    sentencepiece merges, at each step, the adjacent pair whose concatenation is the best-scored piece; BPE merges
    by rank, so the ranks are the normal pieces' splits ordered by the joined piece's score. Characters no piece
    covers fall back to their UTF-8 bytes as `<0x..>` pieces, or to unk.
    """
    vocab = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    if merges:
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    else:
        normal = {token: token_id for token, token_id in vocab.items() if token_types[token_id] == _NORMAL}
        ranked = []
        for token, token_id in normal.items():
            for cut in range(1, len(token)):
                left, right = token[:cut], token[cut:]
                if left in normal and right in normal:
                    ranked.append((-scores[token_id], token_id, normal[left], left, right))
        ranked.sort()
        pairs = [(left, right) for *_, left, right in ranked]
    if unk_token is not None and unk_token not in vocab:
        unk_token = None
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, pairs, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    # A normalizer rather than the Metaspace pre-tokenizer: Metaspace skips the prefix when the text already
    # starts with a space, sentencepiece and llama.cpp never do ("  a" is "▁▁▁a"). Like llama.cpp, each stretch
    # of text after a special token gets its own prefix.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _add_vocab_tokens(tokenizer: tokenizers.Tokenizer, tokens, token_types, special_ids: set[int]) -> None:
    """Control tokens (and bos/eos/unk/pad) match whole in text as special tokens, user-defined ones as plain
    added tokens, as llama.cpp does; their text is already in the vocabulary, so they keep their ids."""
    special = [
        AddedToken(token, special=True, normalized=False)
        for token_id, (token, token_type) in enumerate(zip(tokens, token_types))
        if token and (token_type == _CONTROL or token_id in special_ids)
    ]
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token and token_type == _USER_DEFINED
    ]
    before = tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)
    assert tokenizer.get_vocab_size(with_added_tokens=True) == before, "added tokens must reuse vocabulary ids"


def _bos_eos_processor(tokenizer: tokenizers.Tokenizer, bos: str | None, eos: str | None):
    """A post-processor that puts `bos` before and `eos` after each sequence (None for neither)."""
    if bos is None and eos is None:
        return None
    specials = [(token, tokenizer.token_to_id(token)) for token in dict.fromkeys(t for t in (bos, eos) if t)]
    for token, token_id in specials:
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
    head, tail = ([bos] if bos else []), ([eos] if eos else [])
    return processors.TemplateProcessing(
        single=[*head, "$A:0", *tail],
        pair=[*head, "$A:0", *tail, *head, "$B:1", *tail],
        special_tokens=specials,
    )


def _gguf_value(field, value_type):
    """A GGUF metadata value as Python data (ReaderField.contents() is missing from older gguf releases)."""
    if field.types[0] == value_type.ARRAY:
        if field.types[-1] == value_type.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if field.types[0] == value_type.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e


def _token_text(token) -> str | None:
    """tokenizer_config.json writes a special token as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token

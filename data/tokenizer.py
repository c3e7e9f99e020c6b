"""Tokenizers: sentencepiece (BPE or unigram) and a character-level one, same interface.

The sentencepiece settings keep text exact, which source code needs:
  - identity normalisation (no NFKC: it would rewrite e.g. full-width characters),
  - whitespace kept as is (no dummy prefix, no collapsing of runs of spaces),
    whitespace-only pieces allowed so indentation becomes few tokens,
  - byte fallback, so a character outside the vocabulary becomes its UTF-8 bytes
    rather than <unk>; "\\n" and "\\t" are one byte-token each.
Hence decode(encode(text)) == text for any text without the reserved U+2581 ('▁'),
which sentencepiece uses to encode spaces.

Ids: 0 <pad>, 1 <unk>, 2 <s> (bos), 3 </s> (eos), then the chat-role tokens SFT uses.
Chat-role tokens are user-defined symbols: they are matched in text, so a chat template
can be written as a string. Corpus text is encoded with `match_special=False` (as every
tokenizer here takes it): a document that writes "<|user|>" holds those characters, not
the role token, so decode(encode(text)) == text and no role token appears mid-document.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from data.hf_tokenizer import CONFIG_FILE, HFTokenizer, is_hf_tokenizer_json

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, *CHAT_TOKENS)
MODEL_TYPES = ("bpe", "unigram", "char")
MAX_SENTENCE_BYTES = 16384  # training lines longer than this are skipped by sentencepiece
BYTE_PIECES = 256  # byte fallback: one piece per byte value


class Tokenizer:
    """A trained sentencepiece model."""

    def __init__(self, processor: spm.SentencePieceProcessor):
        self.sp = processor
        self._literal_sp: spm.SentencePieceProcessor | None = None  # built when first used

    def _processor(self, match_special: bool) -> spm.SentencePieceProcessor:
        if match_special:
            return self.sp
        if self._literal_sp is None:
            self._literal_sp = _literal_processor(self.sp)
        return self._literal_sp

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        return cls(spm.SentencePieceProcessor(model_file=str(path)))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        # A model without a pad piece (Llama 2's) pads with eos; padding is masked anyway.
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def special_id(self, name: str) -> int:
        """Id of a special token such as "<|user|>"; KeyError if the model lacks it."""
        idx = self.sp.piece_to_id(name)
        if idx == self.sp.unk_id() and name != UNK:
            raise KeyError(f"tokenizer has no special token {name!r}")
        return idx

    def encode(self, text: str, *, match_special: bool = True) -> list[int]:
        """Ids of `text`; with `match_special=False` (corpus text) a special token's text,
        e.g. "<|user|>", is encoded as the characters it is."""
        return self._processor(match_special).encode(text)

    def encode_batch(
        self, texts: Sequence[str], num_threads: int = 0, *, match_special: bool = True
    ) -> list[list[int]]:
        return self._processor(match_special).encode(list(texts), num_threads=num_threads)

    def piece(self, id_: int) -> str:
        """The vocabulary entry of an id, as the tokenizer stores it (for display)."""
        return self.sp.id_to_piece(id_)

    def decode(self, ids: Sequence[int]) -> str:
        # An id past the vocabulary (a spare id of a model with more than this) reads as unknown.
        n, unk = self.sp.get_piece_size(), self.sp.unk_id()
        return self.sp.decode([i if 0 <= i < n else unk for i in map(int, ids)])


class CharTokenizer:
    """Character vocabulary (nanoGPT's Shakespeare recipe) after the shared special tokens."""

    def __init__(self, chars: Sequence[str]):
        self.pieces = list(SPECIAL_TOKENS) + sorted(set(chars) - set(SPECIAL_TOKENS))
        self.index = {p: i for i, p in enumerate(self.pieces)}
        self._special = re.compile("(" + "|".join(map(re.escape, CHAT_TOKENS)) + ")")

    @classmethod
    def build(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(sorted(chars))

    def save(self, path: str | os.PathLike) -> None:
        chars = self.pieces[len(SPECIAL_TOKENS) :]
        Path(path).write_text(json.dumps({"type": "char", "chars": chars}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        spec = json.loads(Path(path).read_text())
        if spec.get("type") != "char":
            raise ValueError(f"{path} is not a character tokenizer file")
        return cls(spec["chars"])

    vocab_size = property(lambda self: len(self.pieces))

    def piece(self, id_: int) -> str:
        return self.pieces[id_]

    pad_id = property(lambda self: self.index[PAD])
    bos_id = property(lambda self: self.index[BOS])
    eos_id = property(lambda self: self.index[EOS])

    def special_id(self, name: str) -> int:
        if name not in SPECIAL_TOKENS:
            raise KeyError(f"tokenizer has no special token {name!r}")
        return self.index[name]

    def encode(self, text: str, *, match_special: bool = True) -> list[int]:
        """Ids of `text`; with `match_special=False` (corpus text) a chat token's text is
        encoded as the characters it is."""
        unk = self.index[UNK]
        ids: list[int] = []
        for part in self._special.split(text) if match_special else [text]:
            if part in self.index and part in CHAT_TOKENS:
                ids.append(self.index[part])
            else:
                ids.extend(self.index.get(c, unk) for c in part)
        return ids

    def encode_batch(
        self, texts: Sequence[str], num_threads: int = 0, *, match_special: bool = True
    ) -> list[list[int]]:
        return [self.encode(t, match_special=match_special) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        skip = {self.pad_id, self.bos_id, self.eos_id}
        out = []
        for i in map(int, ids):
            if i in skip:
                continue
            known = 0 <= i < len(self.pieces) and i != self.index[UNK]  # past: a spare id
            out.append(self.pieces[i] if known else "\ufffd")
        return "".join(out)


def _literal_processor(sp: spm.SentencePieceProcessor) -> spm.SentencePieceProcessor:
    """The same model with its user-defined pieces (the chat tokens) made control pieces:
    every id keeps its piece, but sentencepiece matches only user-defined pieces in text,
    so their text is encoded as plain characters (and control pieces are never produced)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    user_defined = [p for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED]
    if not user_defined:
        return sp
    for piece in user_defined:
        piece.type = pb.ModelProto.SentencePiece.CONTROL
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


AnyTokenizer = Tokenizer | CharTokenizer | HFTokenizer


FIXED_IDS = len(SPECIAL_TOKENS) + BYTE_PIECES  # a subword model's ids whatever the corpus


def check_vocab_size(vocab_size: int, model_type: str) -> None:
    """Refuses a vocab_size that no corpus fits, before any text is read. A subword model
    needs the fixed ids and one per character of the corpus (how many, only its text
    tells: see _vocab_error); a char model takes its size from the corpus alone."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"tokenizer must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if model_type != "char" and vocab_size <= FIXED_IDS:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: a {model_type} tokenizer needs "
            f"{len(SPECIAL_TOKENS)} special tokens, {BYTE_PIECES} byte pieces and one id per "
            f"character of the corpus, so more than {FIXED_IDS}; raise --vocab_size"
        )


# sentencepiece reports vocabulary sizes that do not fit the corpus in these words.
_SPM_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_SPM_TOO_LARGE = re.compile(r"Vocabulary size too high \((\d+)\)\. .*<= (\d+)")


def _vocab_error(error: RuntimeError, model_type: str) -> Exception:
    """sentencepiece's internal check message, as the line a user can act on."""
    if m := _SPM_TOO_SMALL.search(str(error)):
        vocab_size, needed = int(m[1]), int(m[2])
        return ValueError(
            f"vocab_size {vocab_size} is too small for this corpus: its {model_type} tokenizer "
            f"needs {needed} ids ({needed - FIXED_IDS} characters, {len(SPECIAL_TOKENS)} special "
            f"tokens, {BYTE_PIECES} byte pieces); use --vocab_size={needed} or more"
        )
    if m := _SPM_TOO_LARGE.search(str(error)):
        return ValueError(
            f"vocab_size {m[1]} is too large for this corpus: a {model_type} tokenizer can "
            f"learn at most {m[2]} pieces from it; use --vocab_size={m[2]} or less, or more text"
        )
    return error


def load_tokenizer(path: str | os.PathLike) -> AnyTokenizer:
    """The tokenizer in a file, recognised by content, or in a directory.

    A .json file is a CharTokenizer ({"type": "char"}) or a Hugging Face
    tokenizer.json (`HFTokenizer`); any other file is a sentencepiece model. A
    directory holds tokenizer.model, or else tokenizer.json, or else one .json.
    """
    path = _tokenizer_file(Path(path))
    if path.suffix != ".json":
        return Tokenizer.load(path)
    return HFTokenizer.load(path) if _is_hf_json(path) else CharTokenizer.load(path)


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The files the tokenizer at `path` (as `load_tokenizer` takes it) consists of: its
    file, and for a Hugging Face tokenizer.json the tokenizer_config.json beside it."""
    file = _tokenizer_file(Path(path))
    if file.suffix == ".json" and _is_hf_json(file):
        return [file, file.parent / CONFIG_FILE]
    return [file]


def tokenizer_identity(files: list[Path]) -> dict:
    """{"files": names, "sha256": one digest over the files' names and bytes}: the same
    tokenizer wherever its files are copied."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {"files": sorted(p.name for p in files), "sha256": digest.hexdigest()}


def _tokenizer_file(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file does not exist: {path}")
    if path.is_dir():
        candidates = [path / "tokenizer.model", path / "tokenizer.json"]
        candidates += sorted(p for p in path.glob("*.json") if p.name != CONFIG_FILE)
        found = [p for p in candidates if p.exists()]
        if not found:
            raise FileNotFoundError(f"{path} holds no tokenizer.model or tokenizer .json")
        path = found[0]
    return path


def _is_hf_json(path: Path) -> bool:
    try:
        return is_hf_tokenizer_json(json.loads(path.read_text()))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a tokenizer: not valid JSON") from None


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | os.PathLike,
    *,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    seed: int = 0,
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
    verbose: bool = True,
) -> AnyTokenizer:
    """Trains on `texts` and writes `out_path` (.model for bpe/unigram, .json for char).

    Sentencepiece reads one training "sentence" per line, so documents are written out
    line by line; newlines themselves are covered by byte fallback.
    """
    out_path = Path(out_path)
    check_vocab_size(vocab_size, model_type)
    if model_type == "char":
        tok = CharTokenizer.build(texts)
        tok.save(out_path)
        return tok
    spm.set_random_generator_seed(seed)  # sentence sampling is seeded: same input, same model
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus.txt")
        n_lines = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for text in texts:
                for line in text.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
                        n_lines += 1
        if n_lines == 0:
            raise ValueError("no text to train the tokenizer on")
        prefix = Path(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_prefix=str(prefix),
                model_type=model_type,
                vocab_size=vocab_size,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                character_coverage=0.9995,
                user_defined_symbols=list(CHAT_TOKENS),
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                pad_piece=PAD,
                unk_piece=UNK,
                bos_piece=BOS,
                eos_piece=EOS,
                max_sentence_length=MAX_SENTENCE_BYTES,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                num_threads=num_threads or min(2, os.cpu_count() or 1),
                minloglevel=0 if verbose else 2,  # sentencepiece logs its progress to stderr
            )
        except RuntimeError as error:
            raise _vocab_error(error, model_type) from error
        out_path.write_bytes(Path(f"{prefix}.model").read_bytes())
    return Tokenizer.load(out_path)

"""A copy of a tokenizer's files with special tokens appended to its vocabulary.

The new tokens take the ids right after the tokenizer's last one, in the order given, so
every id the tokenizer had keeps its meaning. Two formats can grow:
  - a Hugging Face tokenizer.json: `tokenizers`' own `add_special_tokens` (matched in text
    before the model splits it, never normalised); tokenizer_config.json is copied as is;
  - a sentencepiece model: USER_DEFINED pieces appended to its ModelProto, which
    sentencepiece matches in text as whole pieces (how `data.tokenizer` trains the chat
    tokens into its own models).
A character tokenizer always has the project's special tokens, so it never needs this.
The output depends only on the input files and the tokens, so a resumed stage writes the
same bytes (the same sha256 identity, train/saved_model.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from data.hf_tokenizer import CONFIG_FILE


def add_special_tokens(src: Path, dst: Path, tokens: Sequence[str]) -> list[Path]:
    """Writes the tokenizer of directory `src` with `tokens` added into directory `dst`
    (created); returns the files written. ValueError for a tokenizer that cannot grow."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if (src / "tokenizer.model").exists():
        _add_to_sentencepiece(src / "tokenizer.model", dst / "tokenizer.model", tokens)
        return [dst / "tokenizer.model"]
    if (src / "tokenizer.json").exists() and (src / CONFIG_FILE).exists():
        _add_to_tokenizer_json(src / "tokenizer.json", dst / "tokenizer.json", tokens)
        shutil.copyfile(src / CONFIG_FILE, dst / CONFIG_FILE)
        return [dst / "tokenizer.json", dst / CONFIG_FILE]
    raise ValueError(
        f"cannot add the tokens {list(tokens)} to the tokenizer in {src}: it is neither a "
        "sentencepiece tokenizer.model nor a tokenizer.json with its tokenizer_config.json"
    )


def _add_to_tokenizer_json(src: Path, dst: Path, tokens: Sequence[str]) -> None:
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_file(str(src))
    before = backend.get_vocab_size(with_added_tokens=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    ids = [backend.token_to_id(t) for t in tokens]
    if ids != list(range(before, before + len(tokens))):
        raise ValueError(f"{src}: the tokens {list(tokens)} did not get new ids (got {ids})")
    dst.write_text(backend.to_str(pretty=True))


def _add_to_sentencepiece(src: Path, dst: Path, tokens: Sequence[str]) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(src.read_bytes())
    known = {p.piece for p in proto.pieces}
    taken = [t for t in tokens if t in known]
    if taken:
        raise ValueError(f"{src} already has the pieces {taken}; nothing to add")
    for token in tokens:
        piece = proto.pieces.add()
        piece.piece = token
        piece.score = 0.0
        piece.type = pb.ModelProto.SentencePiece.USER_DEFINED
    dst.write_bytes(proto.SerializeToString(deterministic=True))

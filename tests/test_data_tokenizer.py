"""Tokenizers: exact round trip on the whole default corpus, special tokens, char recipe."""

from pathlib import Path

import pytest

from data.sources import iter_documents
from data.tokenizer import (
    CHAT_TOKENS,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from tests.helpers import write_bpe_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def stdlib_texts():
    return [d.text for d in iter_documents("stdlib") if d.text is not None]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, stdlib_texts):
    path = tmp_path_factory.mktemp("tok") / "bpe.model"
    return train_tokenizer(
        stdlib_texts[::10], path, vocab_size=512, model_type="bpe", verbose=False
    )


def test_round_trip_every_stdlib_document(bpe, stdlib_texts):
    # The full default corpus (~12 MB, every file as read, before curation): ~5 s.
    assert len(stdlib_texts) > 300
    encoded = bpe.encode_batch(stdlib_texts, num_threads=2)
    pairs = zip(stdlib_texts, encoded, strict=True)
    bad = [i for i, (t, ids) in enumerate(pairs) if bpe.decode(ids) != t]
    assert not bad, f"{len(bad)} documents do not round-trip"
    assert max(max(ids) for ids in encoded if ids) < bpe.vocab_size


def test_unigram_round_trip_and_odd_text(tmp_path, stdlib_texts):
    tok = train_tokenizer(
        stdlib_texts[::25],
        tmp_path / "u.model",
        vocab_size=600,
        model_type="unigram",
        verbose=False,
    )
    odd = "  leading\n\n\ttabs\r\n trailing  \x00 日本語 emoji 🙂 Ωmega\u00a0nbsp   \n"
    assert tok.decode(tok.encode(odd)) == odd
    for text in stdlib_texts[1::40]:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens(bpe, tmp_path):
    ids = {bpe.pad_id, bpe.bos_id, bpe.eos_id, *(bpe.special_id(t) for t in CHAT_TOKENS)}
    assert len(ids) == 3 + len(CHAT_TOKENS) and bpe.pad_id == 0
    # chat-role tokens are single tokens when written in text (for SFT templates)
    assert bpe.encode("<|user|>") == [bpe.special_id("<|user|>")]
    with pytest.raises(KeyError):
        bpe.special_id("<|nope|>")
    # control tokens decode to nothing
    assert bpe.decode([bpe.bos_id, *bpe.encode("x = 1"), bpe.eos_id]) == "x = 1"


def test_load_tokenizer_picks_class(tmp_path, bpe):
    model = tmp_path / "t.model"
    model.write_bytes(bpe.sp.serialized_model_proto())
    assert isinstance(load_tokenizer(model), Tokenizer)
    char = train_tokenizer(["hello world"], tmp_path / "c.json", model_type="char")
    assert isinstance(load_tokenizer(tmp_path / "c.json"), CharTokenizer)
    assert load_tokenizer(tmp_path / "c.json").encode("hello") == char.encode("hello")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")


def test_char_tokenizer_interface(tmp_path):
    tok = CharTokenizer.build(["To be, or not to be:\nthat is the question."])
    tok.save(tmp_path / "c.json")
    tok = CharTokenizer.load(tmp_path / "c.json")
    text = "<|user|>not to be\n<|end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.special_id("<|user|>") and ids[-1] == tok.special_id("<|end|>")
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *tok.encode("be"), tok.eos_id, tok.pad_id]) == "be"
    assert tok.decode(tok.encode("z")) == "\ufffd"  # unknown character
    # an id past the vocabulary (a padded embedding table's spare row) reads as unknown
    assert tok.decode([*tok.encode("be"), tok.vocab_size + 5, -1]) == "be\ufffd\ufffd"


def test_ids_past_a_sentencepiece_vocabulary_decode_as_unknown(bpe):
    ids = bpe.encode("def f():")
    assert bpe.decode([*ids, bpe.vocab_size + 3]) == bpe.decode([*ids, bpe.sp.unk_id()])
    assert bpe.decode([*ids, bpe.vocab_size + 3]).startswith("def f():")


@pytest.mark.skipif(
    not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} is absent (shared test data, never committed)"
)
def test_char_tokenizer_on_tinyshakespeare(tmp_path):
    text = SHAKESPEARE.read_text()
    tok = train_tokenizer([text], tmp_path / "s.json", model_type="char")
    assert tok.vocab_size == 65 + 8  # nanoGPT's 65 characters + the shared special tokens
    assert tok.decode(tok.encode(text[:5000])) == text[:5000]


LITERAL = 'print("<|user|> asked, <|assistant|> said <|end|>")\n# <|endoftext|> <s></s>\n'


def _specials(tok, names) -> set[int]:
    return {tok.bos_id, tok.eos_id, *(tok.special_id(n) for n in names)}


def test_corpus_text_that_writes_chat_tokens_keeps_them_as_text(bpe, tmp_path):
    char = CharTokenizer.build([LITERAL])
    for tok in (bpe, char):
        ids = tok.encode(LITERAL, match_special=False)
        assert tok.decode(ids) == LITERAL and not set(ids) & _specials(tok, CHAT_TOKENS)
        assert tok.encode_batch([LITERAL, "x"], match_special=False) == [
            ids,
            tok.encode("x", match_special=False),
        ]
        assert tok.encode("<|user|>") == [tok.special_id("<|user|>")]  # templates still do
    assert bpe.encode("def f(x):\n", match_special=False) == bpe.encode("def f(x):\n")


def test_hf_corpus_text_that_writes_a_special_token_keeps_it_as_text(tmp_path):
    import json

    from data.hf_tokenizer import HFTokenizer

    write_bpe_tokenizer(tmp_path, ["<|endoftext|>", *CHAT_TOKENS])
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer.load(tmp_path / "tokenizer.json")
    ids = tok.encode(LITERAL, match_special=False)
    assert tok.decode(ids) == LITERAL and not set(ids) & _specials(tok, CHAT_TOKENS)
    assert tok.encode_batch([LITERAL], match_special=False) == [ids]
    assert not tok.backend.encode_special_tokens  # the backend's setting is restored
    # prompts and templates still get the special tokens
    assert tok.encode("a<|endoftext|>")[-1] == tok.eos_id
    assert tok.encode("<|user|>") == [tok.special_id("<|user|>")]

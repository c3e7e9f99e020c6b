"""A Hugging Face `tokenizer.json` (e.g. GPT-2's or Llama 3's byte-level BPE) behind
this project's tokenizer interface, through the `tokenizers` library.

bos, eos and pad come from the `tokenizer_config.json` beside the file (as
`model.hf.tokenizer_files` writes it on import). A model without a pad
token (GPT-2) pads with eos: padding is masked by segment ids everywhere,
so the id only fills space, and the sampler writes it after a row's eos.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _Backend

CONFIG_FILE = "tokenizer_config.json"


def is_hf_tokenizer_json(spec: dict) -> bool:
    """Whether a parsed .json file is a `tokenizers` serialisation (it has a model)."""
    return isinstance(spec.get("model"), dict)


def _token(entry) -> str | None:
    return entry.get("content") if isinstance(entry, dict) else entry


class HFTokenizer:
    """`tokenizers.Tokenizer` with the interface of `data.tokenizer.Tokenizer`."""

    def __init__(self, backend: _Backend, bos: str, eos: str, pad: str | None = None):
        self.backend = backend
        ids = {}
        for role, token in (("bos", bos), ("eos", eos), ("pad", pad or eos)):
            ids[role] = backend.token_to_id(token)
            if ids[role] is None:
                raise ValueError(f"{role} token {token!r} is not in the tokenizer's vocabulary")
        self._bos, self._eos, self._pad = ids["bos"], ids["eos"], ids["pad"]

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        path = Path(path)
        config_path = path.parent / CONFIG_FILE
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} (naming bos and eos tokens) does not exist")
        config = json.loads(config_path.read_text())
        bos, eos = _token(config.get("bos_token")), _token(config.get("eos_token"))
        if not eos:
            raise ValueError(f"{config_path} names no eos_token")
        return cls(_Backend.from_file(str(path)), bos or eos, eos, _token(config.get("pad_token")))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    pad_id = property(lambda self: self._pad)
    bos_id = property(lambda self: self._bos)
    eos_id = property(lambda self: self._eos)

    def special_id(self, name: str) -> int:
        idx = self.backend.token_to_id(name)
        if idx is None:
            raise KeyError(f"tokenizer has no special token {name!r}")
        return idx

    @contextlib.contextmanager
    def _special_text(self, match_special: bool) -> Iterator[None]:
        """While open, special-token text in the input is that token (`match_special`) or
        plain text; the backend's own setting is restored after."""
        before = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = not match_special
        try:
            yield
        finally:
            self.backend.encode_special_tokens = before

    def encode(self, text: str, *, match_special: bool = True) -> list[int]:
        """Ids of `text`; with `match_special=False` (corpus text, which is only ever text)
        a special token's text, e.g. "<|endoftext|>", is encoded as the characters it is."""
        # No bos/eos added: callers add them, as with the sentencepiece tokenizer.
        with self._special_text(match_special):
            return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(
        self, texts: Sequence[str], num_threads: int = 0, *, match_special: bool = True
    ) -> list[list[int]]:
        with self._special_text(match_special):
            encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def piece(self, id_: int) -> str:
        """The vocabulary entry of an id, as the tokenizer stores it (for display)."""
        return self.backend.id_to_token(id_)

    def decode(self, ids: Sequence[int]) -> str:
        skip = {self._pad, self._bos, self._eos}
        kept = [int(i) for i in ids if int(i) not in skip]
        return self.backend.decode(kept, skip_special_tokens=False)

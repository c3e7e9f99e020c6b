"""Corpus sources: turn a corpus spec into a stream of raw documents.

Spec forms:
  stdlib              - the running interpreter's standard library (.py, tests excluded)
  stdlib:holdout=F    - the same without the fraction F of files held out for the
                        post-training evaluation (`is_held_out`), so that evaluation
                        never asks for a function the model read during pretraining
  python              - the standard library, then every site-packages folder of the
                        running interpreter (data.packages), .py files, tests excluded;
                        each document carries its package and licence
  python:holdout=F    - the same without the held-out standard-library files
  text:PATH           - a text file or a folder of files (walked in sorted order)
  text:PATH:val_tail=F - the same, its validation split the contiguous last fraction F of
                        the text (by characters, cut at a line start: `tail_cut`), as
                        nanoGPT splits its corpora: every document carries its split, so
                        data.prepare does not hash documents into splits for it, and
                        curation keeps both splits whole (no quality or duplicate drops);
                        not with max_docs, which would cut the tail off
  jsonl:PATH:FIELD    - JSON Lines file (or folder of *.jsonl), text in FIELD
  tfds:NAME[:FIELD]   - a TFDS catalog dataset (train split), text in FIELD (default "text"),
                        already prepared in array_record format under the TFDS data dir
                        (`tfds_data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets):
                        nothing here downloads, and nothing is written outside the output
                        folder; prepare it first where there is network, e.g.
                        `tfds build NAME --data_dir=DIR --file_format=array_record`

With a holdout, `held_out_documents` yields the held-out files themselves, so that
curation can also drop copies of them found elsewhere (a vendored backport in
site-packages, say).

Sources never raise on bad *content*: a file that is binary, empty, not UTF-8, or
a JSONL line that is not JSON, lacks the field or holds a lone surrogate becomes a
`RawDocument` with an `error` reason, so the curation report counts it. A missing path,
an unknown TFDS name or a TFDS dataset that is not prepared raises `CorpusError` naming
it, before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from data import packages

CODE_EXTENSIONS = frozenset(
    ".py .pyi .pyx .c .h .cc .cpp .cxx .hpp .hh .js .jsx .ts .tsx .java .go .rs .rb .sh .bash"
    " .pl .pm .lua .swift .kt .scala .cs .php .r .jl .hs .ml .sql .toml .yaml .yml .json .xml"
    " .html .htm .css .tex .cmake .mk .bat .ps1 .el .vim .f90 .zig".split()
)
# Folders that are never corpus content when walking a directory.
_SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", "node_modules", ".venv"})
# A prose file larger than this is cut at blank lines into documents of about this size,
# so one big book (e.g. tinyshakespeare) yields many documents for the hash split.
PROSE_CHUNK_CHARS = 8192


class CorpusError(ValueError):
    """A corpus that cannot be read or yields nothing usable; the message names the file."""


@dataclasses.dataclass
class RawDocument:
    name: str  # file path, "path:line" or "tfds:name[i]"; shown in report examples
    kind: str  # "code" or "prose": selects the quality rules
    text: str | None  # None when `error` is set
    # The document's bytes, which the report's counts add up: its text's UTF-8 bytes; for
    # one that could not be read, the raw bytes (a JSONL record: its whole line)
    nbytes: int
    error: str | None = None  # drop reason found while reading
    package: str | None = None  # python corpus: the distribution (or "stdlib")
    license: str | None = None  # python corpus: the distribution's licence
    split: str | None = None  # "train" | "val" when the spec fixes it (val_tail), else None


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    kind: str  # stdlib | python | text | jsonl | tfds
    path: str = ""
    field: str = "text"
    holdout: float = 0.0  # stdlib, python: fraction of stdlib files left out (is_held_out)
    val_tail: float = 0.0  # text: fraction of the text, at its end, that is the val split

    def __str__(self) -> str:
        if self.kind in _HOLDOUT_KINDS:
            return f"{self.kind}:holdout={self.holdout}" if self.holdout else self.kind
        if self.kind == "text":
            tail = f":val_tail={self.val_tail}" if self.val_tail else ""
            return f"text:{self.path}{tail}"
        return f"{self.kind}:{self.path}:{self.field}"


_HOLDOUT_KINDS = ("stdlib", "python")


def parse_spec(spec: str) -> CorpusSpec:
    """Parses a corpus spec string; raises CorpusError with the accepted forms."""
    kind, _, rest = spec.partition(":")
    if kind in _HOLDOUT_KINDS and not rest:
        return CorpusSpec(kind)
    if kind in _HOLDOUT_KINDS and rest.startswith("holdout="):
        try:
            holdout = float(rest.removeprefix("holdout="))
        except ValueError:
            holdout = -1.0
        if not 0.0 <= holdout < 1.0:
            raise CorpusError(f"{kind}:holdout=F needs 0 <= F < 1, got {spec!r}")
        return CorpusSpec(kind, holdout=holdout)
    if kind == "text" and rest:
        path, sep, option = rest.rpartition(":val_tail=")
        if not sep:
            return CorpusSpec("text", rest)
        try:
            val_tail = float(option)
        except ValueError:
            val_tail = -1.0
        if not path or not 0.0 < val_tail < 1.0:
            raise CorpusError(f"text:PATH:val_tail=F needs a path and 0 < F < 1, got {spec!r}")
        return CorpusSpec("text", path, val_tail=val_tail)
    if kind == "jsonl" and rest:
        path, sep, field = rest.rpartition(":")
        if not sep or not path or not field:
            raise CorpusError(f"jsonl spec needs a field: jsonl:PATH:FIELD, got {spec!r}")
        return CorpusSpec("jsonl", path, field)
    if kind == "tfds" and rest:
        name, sep, field = rest.partition(":")
        return CorpusSpec("tfds", name, field if sep else "text")
    raise CorpusError(
        f"unknown corpus spec {spec!r}; use stdlib[:holdout=F], python[:holdout=F], "
        "text:PATH[:val_tail=F], jsonl:PATH:FIELD or tfds:NAME"
    )


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(
    root: str | Path | None = None, skip_dirs: frozenset[str] = frozenset()
) -> list[Path]:
    """The standard library's .py files, without site-packages and test suites (~12 MB);
    `root` walks another folder the same way, `skip_dirs` leaves out more folders."""
    root = Path(root) if root else stdlib_root()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    skip |= skip_dirs
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def is_held_out(relative_path: str, fraction: float) -> bool:
    """Whether a file belongs to the held-out fraction, by a stable hash of its path
    relative to the corpus root; the one split rule that pretraining data
    (`stdlib:holdout=F`) and post-training evaluation (rlhf/stdlib_tasks.py) share."""
    bucket = int(hashlib.sha1(relative_path.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def _stdlib_documents(
    holdout: float, held_out: bool = False, labelled: bool = False
) -> Iterator[RawDocument]:
    """The kept files, or with `held_out` the held-out ones; `labelled` adds the
    package and licence fields."""
    root = stdlib_root()
    for path in stdlib_files():
        if is_held_out(str(path.relative_to(root)), holdout) == held_out:
            for doc in _file_documents(path, "code"):
                if labelled:
                    doc.package, doc.license = packages.STDLIB_PACKAGE, packages.STDLIB_LICENSE
                yield doc


def _python_documents(holdout: float) -> Iterator[RawDocument]:
    """Standard library first (so its copy of a vendored module is the one kept), then
    each site-packages folder, every document labelled with its package and licence."""
    yield from _stdlib_documents(holdout, labelled=True)
    for site_dir in packages.site_packages_dirs():
        owners = packages.file_owners(site_dir)
        for path in stdlib_files(site_dir):
            owner = packages.owner_of(path, site_dir, owners)
            for doc in _file_documents(path, "code"):
                doc.package, doc.license = owner.package, owner.license
                yield doc


def held_out_documents(spec: CorpusSpec | str) -> Iterator[RawDocument]:
    """The held-out standard-library files of a stdlib or python spec (none otherwise):
    curation drops any document that is an exact or near copy of one of them."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind in _HOLDOUT_KINDS and spec.holdout > 0:
        yield from _stdlib_documents(spec.holdout, held_out=True)


def _walk(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return files


def _require(path: Path) -> None:
    if not path.exists():
        raise CorpusError(f"corpus path does not exist: {path}")


def decode_bytes(data: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for empty, binary or non-UTF-8 content."""
    if not data.strip():
        return None, "empty"
    if b"\x00" in data[:65536]:  # NUL bytes do not occur in text; cheap binary test
        return None, "binary"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "invalid_utf8"


def _utf8_size(text: str) -> int | None:
    """Bytes of `text` in UTF-8, or None when it holds a lone surrogate, which no UTF-8
    encodes (JSON may write one, "\\ud800"): such text is `invalid_utf8`, never an error."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


# A line end as curation's normalisation reads one (\r\n, a lone \r, \n), so CRLF and old
# Mac text is cut into the same pieces as its \n form; a \r\n is never split in two.
_NEWLINE = r"(?:\r\n|\r(?!\n)|\n)"
_PARAGRAPH_BREAK = re.compile(rf"({_NEWLINE}[ \t]*{_NEWLINE})")


def _chars(text: str) -> int:
    """Length with each \\r\\n counted as one character, as it is after normalisation."""
    return len(text) - text.count("\r\n")


def split_prose(text: str, chunk_chars: int = PROSE_CHUNK_CHARS) -> list[str]:
    """Cuts text at blank lines into pieces of about `chunk_chars`; ''.join(pieces) == text.
    Text with \\r\\n or \\r line ends is cut where its \\n form is."""
    if _chars(text) <= chunk_chars:
        return [text]
    parts = _PARAGRAPH_BREAK.split(text)  # [para, sep, para, sep, ...]
    pieces, current, size = [], [], 0
    for i in range(0, len(parts), 2):
        chunk = parts[i] + (parts[i + 1] if i + 1 < len(parts) else "")
        current.append(chunk)
        size += _chars(chunk)
        if size >= chunk_chars:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


def _file_documents(path: Path, kind: str | None = None) -> Iterator[RawDocument]:
    data = path.read_bytes()
    kind = kind or ("code" if path.suffix.lower() in CODE_EXTENSIONS else "prose")
    text, error = decode_bytes(data)
    if error:
        yield RawDocument(str(path), kind, None, len(data), error)
        return
    yield from _text_documents(str(path), kind, text)


def _text_documents(
    name: str, kind: str, text: str, split: str | None = None
) -> Iterator[RawDocument]:
    """One document, or for prose the pieces of `split_prose`, named NAME#i."""
    pieces = split_prose(text) if kind == "prose" else [text]
    for i, piece in enumerate(pieces):
        piece_name = name if len(pieces) == 1 else f"{name}#{i}"
        yield RawDocument(piece_name, kind, piece, len(piece.encode("utf-8")), split=split)


def tail_cut(text: str, fraction: float) -> int | None:
    """Where the last `fraction` of `text` begins: the first line start at or after
    len(text) * (1 - fraction), else (no line starts after it) the last one before it, so
    no line is split between train and val and neither is empty. None when the text is
    one line: it has no line start to cut at."""
    at = int(len(text) * (1.0 - fraction))
    after = text.find("\n", max(at - 1, 0))  # a newline at at-1 makes `at` a line start
    if 0 <= after < len(text) - 1:
        return after + 1
    before = text.rfind("\n", 0, max(at - 1, 0))
    return before + 1 if before >= 0 else None


def _tail_split_documents(root: Path, fraction: float) -> Iterator[RawDocument]:
    """The files of `root` in walk order as one text: before the cut train, after it val.

    The file the cut falls in is split there into two documents, NAME@train and NAME@val,
    so the val split is exactly the contiguous tail of the text, the same on every run.
    Unreadable files still become error documents (they hold no text, so no split).
    """
    files = []
    for path in _walk(root):
        data = path.read_bytes()
        kind = "code" if path.suffix.lower() in CODE_EXTENSIONS else "prose"
        text, error = decode_bytes(data)
        files.append((path, kind, text, len(data), error))
    cut = tail_cut("".join(text for _, _, text, _, error in files if not error), fraction)
    if cut is None:
        raise CorpusError(
            f"text:{root}:val_tail={fraction}: the text is one line, so it has no line start "
            "to cut the val tail at; break it into lines, or leave out :val_tail=F"
        )
    start = 0  # offset of the current file in the joined text
    for path, kind, text, nbytes, error in files:
        if error:
            yield RawDocument(str(path), kind, None, nbytes, error)
            continue
        local = min(max(cut - start, 0), len(text))
        if 0 < local < len(text):
            yield from _text_documents(f"{path}@train", kind, text[:local], "train")
            yield from _text_documents(f"{path}@val", kind, text[local:], "val")
        else:
            yield from _text_documents(str(path), kind, text, "train" if local else "val")
        start += len(text)


def _jsonl_documents(path: Path, field: str) -> Iterator[RawDocument]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank separator lines are not documents
            name = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                yield RawDocument(name, "prose", None, len(line), "invalid_utf8")
                continue
            except ValueError:
                yield RawDocument(name, "prose", None, len(line), "jsonl_invalid_json")
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                yield RawDocument(name, "prose", None, len(line), "jsonl_missing_field")
                continue
            nbytes = _utf8_size(text)
            if nbytes is None:
                yield RawDocument(name, "prose", None, len(line), "invalid_utf8")
                continue
            yield RawDocument(name, "prose", text, nbytes)


def _tfds_builder(name: str, data_dir: str | None):
    """The builder of an already prepared TFDS dataset; CorpusError (one line) otherwise."""
    import tensorflow_datasets as tfds  # lazy: slow import, only needed for this source

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # tfds warns about the folders it does not find
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
        raise CorpusError(
            f"no TFDS dataset named {name!r}; list the names with python -c 'import "
            "tensorflow_datasets as tfds; print(tfds.list_builders())'"
        ) from None
    except (ValueError, AssertionError) as error:  # a config or version it does not have
        raise CorpusError(f"tfds:{name}: {str(error).splitlines()[0]}") from None
    finally:
        absl_logger.setLevel(level)
    if not prepared:
        raise CorpusError(
            f"tfds:{name} is not prepared in {builder.data_dir} and data.prepare does not "
            f"download; prepare it first (tfds build {name} --data_dir={builder.data_dir_root} "
            "--file_format=array_record), or point --tfds_data_dir at a folder that has it"
        )
    return builder


def _tfds_documents(
    name: str, field: str, data_dir: str | None, max_docs: int | None
) -> Iterator[RawDocument]:
    # A data source reads array_record by random access and needs no TensorFlow.
    source = _tfds_builder(name, data_dir).as_data_source(split="train")
    n = len(source) if max_docs is None else min(len(source), max_docs)
    for i in range(n):
        record = source[i]
        doc_name = f"tfds:{name}[{i}]"
        value = record.get(field) if isinstance(record, dict) else None
        if value is None:
            yield RawDocument(doc_name, "prose", None, 0, "tfds_missing_field")
            continue
        if isinstance(value, bytes):
            text, error = decode_bytes(value)
            if error:
                yield RawDocument(doc_name, "prose", None, len(value), error)
                continue
        else:
            text = str(value)
            if _utf8_size(text) is None:
                nbytes = len(text.encode("utf-8", "surrogatepass"))
                yield RawDocument(doc_name, "prose", None, nbytes, "invalid_utf8")
                continue
        for j, piece in enumerate(split_prose(text)):
            yield RawDocument(f"{doc_name}#{j}", "prose", piece, len(piece.encode("utf-8")))


def check_spec(
    spec: CorpusSpec, tfds_data_dir: str | None = None, max_docs: int | None = None
) -> None:
    """Fails early (before any output is touched) on a missing path or TFDS dataset, or on
    max_docs with val_tail (the documents read first would leave out the tail)."""
    if max_docs is not None and spec.val_tail:
        raise CorpusError(
            f"max_docs cannot be used with {spec}: reading only the first documents would "
            "leave out the tail that val_tail makes the val split; leave out one of them"
        )
    if spec.kind in ("text", "jsonl"):
        _require(Path(spec.path))
    if spec.kind == "tfds":
        _tfds_builder(spec.path, tfds_data_dir)


def iter_documents(
    spec: CorpusSpec | str,
    *,
    max_docs: int | None = None,
    tfds_data_dir: str | None = None,
) -> Iterator[RawDocument]:
    """Raw documents of a corpus in a deterministic order (at most `max_docs`)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    check_spec(spec, tfds_data_dir, max_docs)
    if spec.kind == "stdlib":
        stream = _stdlib_documents(spec.holdout)
    elif spec.kind == "python":
        stream = _python_documents(spec.holdout)
    elif spec.kind == "text" and spec.val_tail:
        stream = _tail_split_documents(Path(spec.path), spec.val_tail)
    elif spec.kind == "text":
        stream = (d for p in _walk(Path(spec.path)) for d in _file_documents(p))
    elif spec.kind == "jsonl":
        root = Path(spec.path)
        files = [root] if root.is_file() else [p for p in _walk(root) if p.suffix == ".jsonl"]
        stream = (d for p in files for d in _jsonl_documents(p, spec.field))
    else:
        stream = _tfds_documents(spec.path, spec.field, tfds_data_dir, max_docs)
    for i, doc in enumerate(stream):
        if max_docs is not None and i >= max_docs:
            return
        yield doc

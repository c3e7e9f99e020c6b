"""The embedded post-training data, mined from Python source files with `ast`.

SFT: the instruction is a function's signature and docstring, the answer the
function's whole source. Preferences: chosen = the real function, rejected =
a controlled corruption of it (`CORRUPTIONS`). Train and eval are split by
file (a stable hash of its path), so no file feeds both sides. Optionally the
installed packages add training tasks (`package_files`); any of them with the
header or source of an evaluation task (a vendored copy) is dropped. Nothing
mined here is ever executed.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import random
import re
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

from data import packages, sources
from rlhf.verifier import module_names, parse, top_level_functions, uses_undefined_names

CORRUPTIONS = ("other_body", "truncation", "shuffled_lines", "renamed_identifiers", "broken_syntax")
_SKIP_DIRS = frozenset({"idlelib", "turtledemo"})  # GUI code: few self-contained functions


@dataclasses.dataclass(frozen=True)
class FunctionTask:
    file: str  # path relative to the corpus root: the unit of the train/eval split
    name: str
    header: str  # `def ...:` through the docstring, dedented
    body: tuple[str, ...]  # the lines after the docstring, as written (dedented like header)
    # Names bound at the top of the file (rlhf.verifier.module_names): the verifier's
    # undefined-names check counts them as known.
    module_names: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return "\n".join([self.header, *self.body])

    @property
    def instruction(self) -> str:
        return f"Write the Python function `{self.name}`:\n\n{self.header}"


def stdlib_files(root: str | None = None, max_files: int | None = None) -> list[Path]:
    """Sorted .py files under `root` (default: this interpreter's standard library), as
    pretraining reads them, less the GUI demo folders."""
    files = sorted(sources.stdlib_files(root, skip_dirs=_SKIP_DIRS))
    return files[:max_files] if max_files else files


def package_files(limit: int) -> list[tuple[Path, Path]]:
    """(file, its site-packages folder) for `limit` .py files of the installed packages,
    chosen by a stable hash of their relative path (a spread over many packages rather
    than the alphabetically first ones)."""
    found = [
        (path, site_dir)
        for site_dir in packages.site_packages_dirs()
        for path in sources.stdlib_files(site_dir, skip_dirs=_SKIP_DIRS)
    ]
    key = lambda item: hashlib.sha1(str(item[0].relative_to(item[1])).encode()).hexdigest()
    return sorted(found, key=key)[:limit]


def _string_continuation_lines(node: ast.AST) -> set[int]:
    """Line numbers (1-based) inside a string literal that spans lines: their text is the
    string's, so no indentation may be taken off them."""
    return {
        line
        for n in ast.walk(node)
        if isinstance(n, ast.JoinedStr)
        or (isinstance(n, ast.Constant) and isinstance(n.value, str | bytes))
        for line in range(n.lineno + 1, n.end_lineno + 1)
    }


def _body_lines(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The function's source lines after its docstring, exactly as written (blank lines
    kept), less the def's indentation; lines inside a string literal are left whole."""
    def_line = lines[node.lineno - 1]
    indent = def_line[: len(def_line) - len(def_line.lstrip())]
    verbatim = _string_continuation_lines(node)
    body = []
    for number in range(node.body[0].end_lineno + 1, node.end_lineno + 1):
        line = lines[number - 1]
        dedent = number not in verbatim and line.startswith(indent)
        body.append(line[len(indent) :] if dedent else line)
    return body


def mine_file(path: Path, root: Path, max_chars: int = 1200) -> list[FunctionTask]:
    """Documented functions of one file with a non-empty body of at most `max_chars`."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    # ast numbers lines by \n only (read_text made \r\n and \r into \n); str.splitlines
    # would also split at form feeds and other separators and shift every later line.
    lines = text.split("\n")
    known = tuple(module_names(tree))
    tasks = []
    for node in top_level_functions(tree):
        if ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        doc_end = node.body[0].end_lineno
        header = textwrap.dedent("\n".join(lines[node.lineno - 1 : doc_end]))
        body = tuple(_body_lines(lines, node))
        task = FunctionTask(str(path.relative_to(root)), node.name, header, body, known)
        has_code = any(line.strip() for line in body)
        if has_code and len(task.source) <= max_chars and _passes_its_own_checks(task):
            tasks.append(task)
    return tasks


def split_of(file: str, eval_fraction: float) -> str:
    """'eval' or 'train' by the rule that also keeps eval files out of pretraining."""
    return "eval" if sources.is_held_out(file, eval_fraction) else "train"


def _passes_its_own_checks(task: FunctionTask) -> bool:
    """Compiles alone, and uses no name its module does not bind (a few build names in
    `globals()` or in their class body): a reference that could not score full marks
    would teach nothing."""
    tree = parse(task.source)
    return tree is not None and not uses_undefined_names(tree, task.module_names)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except SyntaxError:
        return False


# ------------------------------------------------------------------------ corruptions


def _other_body(task, pool, rng):
    other = rng.choice(pool)
    return None if other.body == task.body else "\n".join([task.header, *other.body])


def _truncation(task, pool, rng):
    keep = rng.randint(0, max(len(task.body) - 1, 0))
    if keep == len(task.body):
        return None
    return "\n".join([task.header, *task.body[:keep]])


def _shuffled_lines(task, pool, rng):
    body = list(task.body)

    def code(lines):  # moving blank lines alone would change nothing that matters
        return [line for line in lines if line.strip()]

    for _ in range(5):
        rng.shuffle(body)
        if code(body) != code(task.body):
            return "\n".join([task.header, *body])
    return None


def _renamed_identifiers(task, pool, rng):
    """Defines a different name, and renames one parameter in the body only, so the
    body refers to a name that no longer exists."""
    header = re.sub(rf"\bdef\s+{task.name}\b", f"def {task.name}_{rng.choice('xyz')}", task.header)
    body = "\n".join(task.body)
    params = [a.arg for a in ast.parse(task.source).body[0].args.args if a.arg != "self"]
    used = [p for p in params if re.search(rf"\b{p}\b", body)]
    if used:
        victim = rng.choice(used)
        body = re.sub(rf"\b{victim}\b", victim + "_", body)
    return f"{header}\n{body}"


def _broken_syntax(task, pool, rng):
    lines = list(task.body)
    i = rng.randrange(len(lines))
    edits = [lambda s: s + " (", lambda s: s.replace(":", "", 1), lambda s: "  " + s + " ]"]
    for edit in rng.sample(edits, len(edits)):
        candidate = "\n".join([task.header, *lines[:i], edit(lines[i]), *lines[i + 1 :]])
        if not _parses(candidate):
            return candidate
    return None


_CORRUPT = {
    "other_body": _other_body,
    "truncation": _truncation,
    "shuffled_lines": _shuffled_lines,
    "renamed_identifiers": _renamed_identifiers,
    "broken_syntax": _broken_syntax,
}


def corrupt(
    task: FunctionTask, kind: str, pool: Sequence[FunctionTask], rng: random.Random
) -> str | None:
    """The rejected answer of `kind` for `task`, or None if that corruption is a no-op."""
    return _CORRUPT[kind](task, pool, rng)


# ------------------------------------------------------------------------- datasets


def sft_record(task: FunctionTask) -> dict:
    return {
        "messages": [
            {"role": "user", "content": task.instruction},
            {"role": "assistant", "content": task.source},
        ],
        "name": task.name,
        "file": task.file,
        "module_names": list(task.module_names),
    }


def preference_records(
    tasks: Sequence[FunctionTask], seed: int = 0, kinds: Sequence[str] = CORRUPTIONS
) -> list[dict]:
    """One pair per (task, kind): {"prompt", "chosen", "rejected", "kind", "name", "file"}."""
    rng = random.Random(seed)
    records = []
    for task in tasks:
        for kind in kinds:
            rejected = corrupt(task, kind, tasks, rng)
            if rejected is None or rejected == task.source:
                continue
            records.append(
                {
                    "prompt": [{"role": "user", "content": task.instruction}],
                    "chosen": task.source,
                    "rejected": rejected,
                    "kind": kind,
                    "name": task.name,
                    "file": task.file,
                }
            )
    return records


def build_datasets(
    root: str | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
    max_files: int | None = None,
    max_chars: int = 1200,
    num_package_files: int = 0,
) -> dict[str, list[dict]]:
    """{"sft_train", "sft_eval", "pairs_train", "pairs_eval"}, split by file; with
    `num_package_files`, that many files of the installed packages add training tasks."""
    root_path = Path(root) if root else sources.stdlib_root()
    split: dict[str, list[FunctionTask]] = {"train": [], "eval": []}
    for path in stdlib_files(str(root_path), max_files):
        tasks = mine_file(path, root_path, max_chars)
        if tasks:
            split[split_of(tasks[0].file, eval_fraction)].extend(tasks)
    if num_package_files:
        seen = {t.header for t in split["eval"]} | {t.source for t in split["eval"]}
        for path, site_dir in package_files(num_package_files):
            for task in mine_file(path, site_dir, max_chars):
                if task.header not in seen and task.source not in seen:
                    split["train"].append(dataclasses.replace(task, file=f"site:{task.file}"))
    return {
        "sft_train": [sft_record(t) for t in split["train"]],
        "sft_eval": [sft_record(t) for t in split["eval"]],
        "pairs_train": preference_records(split["train"], seed),
        "pairs_eval": preference_records(split["eval"], seed + 1),
    }


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

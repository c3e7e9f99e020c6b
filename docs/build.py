"""Builds the guide: docs/chapters/*.md -> one Markdown file -> pandoc -> Typst -> PDF.

    python -m docs.build        (or `make guide`; output docs/_build/guide.pdf)

The toolchain is two PyPI wheels, the `docs` extra: `pypandoc-binary` (pandoc itself)
and `typst` (the Typst compiler); nothing is fetched at build time, and the fonts are
the ones built into Typst, so every machine renders the same pages.

Before pandoc sees a chapter, three directives are expanded from the repository, so that
no excerpt, table or generated snippet in the guide can drift from its source:

  code excerpt   a fenced block with an `include` attribute and an empty body:
                     ```{include="model/masking.py" symbol="attention_mask"}
                     ```
                 `symbol` is a function, class, method (`Class.method`) or module-level
                 assignment, found with `ast`; `start`/`end` narrow it (or the whole
                 file) to the lines from the first one containing `start` to the first
                 one after it containing `end`.
  table          <!-- table: BENCHMARKS.md | Heading text | N | Caption {#tbl:label} -->
                 the N-th table (1-based) under that heading, with its caption.
  snippet        <!-- include: docs/figures/curation_table.md -->   a Markdown file verbatim.

A directive that does not resolve stops the build with one line naming it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
CHAPTERS = DOCS / "chapters"
FIGURES = DOCS / "figures"
BUILD = DOCS / "_build"
TEMPLATE = DOCS / "template.typ"
LUA_FILTER = DOCS / "typst.lua"

# Symbols pandoc's Typst writer spells the pre-0.14 way, renamed since then.
_TYPST_RENAMES = {"dot.circle": "dot.o"}
_LANGUAGES = {".py": "python", ".sh": "bash", ".toml": "toml", ".cfg": "ini", ".md": "markdown"}
_FENCE = re.compile(r"^(`{3,})\{([^}]*\binclude=[^}]*)\}[ \t]*\n\1[ \t]*$", re.M)
_ATTR = re.compile(r'(\w+)="([^"]*)"')
_TABLE = re.compile(r"^<!-- table: (.+?) -->[ \t]*$", re.M)
_SNIPPET = re.compile(r"^<!-- include: (\S+) -->[ \t]*$", re.M)
_HEADING = re.compile(r"^(#+)\s+(.*?)\s*$")
# Repository paths a chapter names in its text: module files and folders.
_NAMED_PATH = re.compile(
    r"(?<![\w/.-])((?:model|data|train|rlhf|experiments|docs|tests)/(?:[\w.-]+/)*"
    r"(?:[\w.-]+\.(?:py|sh|md|typ|lua)\b)?)(?![\w.-])"
)


class GuideError(ValueError):
    """A directive or input that cannot be resolved; the message names it."""


# ------------------------------------------------------------------ code excerpts


@dataclasses.dataclass(frozen=True)
class Excerpt:
    path: str  # relative to the repository root
    symbol: str | None
    first_line: int  # 1-based, inclusive
    last_line: int
    text: str  # the lines, dedented


def _symbol_lines(tree: ast.Module, symbol: str, path: str) -> tuple[int, int]:
    """(first, last) line of a function, class, method or module-level assignment."""
    body: list[ast.stmt] = tree.body
    node: ast.stmt | None = None
    for part in symbol.split("."):
        node = next((n for n in body if _defines(n, part)), None)
        if node is None:
            raise GuideError(f"{path} has no {symbol!r} (looked for {part!r})")
        body = getattr(node, "body", [])
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return first, node.end_lineno


def _defines(node: ast.stmt, name: str) -> bool:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False


def extract(
    path: str, symbol: str | None = None, start: str | None = None, end: str | None = None
) -> Excerpt:
    """The excerpt a directive names, read from the repository now."""
    file = REPO / path
    if not file.is_file():
        raise GuideError(f"excerpt source {path} does not exist")
    lines = file.read_text(encoding="utf-8").splitlines()
    first, last = 1, len(lines)
    if symbol:
        first, last = _symbol_lines(ast.parse("\n".join(lines)), symbol, path)
        while first > 1 and lines[first - 2].strip().startswith("#"):  # the comment above
            first -= 1
    if start:
        hit = next((i for i in range(first, last + 1) if start in lines[i - 1]), None)
        if hit is None:
            raise GuideError(f"{path}{':' + symbol if symbol else ''} has no line with {start!r}")
        first = hit
        if not end:
            last = hit
    if end:
        hit = next((i for i in range(first, last + 1) if end in lines[i - 1]), None)
        if hit is None:
            raise GuideError(f"{path}{':' + symbol if symbol else ''} has no line with {end!r}")
        last = hit
    text = textwrap.dedent("\n".join(lines[first - 1 : last]))
    return Excerpt(path, symbol, first, last, text)


def _typst_string(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Typst string literal


def _render_excerpt(ex: Excerpt) -> str:
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", ex.text)), default=0))
    language = _LANGUAGES.get(Path(ex.path).suffix, "")
    label = (
        f"#source-label({_typst_string(ex.path)}, {_typst_string(ex.symbol or '')}, "
        f"{ex.first_line}, {ex.last_line})"
    )
    return f"```{{=typst}}\n{label}\n```\n\n{fence}{language}\n{ex.text}\n{fence}"


def expand_excerpts(markdown: str) -> tuple[str, list[Excerpt]]:
    """Replaces every include directive by the code it names; returns the excerpts too."""
    excerpts: list[Excerpt] = []

    def replace(match: re.Match) -> str:
        attrs = dict(_ATTR.findall(match.group(2)))
        unknown = set(attrs) - {"include", "symbol", "start", "end"}
        if unknown:
            raise GuideError(f"unknown excerpt attributes {sorted(unknown)} in {match.group(0)!r}")
        ex = extract(attrs["include"], attrs.get("symbol"), attrs.get("start"), attrs.get("end"))
        excerpts.append(ex)
        return _render_excerpt(ex)

    return _FENCE.sub(replace, markdown), excerpts


# ------------------------------------------------------------------ tables and snippets


def table_under_heading(path: str, heading: str, index: int = 1) -> str:
    """The `index`-th Markdown table under `heading` (before the next heading of its level)."""
    file = REPO / path
    if not file.is_file():
        raise GuideError(f"table source {path} does not exist")
    lines = file.read_text(encoding="utf-8").splitlines()
    level = None
    tables: list[list[str]] = []
    for i, line in enumerate(lines):
        m = _HEADING.match(line)
        if level is None:
            if m and m.group(2) == heading:
                level = len(m.group(1))
            continue
        if m and len(m.group(1)) <= level:
            break
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            tables.append([])
        if line.startswith("|"):
            tables[-1].append(line)
    if level is None:
        raise GuideError(f"{path} has no heading {heading!r}")
    if not 1 <= index <= len(tables):
        raise GuideError(f"{path}, under {heading!r}: no table {index} ({len(tables)} there)")
    return _proportional_widths(tables[index - 1])


def _proportional_widths(table: list[str]) -> str:
    """Rewrites the separator row so that column widths follow their content: pandoc sizes
    a wide pipe table's columns by the dashes of that row."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
    if len(rows) < 2:
        return "\n".join(table)
    widths = [0] * len(rows[1])
    for row in rows[:1] + rows[2:]:
        for j, cell in enumerate(row[: len(widths)]):
            widths[j] = max(widths[j], len(cell))
    separator = []
    for j, spec in enumerate(rows[1]):
        dashes = "-" * min(max(widths[j] // 2, 3), 60)
        left, right = spec.startswith(":"), spec.endswith(":")
        left = left or not right  # unaligned columns read best flush left
        separator.append((":" if left else "") + dashes + (":" if right else ""))
    return "\n".join([table[0], "| " + " | ".join(separator) + " |", *table[2:]])


def expand_tables(markdown: str) -> str:
    def replace(match: re.Match) -> str:
        parts = [p.strip() for p in match.group(1).split("|")]
        if len(parts) != 4:
            raise GuideError(f"table directive needs 'FILE | HEADING | N | CAPTION': {parts}")
        path, heading, index, caption = parts
        return f"{table_under_heading(path, heading, int(index))}\n\n: {caption}"

    return _TABLE.sub(replace, markdown)


def expand_snippets(markdown: str) -> str:
    def replace(match: re.Match) -> str:
        file = REPO / match.group(1)
        if not file.is_file():
            raise GuideError(
                f"snippet {match.group(1)} does not exist (run python -m docs.figures)"
            )
        return rewidth_tables(file.read_text(encoding="utf-8").strip())

    return _SNIPPET.sub(replace, markdown)


def rewidth_tables(markdown: str) -> str:
    """Every pipe table in `markdown` with column widths that follow its content."""
    out: list[str] = []
    table: list[str] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            out += _proportional_widths(table).splitlines()
            table = []
        out.append(line)
    return "\n".join(out[:-1])


# ------------------------------------------------------------------ the document


def chapter_files() -> list[Path]:
    files = sorted(CHAPTERS.glob("*.md"))
    if not files:
        raise GuideError(f"no chapters in {CHAPTERS}")
    return files


def named_paths(markdown: str) -> set[str]:
    """Repository paths (modules, folders) that a chapter's text names."""
    return {m.rstrip(".") for m in _NAMED_PATH.findall(markdown)}


def figure_references(markdown: str) -> set[str]:
    """Image files the Markdown embeds, relative to docs/."""
    return set(re.findall(r"!\[[^\]]*\]\(([^)\s]+)", markdown))


def assemble() -> tuple[str, list[Excerpt]]:
    """All chapters with every directive expanded: the Markdown pandoc reads."""
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in chapter_files())
    text = expand_snippets(text)
    text = expand_tables(text)
    return expand_excerpts(text)


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def toolchain_missing() -> str | None:
    """None when pandoc and Typst are importable, else what to install."""
    try:
        import pypandoc  # noqa: F401
        import typst  # noqa: F401
    except ImportError as error:
        return f"{error.name} is not installed: pip install -e '.[docs]' (or make guide)"
    return None


def markdown_to_pdf(
    markdown: str,
    out_pdf: Path,
    *,
    root: Path,
    image_root: str = "",
    variables: dict[str, str] | None = None,
    template: Path = TEMPLATE,
) -> Path:
    """Markdown -> Typst (pandoc, with docs/typst.lua) -> PDF. Writes the .typ beside the PDF.

    `root` is the folder Typst may read from; `image_root` is prefixed to relative image
    paths (e.g. "/docs/" to resolve "figures/x.png" against the repository root).
    """
    import pypandoc
    import typst

    out_pdf.parent.mkdir(parents=True, exist_ok=True)
    args = ["--standalone", f"--template={template}", f"--lua-filter={LUA_FILTER}"]
    args += ["-M", f"image-root={image_root}"]
    for key, value in (variables or {}).items():
        args += ["-V", f"{key}={value}"]
    source = pypandoc.convert_text(markdown, "typst", format="markdown", extra_args=args)
    for old, new in _TYPST_RENAMES.items():
        source = source.replace(old, new)
    typ = out_pdf.with_suffix(".typ")
    typ.write_text(source, encoding="utf-8")
    try:
        typst.compile(str(typ), output=str(out_pdf), root=str(root), ignore_system_fonts=True)
    except typst.TypstError as error:
        raise GuideError(f"typst could not compile {typ}: {error}") from error
    return out_pdf


def build(out_dir: Path = BUILD) -> Path:
    """Builds docs/_build/guide.pdf (and guide.md, guide.typ beside it); returns the PDF."""
    missing = toolchain_missing()
    if missing:
        raise GuideError(missing)
    markdown, _ = assemble()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "guide.md").write_text(markdown, encoding="utf-8")
    # Typst reads only below its root, which must hold the .typ file and the figures.
    root = Path(os.path.commonpath([out_dir.resolve(), REPO]))
    return markdown_to_pdf(
        markdown,
        out_dir / "guide.pdf",
        root=root,
        image_root=f"/{DOCS.relative_to(root).as_posix()}/",
        variables={
            "title": "Building a language model from scratch",
            "subtitle": "A reference manual for the fromscratch-lm code base, in JAX and Flax",
            "revision": git_revision(),
        },
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m docs.build", description="Builds docs/_build/guide.pdf; takes no options."
    )
    parser.parse_args(argv)  # --help, or one line and status 2 for anything else
    try:
        pdf = build()
    except GuideError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(pdf)
    return 0


if __name__ == "__main__":
    sys.exit(main())

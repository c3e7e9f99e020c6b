"""Verifiable rewards for the code-writing task, computed without executing anything.

Each answer (generated source code) is checked against the held-out reference function
(`Reference`: its name, its source, the names its module binds), component by component:

  parses              `ast.parse` and `compile` succeed (compiling runs nothing; it rejects
                      what the parser lets through, e.g. `break` outside a loop).
                      SyntaxError, ValueError, RecursionError and MemoryError, which
                      hostile inputs raise, count as not parsing
  defines_name        a function of the requested name is defined at the top level or as a
                      method of a top-level class, where the reference came from (the last
                      such definition is graded: it is the one Python keeps)
  signature           ... with the reference's arguments: the same names of the same kinds
                      (positional-only, positional, *args, keyword-only, **kwargs), in order,
                      and `async` if and only if the reference is
  no_undefined_names  pyflakes finds no undefined name, builtins, the function's own
                      parameters and the reference module's top-level names being known;
                      what would hide one from pyflakes counts as one: a star import, a
                      `global` name bound nowhere, catching NameError (unless the
                      reference does the same)
  nontrivial          the function's body is more than placeholders: `pass`, `...`, a
                      docstring or other lone constant, `return` of nothing or of a
                      constant, `raise NotImplementedError` (or `NotImplemented`), a bare
                      call of the function itself (or the reference's body is such a
                      placeholder too: an abstract method, a constant stub)
  similarity          in [0, 1]: difflib's ratio 2M / (|a| + |b|) between the sequences of
                      AST node types (pre-order) of the answer's and the reference's bodies,
                      docstrings left out; 1 for a copy, 0 when the name is not defined

`verifiable_reward` combines them (see `RewardWeights`). Everything here is pure host
Python; nothing mined or generated is ever run.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
from collections.abc import Iterable, Iterator, Sequence

from pyflakes import checker as pyflakes_checker
from pyflakes import messages as pyflakes_messages

COMPONENTS = ("parses", "defines_name", "signature", "no_undefined_names", "nontrivial")
STAR_IMPORT = "*"  # in `module_names`: the module star-imports, so any name may be bound
MAX_NODES = 4000  # node sequences are cut here: bounds difflib's quadratic worst case
_PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError)
# ImportStarUsage: a name pyflakes could only find in a star import
_UNDEFINED = (
    pyflakes_messages.UndefinedName,
    pyflakes_messages.UndefinedLocal,
    pyflakes_messages.ImportStarUsage,
)
_FUNCTION = ast.FunctionDef | ast.AsyncFunctionDef


@dataclasses.dataclass(frozen=True)
class Reference:
    """What an answer is checked against: the held-out function and its module's names."""

    name: str
    source: str  # the reference function's whole source, `def` line to the end
    module_names: frozenset[str] = frozenset()  # names bound at the top of its file

    @classmethod
    def from_sft_record(cls, record: dict) -> Reference:
        """From a record of `rlhf.stdlib_tasks.sft_record` (the assistant turn is the source)."""
        return cls(
            record["name"],
            record["messages"][-1]["content"],
            frozenset(record.get("module_names", ())),
        )


@dataclasses.dataclass(frozen=True)
class RewardWeights:
    """Weights of `verifiable_reward`; the defaults sum to 1, so the reward is in [0, 1].

    The reward is 0 for an answer that does not parse, else
      parses + defines_name * [name] + signature * [signature]
        + [nontrivial] * (nontrivial + no_undefined_names * [no undefined names]
                          + similarity * similarity)
    The last three only count for a non-trivial body, so that emitting the prompt's
    header with `pass` (0.5 by default) is worth less than any honest attempt.
    """

    parses: float = 0.1
    defines_name: float = 0.2
    signature: float = 0.2
    nontrivial: float = 0.15
    no_undefined_names: float = 0.15
    similarity: float = 0.2


# ------------------------------------------------------------------------ helpers


def parse(code: str) -> ast.Module | None:
    """The module's AST, or None when the code is blank or does not compile. `compile`
    builds bytecode and runs nothing; it checks what the parser leaves to it (`break`
    outside a loop, `await` outside `async def`, a duplicate argument, ...)."""
    if not code.strip():
        return None
    try:
        tree = ast.parse(code)
        compile(tree, "<answer>", "exec", dont_inherit=True)
    except _PARSE_ERRORS:
        return None
    return tree


def top_level_functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Top-level functions and methods of top-level classes, in source order."""
    for node in tree.body:
        if isinstance(node, _FUNCTION):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, _FUNCTION))


def find_function(tree: ast.Module | None, name: str) -> ast.FunctionDef | None:
    """The last top-level function or method of a top-level class called `name` (the one
    Python keeps), or None. A definition nested deeper cannot be called by that name."""
    if tree is None:
        return None
    found = [fn for fn in top_level_functions(tree) if fn.name == name]
    return found[-1] if found else None


def argument_kinds(fn: ast.FunctionDef) -> tuple[tuple[str, str], ...]:
    """((kind, name), ...) of a `def`'s arguments, in order, after ("async", "") for an
    `async def` (it is called differently); defaults and annotations aside."""
    a = fn.args
    kinds = [("async", "")] if isinstance(fn, ast.AsyncFunctionDef) else []
    kinds += [("positional_only", x.arg) for x in a.posonlyargs]
    kinds += [("positional", x.arg) for x in a.args]
    kinds += [("var_positional", a.vararg.arg)] if a.vararg else []
    kinds += [("keyword_only", x.arg) for x in a.kwonlyargs]
    kinds += [("var_keyword", a.kwarg.arg)] if a.kwarg else []
    return tuple(kinds)


def body_without_docstring(fn: ast.FunctionDef) -> list[ast.stmt]:
    body = fn.body
    if ast.get_docstring(fn, clean=False) is not None:
        body = body[1:]
    return body


def _is_self_call(node: ast.AST, name: str) -> bool:
    """`name(...)`, `self.name(...)` or `cls.name(...)`; `Base.name(self)` or
    `os.name(...)` delegate to another function."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Name) and f.id == name) or (
        isinstance(f, ast.Attribute)
        and f.attr == name
        and isinstance(f.value, ast.Name)
        and f.value.id in ("self", "cls")
    )


def _is_trivial_statement(stmt: ast.stmt, name: str) -> bool:
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Return) and stmt.value is None:
        return True  # a bare `return`
    if isinstance(stmt, ast.Expr | ast.Return):
        value = stmt.value
        if isinstance(value, ast.Constant | ast.JoinedStr):
            return True  # `...`, a stray string or number, `return None`, `return 0`
        return _is_self_call(value, name)
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id in ("NotImplementedError", "NotImplemented")
    return False


def is_trivial(fn: ast.FunctionDef) -> bool:
    """Whether the body, less its docstring, is empty or only placeholder statements."""
    return all(_is_trivial_statement(s, fn.name) for s in body_without_docstring(fn))


def catches_name_error(tree: ast.AST) -> bool:
    """Whether an `except` clause names NameError (alone or in a tuple): pyflakes then
    reports no undefined name inside its `try`."""
    for handler in ast.walk(tree):
        if isinstance(handler, ast.ExceptHandler) and handler.type is not None:
            caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            if any(isinstance(c, ast.Name) and c.id == "NameError" for c in caught):
                return True
    return False


def uses_undefined_names(tree: ast.Module, known: Iterable[str] = ()) -> bool:
    """Whether pyflakes finds an undefined name; names in `known` count as builtins.
    A name only a star import of the code could bind counts as undefined, and so does a
    name declared `global` that neither `known` nor any assignment in the code binds
    (pyflakes trusts the declaration). An AST too deep for pyflakes to walk counts as
    using one (it cannot be checked)."""
    known = frozenset(known)
    if STAR_IMPORT in known:
        return False
    declared, stored = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            declared.update(node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            stored.add(node.id)
    if declared - known - _bound_at_top(tree) - stored:
        return True
    try:
        found = pyflakes_checker.Checker(tree, builtins=known).messages
    except (RecursionError, MemoryError):
        return True
    return any(isinstance(m, _UNDEFINED) for m in found)


def node_types(nodes: Iterable[ast.AST], limit: int = MAX_NODES) -> list[str]:
    """Pre-order AST node type names (iterative: deep trees do not recurse)."""
    out: list[str] = []
    stack = list(reversed(list(nodes)))
    while stack and len(out) < limit:
        node = stack.pop()
        out.append(type(node).__name__)
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return out


def sequence_similarity(a: list[str], b: list[str]) -> float:
    """2M / (|a| + |b|) with M the matched elements; 1.0 for two empty sequences."""
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


@functools.lru_cache(maxsize=4096)
def _reference_facts(reference: Reference) -> tuple[tuple, list[str], bool, bool]:
    """(argument kinds, body node types, whether the body is a placeholder, whether it
    catches NameError)."""
    fn = find_function(parse(reference.source), reference.name)
    if fn is None:
        raise ValueError(f"reference source does not define {reference.name!r}")
    body = body_without_docstring(fn)
    return argument_kinds(fn), node_types(body), is_trivial(fn), catches_name_error(fn)


# ----------------------------------------------------------------------- the checks


def check_answer(code: str, reference: Reference) -> dict[str, float]:
    """Every component for one answer: the five booleans (as 0.0 / 1.0) and similarity."""
    tree = parse(code)
    fn = find_function(tree, reference.name)
    ref_kinds, ref_nodes, ref_trivial, ref_catches = _reference_facts(reference)
    result = {
        "parses": tree is not None,
        "defines_name": fn is not None,
        "signature": fn is not None and argument_kinds(fn) == ref_kinds,
        "no_undefined_names": (
            tree is not None
            and not uses_undefined_names(tree, reference.module_names)
            and (ref_catches or not catches_name_error(tree))
        ),
        "nontrivial": fn is not None and (ref_trivial or not is_trivial(fn)),
        "similarity": (
            sequence_similarity(node_types(body_without_docstring(fn)), ref_nodes) if fn else 0.0
        ),
    }
    return {k: float(v) for k, v in result.items()}


def reward_from_checks(checks: dict[str, float], weights: RewardWeights = RewardWeights()) -> float:
    """The scalar reward of one answer's components (see `RewardWeights`)."""
    if not checks["parses"]:
        return 0.0
    w = weights
    gated = (
        w.nontrivial
        + w.no_undefined_names * checks["no_undefined_names"]
        + w.similarity * checks["similarity"]
    )
    return (
        w.parses
        + w.defines_name * checks["defines_name"]
        + w.signature * checks["signature"]
        + checks["nontrivial"] * gated
    )


def verifiable_reward(
    code: str, reference: Reference, weights: RewardWeights = RewardWeights()
) -> float:
    """The reward GRPO trains on: `check_answer`'s components, weighted."""
    return reward_from_checks(check_answer(code, reference), weights)


def module_names(tree: ast.Module) -> list[str]:
    """Names bound at a module's top level, sorted: imports, defs, classes, assignment,
    loop and `with` targets, also inside top-level if/try/with/for blocks, and names
    declared `global` anywhere; STAR_IMPORT among them when the module star-imports."""
    names = _bound_at_top(tree)
    names.update(n for node in ast.walk(tree) if isinstance(node, ast.Global) for n in node.names)
    return sorted(names)


def _bound_at_top(tree: ast.Module) -> set[str]:
    """`module_names` less the `global` declarations."""
    names: set[str] = set()

    def stored(*targets: ast.AST | None) -> None:
        for target in filter(None, targets):
            names.update(
                n.id
                for n in ast.walk(target)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
            )

    def visit(stmts: list) -> None:
        for stmt in stmts:
            if isinstance(stmt, ast.Import | ast.ImportFrom):
                for alias in stmt.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    names.add(STAR_IMPORT if alias.name == "*" else bound)
            elif isinstance(stmt, _FUNCTION | ast.ClassDef):
                names.add(stmt.name)
                continue  # their insides bind local names
            elif isinstance(stmt, ast.Assign):
                stored(*stmt.targets)
            elif isinstance(stmt, ast.AnnAssign | ast.AugAssign | ast.For | ast.AsyncFor):
                stored(stmt.target)
            elif isinstance(stmt, ast.With | ast.AsyncWith):
                stored(*(item.optional_vars for item in stmt.items))
            elif isinstance(stmt, ast.ExceptHandler) and stmt.name:
                names.add(stmt.name)
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(stmt, field, []))

    visit(tree.body)
    return names


def verifiable_rewards(
    answers: Sequence[str],
    references: Sequence[Reference],
    weights: RewardWeights = RewardWeights(),
) -> list[float]:
    """`verifiable_reward` of each answer against its reference (host side, one per row)."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    return [verifiable_reward(a, r, weights) for a, r in zip(answers, references)]

"""Verifiable rewards for the code-writing task, computed without executing anything.

Each answer (generated source code) is checked against the held-out reference function
(`Reference`: its name, its source, the names its module binds), component by component:

  parses              `ast.parse` succeeds (SyntaxError, ValueError, RecursionError and
                      MemoryError, which hostile inputs raise, count as not parsing)
  defines_name        a function (or method) of the requested name is defined
  signature           ... with the reference's arguments: the same names of the same kinds
                      (positional-only, positional, *args, keyword-only, **kwargs), in order
  no_undefined_names  pyflakes finds no undefined name, builtins, the function's own
                      parameters and the reference module's top-level names being known
  nontrivial          the function's body is more than `pass`, `...`, a docstring,
                      `raise NotImplementedError` or a bare call of the function itself
                      (or the reference's is such a placeholder too: an abstract method)
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
from collections.abc import Iterable, Sequence

from pyflakes import checker as pyflakes_checker
from pyflakes import messages as pyflakes_messages

COMPONENTS = ("parses", "defines_name", "signature", "no_undefined_names", "nontrivial")
STAR_IMPORT = "*"  # in `module_names`: the module star-imports, so any name may be bound
MAX_NODES = 4000  # node sequences are cut here: bounds difflib's quadratic worst case
_PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError)
_UNDEFINED = (pyflakes_messages.UndefinedName, pyflakes_messages.UndefinedLocal)
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
    """The module's AST, or None when the code is blank or does not parse."""
    if not code.strip():
        return None
    try:
        return ast.parse(code)
    except _PARSE_ERRORS:
        return None


def find_function(tree: ast.AST | None, name: str) -> ast.FunctionDef | None:
    """The first function or method called `name`, in breadth-first order."""
    if tree is None:
        return None
    return next((n for n in ast.walk(tree) if isinstance(n, _FUNCTION) and n.name == name), None)


def argument_kinds(fn: ast.FunctionDef) -> tuple[tuple[str, str], ...]:
    """((kind, name), ...) of a `def`'s arguments, in order; defaults and annotations aside."""
    a = fn.args
    kinds = [("positional_only", x.arg) for x in a.posonlyargs]
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
    """`name(...)`, `self.name(...)` or `cls.name(...)`."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Name) and f.id == name) or (
        isinstance(f, ast.Attribute) and f.attr == name and isinstance(f.value, ast.Name)
    )


def _is_trivial_statement(stmt: ast.stmt, name: str) -> bool:
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr | ast.Return) and stmt.value is not None:
        value = stmt.value
        if isinstance(value, ast.Constant) and (value.value is ... or isinstance(value.value, str)):
            return True  # `...` or a stray string
        return _is_self_call(value, name)
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def is_trivial(fn: ast.FunctionDef) -> bool:
    """Whether the body, less its docstring, is empty or only placeholder statements."""
    return all(_is_trivial_statement(s, fn.name) for s in body_without_docstring(fn))


def uses_undefined_names(tree: ast.Module, known: Iterable[str] = ()) -> bool:
    """Whether pyflakes finds an undefined name; names in `known` count as builtins.
    An AST too deep for pyflakes to walk counts as using one (it cannot be checked)."""
    known = frozenset(known)
    if STAR_IMPORT in known:
        return False
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
def _reference_facts(reference: Reference) -> tuple[tuple, list[str], bool]:
    """(argument kinds, body node types, whether the body is a placeholder)."""
    fn = find_function(parse(reference.source), reference.name)
    if fn is None:
        raise ValueError(f"reference source does not define {reference.name!r}")
    return argument_kinds(fn), node_types(body_without_docstring(fn)), is_trivial(fn)


# ----------------------------------------------------------------------- the checks


def check_answer(code: str, reference: Reference) -> dict[str, float]:
    """Every component for one answer: the five booleans (as 0.0 / 1.0) and similarity."""
    tree = parse(code)
    fn = find_function(tree, reference.name)
    ref_kinds, ref_nodes, ref_trivial = _reference_facts(reference)
    result = {
        "parses": tree is not None,
        "defines_name": fn is not None,
        "signature": fn is not None and argument_kinds(fn) == ref_kinds,
        "no_undefined_names": (
            tree is not None and not uses_undefined_names(tree, reference.module_names)
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
    names.update(n for node in ast.walk(tree) if isinstance(node, ast.Global) for n in node.names)
    return sorted(names)


def verifiable_rewards(
    answers: Sequence[str],
    references: Sequence[Reference],
    weights: RewardWeights = RewardWeights(),
) -> list[float]:
    """`verifiable_reward` of each answer against its reference (host side, one per row)."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    return [verifiable_reward(a, r, weights) for a, r in zip(answers, references)]

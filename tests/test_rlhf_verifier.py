"""Verifiable rewards: every component on hand-written answers, hostile inputs, intervals."""

import ast
import textwrap
from pathlib import Path

import pytest

from rlhf import stdlib_tasks
from rlhf.ground_truth import comparison_table, ground_truth, wilson_interval
from rlhf.verifier import (
    Reference,
    RewardWeights,
    check_answer,
    module_names,
    node_types,
    verifiable_reward,
)

HEADER = '''def clamp(value, low=0, *, high=None):
    """Limit value to [low, high]."""
'''
BODY = """    if value < low:
        return low
    if high is not None and value > high:
        return high
    return _checked(value)
"""
REF = Reference("clamp", HEADER + BODY, frozenset({"_checked"}))
ALL = {"parses", "defines_name", "signature", "no_undefined_names", "nontrivial"}


def _failing(answer, reference=REF):
    checks = check_answer(answer, reference)
    return {k for k in ALL if checks[k] != 1.0}


def test_a_copy_passes_everything_with_similarity_one():
    checks = check_answer(HEADER + BODY, REF)
    assert checks == {k: 1.0 for k in ALL} | {"similarity": 1.0}
    assert verifiable_reward(HEADER + BODY, REF) == pytest.approx(1.0)
    # Another docstring, comments and spacing leave the AST node sequence as it was.
    reworded = HEADER.replace("Limit", "Clamp") + BODY.replace("low\n", "low  # floor\n")
    assert check_answer(reworded, REF)["similarity"] == 1.0


def test_hostile_inputs_do_not_parse_and_score_zero():
    deep_attribute = "x = a" + ".b" * 100_000  # RecursionError in the parser
    deep_unary = "x = " + "-" * 100_000 + "1"  # MemoryError (parser stack) or RecursionError
    null_byte = HEADER + BODY + "\x00"
    with pytest.raises(RecursionError):
        ast.parse(deep_attribute)
    with pytest.raises((MemoryError, RecursionError)):
        ast.parse(deep_unary)
    for answer in (deep_attribute, deep_unary, null_byte, "def clamp(:\n", "   \n", ""):
        checks = check_answer(answer, REF)
        assert checks["parses"] == 0.0 and checks["defines_name"] == 0.0
        assert verifiable_reward(answer, REF) == 0.0


def test_code_too_deep_for_pyflakes_counts_as_unchecked():
    answer = HEADER + "    return value" + " + 1" * 600 + "\n"
    compile(answer, "<answer>", "exec")  # compiles, but pyflakes recurses past the limit
    assert _failing(answer) == {"no_undefined_names"}


@pytest.mark.parametrize(
    "body",
    [
        "    pass\n",
        "    ...\n",
        "",  # the docstring alone
        "    raise NotImplementedError\n",
        "    raise NotImplementedError('subclasses do this')\n",
        "    return clamp(value, low, high=high)\n",
        "    pass\n    ...\n    'a stray string'\n",
        "    return\n",  # each of these scored above an honest attempt once
        "    return None\n",
        "    return 0\n",
        "    None\n",
        "    f'todo'\n",
        "    raise NotImplemented\n",
    ],
)
def test_trivial_bodies(body):
    answer = HEADER + body
    assert _failing(answer) == {"nontrivial"}
    w = RewardWeights()
    # Only parse, name and signature count: the gated components are worth nothing.
    assert verifiable_reward(answer, REF) == pytest.approx(w.parses + w.defines_name + w.signature)


def test_a_method_calling_itself_is_trivial():
    method = Reference("step", 'def step(self, n):\n    """Step."""\n    return n + 1\n')
    assert _failing("def step(self, n):\n    return self.step(n)\n", method) == {"nontrivial"}
    # a base class's or another module's function of the same name is real work
    for delegate in ("Base.step(self, n)", "counter.step(n)"):
        answer = f"import counter\nclass Base: pass\ndef step(self, n):\n    return {delegate}\n"
        assert check_answer(answer, method)["nontrivial"] == 1.0, delegate


def test_what_would_hide_an_undefined_name_from_pyflakes_counts_as_one():
    hidden = HEADER + "    return _unknown_helper(value, low, high)\n"
    star_import = "from os import *\n" + hidden
    declared_global = hidden.replace("    return", "    global _unknown_helper\n    return")
    caught = hidden.replace("    return _u", "    try:\n        return _u")
    caught += "    except NameError:\n        return value\n"
    for answer in (star_import, declared_global, caught):
        assert _failing(answer) == {"no_undefined_names"}, answer
    assigned_global = HEADER + "    global _seen\n    _seen = value\n    return _checked(value)\n"
    assert _failing(assigned_global) == set()  # a global the code binds is defined


def test_the_definition_graded_is_the_one_python_would_call():
    nested = "def outer():\n" + "".join("    " + line + "\n" for line in REF.source.split("\n"))
    assert check_answer(nested, REF)["defines_name"] == 0.0  # not callable as clamp
    redefined = REF.source + "\n" + HEADER + "    pass\n"  # Python keeps the second
    assert _failing(redefined) == {"nontrivial"}
    method = "class Limits:\n" + "".join("    " + ln + "\n" for ln in REF.source.split("\n"))
    assert _failing(method) == set()  # as mined: methods of top-level classes count


def test_code_python_would_not_compile_does_not_parse():
    for body in ("    break\n", "    await value\n", "    nonlocal low\n"):
        ast.parse(HEADER + body)  # the parser lets each through; compiling does not
        assert check_answer(HEADER + body, REF)["parses"] == 0.0, body
    duplicate = "def clamp(value, value, *, high=None):\n    return value\n"
    assert verifiable_reward(duplicate, REF) == 0.0


def test_a_placeholder_is_right_when_the_reference_is_one():
    abstract = Reference(
        "area", 'def area(self):\n    """Area."""\n    raise NotImplementedError\n'
    )
    checks = check_answer(abstract.source, abstract)
    assert checks["nontrivial"] == 1.0 and checks["similarity"] == 1.0


@pytest.mark.parametrize(
    "header",
    [
        "def clamp(value, low=0, high=None):\n",  # high no longer keyword-only
        "def clamp(value, lo=0, *, high=None):\n",  # renamed argument
        "def clamp(value, *, high=None):\n",  # missing argument
        "def clamp(value, low=0, *args, high=None):\n",  # extra *args
        "def clamp(value, /, low=0, *, high=None):\n",  # positional-only
        "async def clamp(value, low=0, *, high=None, **kw):\n",  # extra **kwargs
        "async def clamp(value, low=0, *, high=None):\n",  # called differently
    ],
)
def test_wrong_signature(header):
    answer = header + BODY.replace("low", "lo") if "lo=" in header else header + BODY
    # The body still reads `low`: without that argument it is an undefined name too.
    missing_low = "low" not in header and "lo=" not in header
    assert _failing(answer) == {"signature"} | ({"no_undefined_names"} if missing_low else set())


def test_defaults_and_annotations_do_not_change_the_signature():
    answer = "def clamp(value: int, low: int = 5, *, high: int | None = 9) -> int:\n" + BODY
    assert _failing(answer) == set()


def test_undefined_names():
    assert _failing(HEADER + BODY.replace("_checked", "_unknown_helper")) == {"no_undefined_names"}
    uses_before_assigning = HEADER + "    total = later + value\n    later = 1\n    return total\n"
    assert _failing(uses_before_assigning) == {"no_undefined_names"}
    # Builtins, parameters, local names and the module's names are all known.
    fine = HEADER + "    n = len([value, low, high])\n    return _checked(n)\n"
    assert _failing(fine) == set()
    star = Reference("clamp", REF.source, frozenset({"*"}))  # the module star-imports
    assert _failing(HEADER + BODY.replace("_checked", "anything"), star) == set()


def test_wrong_name_defines_nothing():
    answer = HEADER.replace("clamp", "limit") + BODY
    checks = check_answer(answer, REF)
    assert _failing(answer) == {"defines_name", "signature", "nontrivial"}
    assert checks["similarity"] == 0.0
    assert verifiable_reward(answer, REF) == pytest.approx(RewardWeights().parses)


def test_similarity_is_the_ratio_of_matching_node_types():
    assert node_types(ast.parse("x = f(1)").body) == [
        "Assign",
        "Name",
        "Store",
        "Call",
        "Name",
        "Load",
        "Constant",
    ]
    half = HEADER + "    if value < low:\n        return low\n    return value\n"
    sim = check_answer(half, REF)["similarity"]
    assert 0.3 < sim < 0.9
    other = HEADER + "    for i in range(3):\n        print(i)\n"
    assert check_answer(other, REF)["similarity"] < sim


def test_reward_combines_the_components_with_the_weights():
    answer = HEADER + BODY.replace("_checked", "_unknown_helper")
    w = RewardWeights(parses=1, defines_name=2, signature=4, nontrivial=8, no_undefined_names=16)
    expected = 1 + 2 + 4 + 8 + w.similarity * 1.0  # the unknown name only costs its weight
    assert verifiable_reward(answer, REF, w) == pytest.approx(expected)


def test_module_names():
    tree = ast.parse(
        textwrap.dedent(
            """
            import os.path, numpy as np
            from a import (b, c as d)
            X, [Y, *Z] = 1, (2, 3)
            T: int = 0
            try:
                import fast
            except ImportError as err:
                fast = None
            if X:
                def helper(): inner = 1
            with open(p) as fh:
                pass
            for i in range(3):
                pass
            class K:
                attr = 1
            def g():
                global G
                local = 2
            """
        )
    )
    expected = "G K T X Y Z b d err fast fh g helper i np os".split()
    assert module_names(tree) == sorted(expected)
    assert "*" in module_names(ast.parse("from m import *"))


def test_mined_records_carry_the_module_names(tmp_path):
    source = textwrap.dedent(
        '''
        import re
        _PATTERN = re.compile("x")

        def match(text):
            """Whether text matches."""
            return _PATTERN.match(text) is not None
        '''
    )
    Path(tmp_path, "m.py").write_text(source)
    (task,) = stdlib_tasks.mine_file(tmp_path / "m.py", tmp_path)
    record = stdlib_tasks.sft_record(task)
    assert record["module_names"] == ["_PATTERN", "match", "re"]
    reference = Reference.from_sft_record(record)
    assert check_answer(task.source, reference) == {k: 1.0 for k in ALL} | {"similarity": 1.0}
    assert _failing(task.source, Reference(reference.name, reference.source)) == {
        "no_undefined_names"
    }


def test_wilson_interval_known_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 1000)[0] == 0.0 and wilson_interval(1000, 1000)[1] == 1.0  # exactly


def test_ground_truth_reports_each_component_with_an_interval():
    answers = [
        HEADER + BODY,
        HEADER + "    pass\n",
        "def clamp(:",
        HEADER + BODY.replace("_c", "_x"),
    ]
    stopped = [True, True, False, True]  # the broken answer ran into the length limit
    result = ground_truth(answers, ["clamp"] * 4, references=[REF] * 4, stopped=stopped)
    assert result["parse_rate"] == 0.75 and result["defines_name_rate"] == 0.75
    assert result["stopped_rate"] == 0.75
    assert result["signature_rate"] == 0.75
    assert result["nontrivial_rate"] == 0.5
    assert result["no_undefined_names_rate"] == 0.5
    assert result["parse_rate_ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    rewards = [verifiable_reward(a, REF) for a in answers]
    assert result["verifiable_reward_mean"] == pytest.approx(sum(rewards) / 4)
    low, high = result["similarity_mean_ci95"]
    assert low < result["similarity_mean"] < high
    table = comparison_table({"sft": result, "grpo": result})
    assert "| 0.750 [0.301, 0.954] |" in table and "signature_rate" in table
    assert "stopped_rate" in table
    assert "reward_mean" not in table.splitlines()[0].replace("verifiable_reward_mean", "")
    with pytest.raises(ValueError, match="4 answers but 1 references"):
        ground_truth(answers, ["clamp"] * 4, references=[REF])

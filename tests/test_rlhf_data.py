"""Chat template, loss masks, packing, preference batches, mined tasks and ground truth."""

import ast
import random

import jax
import jax.numpy as jnp
import numpy as np

from rlhf import chat, stdlib_tasks
from rlhf.ground_truth import comparison_table, defines_function, ground_truth, parses
from tests.rlhf_helpers import CHAT, SPECIALS, FakeTokenizer, init_lm

TOK = FakeTokenizer()
CONVO = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "yes"},
]


def test_render_marks_only_assistant_text_and_its_end():
    ids, assistant = chat.render(CONVO, TOK)
    assert ids[0] == TOK.bos_id
    assert TOK.decode(ids[assistant]) == "okyes"
    # Each assistant turn's closing <|end|> is trained (so the model learns to stop) ...
    assert list(ids[assistant]).count(SPECIALS["<|end|>"]) == 2
    # ... its role token and everything the user/system wrote are not.
    assert not assistant[ids == SPECIALS["<|assistant|>"]].any()
    assert not assistant[ids == SPECIALS["<|user|>"]].any()


def test_a_message_that_writes_a_chat_token_keeps_it_as_text():
    """A mined function may contain "<|end|>" in a string: as the stop token mid-answer it
    would teach the model to stop there."""
    from data.tokenizer import CharTokenizer

    tok = CharTokenizer.build(["return '<|end|>' + x"])
    message = {"role": "assistant", "content": "return '<|end|>' + x"}
    ids, assistant = chat.render([message], tok)
    end = tok.special_id("<|end|>")
    assert list(ids).count(end) == 1 and ids[-1] == end  # only the turn's own end
    assert tok.decode(ids[assistant][:-1]) == message["content"]


def test_sft_weights_are_zero_on_prompt_tokens():
    inputs, targets, weights = chat.sft_example(CONVO, TOK)
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    assert TOK.decode(targets[weights > 0]) == "okyes"
    prompt = chat.render_prompt(CONVO[:2], TOK)
    assert prompt[-1] == SPECIALS["<|assistant|>"]
    # Every target inside the prompt has weight 0.
    assert not weights[: len(prompt) - 1].any()


def test_packing_keeps_examples_apart():
    examples = [chat.sft_example(CONVO[1:3], TOK), chat.sft_example(CONVO[3:], TOK)]
    n0, n1 = len(examples[0][0]), len(examples[1][0])
    batch = chat.pack_examples(examples, seq_len=n0 + n1 + 3)
    assert batch["inputs"].shape == (1, n0 + n1 + 3)
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * n0 + [2] * n1 + [0] * 3)
    np.testing.assert_array_equal(batch["positions"][0, n0 : n0 + n1], np.arange(n1))
    assert not batch["weights"][0, n0 + n1 :].any()  # padding carries no loss
    # The second example's logits are the same packed or alone: no cross-example attention.
    model, params = init_lm(CHAT)
    apply = jax.jit(model.apply)
    packed = apply(
        {"params": params},
        jnp.asarray(batch["inputs"]),
        jnp.asarray(batch["positions"]),
        jnp.asarray(batch["segment_ids"]),
    )
    alone = apply({"params": params}, jnp.asarray(examples[1][0])[None])
    np.testing.assert_allclose(packed[0, n0 : n0 + n1], alone[0], atol=1e-5)


def test_packing_starts_a_new_row_when_full():
    examples = [chat.sft_example(CONVO[1:3], TOK)] * 3
    n = len(examples[0][0])
    batch = chat.pack_examples(examples, seq_len=2 * n + 1)
    assert batch["inputs"].shape[0] == 2
    assert batch["segment_ids"][1].max() == 1


def test_preference_batch_left_and_right_padding():
    pairs = [{"prompt": CONVO[1:2], "chosen": "good", "rejected": "bad answer"}]
    right = chat.preference_batch(pairs, TOK, length=24, side="right")
    left = chat.preference_batch(pairs, TOK, length=24, side="left")
    for side in ("chosen", "rejected"):
        tokens, mask = right[f"{side}_tokens"][0], right[f"{side}_mask"][0]
        left_tokens, left_mask = left[f"{side}_tokens"][0], left[f"{side}_mask"][0]
        np.testing.assert_array_equal(tokens[mask > 0], left_tokens[left_mask > 0])
        loss = right[f"{side}_loss_mask"][0] > 0
        assert TOK.decode(tokens[loss]) == pairs[0][side]
        assert not loss[mask == 0].any()  # never on padding
    assert left["chosen_mask"][0, 0] == 0 and left["chosen_mask"][0, -1] == 1


FILE_A = '''
def add(a, b):
    """Add two numbers."""
    total = a + b
    return total

class Thing:
    def size(self, items):
        """How many items."""
        count = len(items)
        return count
'''
FILE_B = '''
def greet(name):
    """Say hello."""
    msg = "hello " + name
    print(msg)
    return msg

def undocumented(x):
    return x
'''


def _mine(tmp_path):
    (tmp_path / "a.py").write_text(FILE_A)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_text(FILE_B)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text(FILE_B.replace("greet", "skipped"))
    files = stdlib_tasks.stdlib_files(str(tmp_path))
    return [t for f in files for t in stdlib_tasks.mine_file(f, tmp_path)]


def test_mining_gives_signature_docstring_prompt_and_source_answer(tmp_path):
    tasks = _mine(tmp_path)
    assert sorted(t.name for t in tasks) == ["add", "greet", "size"]  # documented, not tests
    add = next(t for t in tasks if t.name == "add")
    assert add.header == 'def add(a, b):\n    """Add two numbers."""'
    assert add.source.endswith("    return total")
    assert add.header in add.instruction and "total" not in add.instruction
    size = next(t for t in tasks if t.name == "size")
    assert size.source.startswith("def size(self, items):")  # methods dedented


def test_split_by_file_never_shares_a_file(tmp_path):
    (tmp_path / "a.py").write_text(FILE_A)
    for i in range(20):
        (tmp_path / f"m{i}.py").write_text(FILE_B.replace("greet", f"greet{i}"))
    data = stdlib_tasks.build_datasets(str(tmp_path), eval_fraction=0.3)
    train_files = {r["file"] for r in data["sft_train"] + data["pairs_train"]}
    eval_files = {r["file"] for r in data["sft_eval"] + data["pairs_eval"]}
    assert train_files and eval_files and not train_files & eval_files


def test_package_tasks_train_only_and_never_copy_an_eval_function(tmp_path, monkeypatch):
    root, site = tmp_path / "lib", tmp_path / "site"
    root.mkdir(), site.mkdir()
    for i in range(20):
        (root / f"m{i}.py").write_text(FILE_B.replace("greet", f"greet{i}"))
    plain = stdlib_tasks.build_datasets(str(root), eval_fraction=0.3)
    eval_name = plain["sft_eval"][0]["name"]
    # A package that vendors one evaluation file, and one with code of its own.
    (site / "vendored.py").write_text(FILE_B.replace("greet", eval_name))
    (site / "own.py").write_text(FILE_B.replace("greet", "salute"))
    files = [(site / "vendored.py", site), (site / "own.py", site)]
    monkeypatch.setattr(stdlib_tasks, "package_files", lambda limit: files[:limit])
    data = stdlib_tasks.build_datasets(str(root), eval_fraction=0.3, num_package_files=2)
    added = [r for r in data["sft_train"] if r["file"].startswith("site:")]
    assert {r["name"] for r in added} == {"salute"}  # the vendored copy is dropped
    assert data["sft_eval"] == plain["sft_eval"]
    assert len(data["sft_train"]) == len(plain["sft_train"]) + len(added)


def test_package_files_are_real_sources_spread_by_hash():
    files = stdlib_tasks.package_files(50)
    assert len(files) == 50 and all(p.suffix == ".py" and p.is_file() for p, _ in files)
    assert len({p.relative_to(site).parts[0] for p, site in files}) > 5  # many packages


def test_corruptions_are_controlled(tmp_path):
    tasks = _mine(tmp_path)
    records = stdlib_tasks.preference_records(tasks, seed=0)
    kinds = {r["kind"] for r in records}
    assert kinds == set(stdlib_tasks.CORRUPTIONS)
    for r in records:
        assert r["rejected"] != r["chosen"] and parses(r["chosen"])
        if r["kind"] == "broken_syntax":
            assert not parses(r["rejected"])
        if r["kind"] == "renamed_identifiers":
            assert parses(r["rejected"]) and not defines_function(r["rejected"], r["name"])
        if r["kind"] in ("other_body", "shuffled_lines", "truncation"):
            assert r["rejected"].split("\n")[0] == r["chosen"].split("\n")[0]  # same signature
        if r["kind"] == "shuffled_lines":  # the code moved, not only its blank lines
            code = [[ln for ln in r[k].split("\n") if ln.strip()] for k in ("chosen", "rejected")]
            assert code[0] != code[1]
    task = tasks[0]
    shuffled = stdlib_tasks.corrupt(task, "shuffled_lines", tasks, random.Random(0))
    assert sorted(shuffled.split("\n")) == sorted(task.source.split("\n"))


def test_ground_truth_parses_and_never_executes():
    code = "def f(x):\n    return x\n"
    bomb = "def f():\n    raise SystemExit\nf()\n"  # would exit if executed
    assert parses(code) and not parses("def f(:\n") and not parses("   \n")
    assert defines_function(code, "f") and not defines_function(code, "g")
    result = ground_truth([code, bomb, "nope("], ["f", "f", "f"], scores=[1.0, 2.0, 3.0])
    rates = {k: v for k, v in result.items() if not k.endswith("_ci95")}
    assert rates == {"parse_rate": 2 / 3, "defines_name_rate": 2 / 3, "n": 3, "reward_mean": 2.0}
    low, high = result["parse_rate_ci95"]
    assert 0 < low < 2 / 3 < high < 1
    table = comparison_table({"sft": result, "ppo": result})
    assert table.count("\n") == 3 and "| sft |" in table


def test_mining_after_a_form_feed_line_takes_the_right_lines(tmp_path):
    # str.splitlines() splits at the form feed too; ast's line numbers do not
    (tmp_path / "m.py").write_text(
        '# section\n\x0c\ndef f(a):\n    """Doc."""\n    b = a + 1\n    return b\n'
    )
    (task,) = stdlib_tasks.mine_file(tmp_path / "m.py", tmp_path)
    assert task.source == 'def f(a):\n    """Doc."""\n    b = a + 1\n    return b'


def test_mined_source_is_the_function_as_written(tmp_path):
    method = (
        "class C:\n"
        "    def page(self):\n"
        '        """The page."""\n'
        "        head = '''<html>\n"
        "\n"
        "<body>\n"
        "  </body>'''\n"
        "\n"
        "# a comment at column 0\n"
        "        return head\n"
    )
    (tmp_path / "m.py").write_text(method)
    (task,) = stdlib_tasks.mine_file(tmp_path / "m.py", tmp_path)
    assert task.header == 'def page(self):\n    """The page."""'
    # the string's lines, its blank line included, and the blank line after it are kept
    assert task.body == (
        "    head = '''<html>",
        "",
        "<body>",
        "  </body>'''",
        "",
        "# a comment at column 0",
        "    return head",
    )
    head = ast.parse(task.source).body[0].body[1].value  # the string, as Python reads it
    assert head.value == "<html>\n\n<body>\n  </body>"

"""The guide builds, embeds every figure, names only real modules and quotes the real code;
a run's report is written from its metrics."""

import json
import textwrap
from pathlib import Path

import pytest

from docs import build, report

PAGE_FLOOR = 30  # the guide is ~38 pages; far fewer means chapters went missing


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    missing = build.toolchain_missing()
    if missing:
        pytest.skip(f"the guide's toolchain is absent ({missing})")
    pytest.importorskip("pypdf", reason="pypdf (the docs extra) reads the built PDF")
    out = tmp_path_factory.mktemp("guide")
    return build.build(out), out


@pytest.fixture(scope="module")
def assembled():
    return build.assemble()


def test_pdf_has_the_pages(built):
    import pypdf

    pdf, _ = built
    assert len(pypdf.PdfReader(pdf).pages) >= PAGE_FLOOR


def test_every_figure_is_embedded(built):
    import pypdf

    pdf, out = built
    figures = sorted(p.name for p in build.FIGURES.glob("*.png"))
    typst_source = (out / "guide.typ").read_text()
    missing = [name for name in figures if f'/docs/figures/{name}"' not in typst_source]
    assert not missing, f"figures not in the guide: {missing}"
    images = sum(
        1
        for page in pypdf.PdfReader(pdf).pages
        for obj in page.get("/Resources", {}).get("/XObject", {}).values()
        if obj.get_object().get("/Subtype") == "/Image"
    )
    assert images >= len(figures)


def test_every_named_module_exists(assembled):
    markdown, _ = assembled
    named = build.named_paths(markdown)
    assert {"model/masking.py", "train/sharding.py", "rlhf/ppo.py"} <= named
    missing = sorted(p for p in named if not (build.REPO / p).exists())
    assert not missing, f"the guide names paths that do not exist: {missing}"


def test_every_excerpt_is_the_source(assembled):
    markdown, excerpts = assembled
    assert len(excerpts) >= 30
    for ex in excerpts:
        lines = (build.REPO / ex.path).read_text().splitlines()
        assert textwrap.dedent("\n".join(lines[ex.first_line - 1 : ex.last_line])) == ex.text
        assert ex.text in markdown
    # No directive is left unexpanded.
    assert "include=" not in markdown and "<!-- table:" not in markdown
    assert "<!-- include:" not in markdown


def test_excerpt_of_a_symbol_is_its_whole_definition():
    ex = build.extract("model/masking.py", "attention_mask")
    assert ex.text.startswith("def attention_mask(")
    assert ex.text.rstrip().endswith("return mask_BQK")
    method = build.extract("rlhf/ppo.py", "KLController.update")
    assert method.text.startswith("def update(self")


def test_unresolvable_directives_name_the_problem():
    with pytest.raises(build.GuideError, match="no 'no_such_function'"):
        build.extract("model/masking.py", "no_such_function")
    with pytest.raises(build.GuideError, match="no line with 'not in the file'"):
        build.extract("model/masking.py", "attention_mask", start="not in the file")
    with pytest.raises(build.GuideError, match="does not exist"):
        build.extract("model/no_such_module.py")
    with pytest.raises(build.GuideError, match="no heading"):
        build.table_under_heading("BENCHMARKS.md", "No such heading")


def test_table_directive_copies_the_rows():
    table = build.table_under_heading(
        "BENCHMARKS.md", "Final numbers: NVIDIA H100 80GB HBM3 (run 3)"
    )
    source = (build.REPO / "BENCHMARKS.md").read_text()
    rows = table.splitlines()
    assert rows[0] in source and all(row in source for row in rows[2:])


def _fake_run(root: Path) -> Path:
    for stage, key in (("pretrain", "train/loss"), ("ppo", "ppo/score_mean")):
        (root / stage).mkdir(parents=True)
        records = [{"step": s, key: 1.0 / s, "eval/loss": 2.0 / s} for s in (10, 20, 30)]
        (root / stage / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    (root / "report").mkdir()
    summary = {
        "ground_truth": {
            "sft": {"parse_rate": 0.5, "parse_rate_ci95": [0.25, 0.75], "n": 4},
            "ppo": {"parse_rate": 0.75, "parse_rate_ci95": [0.5, 1.0], "n": 4},
        },
        "checks": {"ppo_kept_parse_rate": True},
    }
    (root / "report" / "summary.json").write_text(json.dumps(summary))
    return root


def test_write_report(tmp_path):
    md = report.write_report(_fake_run(tmp_path / "run"))
    text = md.read_text()
    assert "| metric | sft | ppo |" in text and "`ppo_kept_parse_rate`: True" in text
    assert "| `parse_rate` | 0.500 [0.250, 0.750] | 0.750 [0.500, 1.000] |" in text
    assert "| `n` | 4 | 4 |" in text
    assert "| `train/loss` | 0.03333 | 30 |" in text
    assert "| `ppo/score_mean` | 0.03333 | 30 |" in text
    for stage in ("pretrain", "ppo"):
        assert (md.parent / f"{stage}.png").is_file() and f"]({stage}.png)" in text
    if build.toolchain_missing() is None:
        assert (md.parent / "report.pdf").stat().st_size > 0


def test_write_report_refuses_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.write_report(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a run workdir"):
        report.write_report(tmp_path)

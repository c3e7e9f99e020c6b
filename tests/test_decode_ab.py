"""The alternating-process decoding comparison (`experiments.bench.decode_ab`)."""

from experiments.bench import decode_ab


def test_table_takes_each_trees_median_against_the_median_ceiling():
    rows = [
        {"label": "baseline", "step_ms": 1.00, "copy_GBps": 3600, "bytes_per_step_GB": 2.7},
        {"label": "candidate", "step_ms": 0.90, "copy_GBps": 3700, "bytes_per_step_GB": 2.7},
        {"label": "baseline", "step_ms": 1.02, "copy_GBps": 3650, "bytes_per_step_GB": 2.7},
        {"label": "candidate", "step_ms": 0.95, "copy_GBps": 3500, "bytes_per_step_GB": 2.7},
        {"label": "candidate", "error": "exit 1: boom"},
    ]
    head, _, baseline, candidate = decode_ab.compare(rows)
    assert head == "median copy ceiling 3,625 GB/s over 4 processes"
    assert baseline.split()[-2:] == ["1.0100", "73.7%"]  # 2.7 GB / 3,625 GB/s / 1.01 ms
    assert candidate.split()[-2:] == ["0.9250", "80.5%"]


def test_a_tree_without_a_model_package_is_one_line(tmp_path, capsys):
    assert decode_ab.main(["--baseline", str(tmp_path), "--rounds", "1"]) == 2
    assert (
        capsys.readouterr().err.strip() == f"decode_ab: baseline {tmp_path} holds no model/ package"
    )


def test_one_process_measures_the_tiny_sampler(capsys):
    args = ["--preset", "tiny", "--prompt-len", "8", "--new-tokens", "8", "--rounds", "1"]
    assert decode_ab.main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-3].startswith("median copy ceiling")
    assert table[-1].startswith("candidate")


def test_several_candidates_are_labelled_by_their_directories(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name / "model").mkdir(parents=True)
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    assert decode_ab.main(["--candidate", first, "--candidate", first]) == 2
    assert "distinct names" in capsys.readouterr().err
    # each candidate is checked before any process starts
    assert decode_ab.main(["--candidate", first, "--candidate", second]) == 2
    assert capsys.readouterr().err.strip() == f"decode_ab: a {first} holds no model/ package"

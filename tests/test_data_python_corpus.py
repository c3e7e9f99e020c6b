"""The `python` corpus on a fake interpreter: stdlib + site-packages, licences, held-out copies."""

import json
import random

import pytest

from data import packages, sources
from data.curate import curate
from data.prepare import prepare
from data.sources import CorpusError, held_out_documents, is_held_out, iter_documents, parse_spec

HOLDOUT = 0.5


def _module(seed: int, n_functions: int = 12) -> str:
    """Seeded Python source, distinct per seed (no accidental near-duplicates)."""
    rng = random.Random(seed)
    words = [f"{rng.choice('abcdefgh')}{rng.randrange(10**6)}" for _ in range(200)]
    parts = [f'"""Module {seed}."""\n']
    for i in range(n_functions):
        a, b, c = rng.sample(words, 3)
        parts.append(
            f"def {a}_{i}({b}, {c}=None):\n"
            f'    """Combine {b} and {c}."""\n'
            f"    total = {b} + {rng.randrange(1000)}\n"
            f"    if {c} is not None:\n"
            f"        total *= {c} - {rng.randrange(1000)}\n"
            f"    return [{', '.join(rng.sample(words, 4))}, total]\n"
        )
    return "\n".join(parts)


def _names(held_out: bool, n: int) -> list[str]:
    found = (f"mod{i}.py" for i in range(1000) if is_held_out(f"mod{i}.py", HOLDOUT) == held_out)
    return [next(found) for _ in range(n)]


def _dist(site, name, files, **metadata):
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0"]
    lines += [f"{key.replace('_', '-')}: {value}" for key, value in metadata.items()]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    """A standard library with held-out and kept files, a test folder, and a site-packages
    with two distributions (one vendoring copies of stdlib files) and an unowned module."""
    stdlib, site = tmp_path / "lib", tmp_path / "site-packages"
    (held,), (kept,) = _names(True, 1), _names(False, 1)
    texts = {held: _module(1), kept: _module(2)}
    for name, text in texts.items():
        (stdlib / name).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / name).write_text(text)
    (stdlib / "test").mkdir()
    (stdlib / "test" / "test_x.py").write_text(_module(3))
    nearly = texts[held].replace("Module 1.", "Module one, vendored.", 1)
    package_files = {
        "alpha/__init__.py": _module(4),
        "alpha/_backport.py": texts[held],  # exact copy of a held-out file
        "alpha/_compat.py": nearly,  # near copy of a held-out file
        "alpha/_kept_copy.py": texts[kept],  # a copy of a kept file: an ordinary duplicate
        "alpha/tests/test_alpha.py": _module(5),
        "beta.py": _module(6),
    }
    for name, text in {**package_files, "loose.py": _module(7)}.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    _dist(site, "alpha", [f for f in package_files if f.startswith("alpha/")], License="MIT")
    _dist(
        site,
        "beta",
        ["beta.py"],
        License="Copyright (c) 2020 the beta authors. Permission is hereby granted, free of charge",
        Classifier="License :: OSI Approved :: BSD License",
    )
    monkeypatch.setattr(sources, "stdlib_root", lambda: stdlib)
    monkeypatch.setattr(packages, "site_packages_dirs", lambda: [site])
    return {"stdlib": stdlib, "site": site, "held": held, "kept": kept}


def test_python_spec_forms():
    assert str(parse_spec("python")) == "python"
    spec = parse_spec("python:holdout=0.1")
    assert (spec.kind, spec.holdout, str(spec)) == ("python", 0.1, "python:holdout=0.1")
    with pytest.raises(CorpusError, match="python:holdout=F needs"):
        parse_spec("python:holdout=2")


def test_documents_carry_package_and_license(fake_python):
    docs = {d.name: d for d in iter_documents("python")}
    site = fake_python["site"]
    labels = {
        name.removeprefix(f"{site}/"): (d.package, d.license)
        for name, d in docs.items()
        if name.startswith(str(site))
    }
    assert labels == {
        "alpha/__init__.py": ("alpha", "MIT"),
        "alpha/_backport.py": ("alpha", "MIT"),
        "alpha/_compat.py": ("alpha", "MIT"),
        "alpha/_kept_copy.py": ("alpha", "MIT"),
        "beta.py": ("beta", "BSD License"),  # full text in License: the classifier wins
        "loose.py": ("loose", "unknown"),  # no distribution lists it
    }
    stdlib_docs = [d for d in docs.values() if d.name.startswith(str(fake_python["stdlib"]))]
    assert {(d.package, d.license) for d in stdlib_docs} == {("stdlib", "PSF-2.0")}
    assert len(stdlib_docs) == 2  # the test folder is left out
    # The stdlib spec reads the same files, unlabelled.
    assert [d.package for d in iter_documents("stdlib")] == [None, None]


def test_holdout_drops_held_out_files_and_their_copies(fake_python):
    spec = "python:holdout=0.5"
    stdlib, site = fake_python["stdlib"], fake_python["site"]
    names = [d.name for d in iter_documents(spec)]
    assert str(stdlib / fake_python["held"]) not in names
    assert str(stdlib / fake_python["kept"]) in names
    assert [d.name for d in held_out_documents(spec)] == [str(stdlib / fake_python["held"])]
    kept, report = curate(iter_documents(spec), held_out=held_out_documents(spec), num_workers=1)
    reasons = report["dropped"]["by_reason"]
    assert reasons["held_out_copy"]["examples"] == [str(site / "alpha/_backport.py")]
    assert reasons["held_out_near_copy"]["examples"] == [str(site / "alpha/_compat.py")]
    assert reasons["exact_duplicate"]["examples"] == [str(site / "alpha/_kept_copy.py")]
    assert report["duplicates"] == {
        "exact_duplicate": 1,
        "near_duplicate": 0,
        "held_out_copy": 1,
        "held_out_near_copy": 1,
    }
    assert report["held_out_reference"]["docs"] == 1
    assert len(kept) == 4  # stdlib kept file, alpha/__init__, beta, loose
    # Without a holdout nothing is compared against: both vendored copies are duplicates.
    _, report = curate(iter_documents("python"), num_workers=1)
    assert report["duplicates"]["exact_duplicate"] == 2
    assert report["duplicates"]["near_duplicate"] == 1


def test_prepare_reports_licences_and_packages(fake_python, tmp_path):
    prepare(
        "python:holdout=0.5",
        tmp_path / "out",
        tokenizer="char",
        val_fraction=0.3,
        num_workers=1,
        progress=False,
    )
    report = json.loads((tmp_path / "out" / "curation_report.json").read_text())
    assert report["corpus"] == "python:holdout=0.5"
    for table in ("kept_by_license", "kept_by_package"):
        assert sum(v["docs"] for v in report[table].values()) == report["kept"]["docs"]
        assert sum(v["bytes"] for v in report[table].values()) == report["kept"]["bytes"]
    assert report["kept_by_package"]["alpha"]["docs"] == 1  # its three copies dropped
    assert set(report["kept_by_license"]) == {"PSF-2.0", "MIT", "BSD License", "unknown"}
    assert report["duplicates"]["held_out_copy"] == 1


def test_license_of_prefers_expression_then_short_license_then_classifiers():
    from email.message import Message

    def meta(**fields):
        m = Message()
        for key, value in fields.items():
            for v in value if isinstance(value, list) else [value]:
                m[key.replace("_", "-")] = v
        return m

    mit = "License :: OSI Approved :: MIT License"
    assert packages.license_of(meta(License_Expression="MIT", License="BSD")) == "MIT"
    assert packages.license_of(meta(License="Apache-2.0", Classifier=[mit])) == "Apache-2.0"
    assert packages.license_of(meta(License="UNKNOWN", Classifier=[mit])) == "MIT License"
    apache = "License :: OSI Approved :: Apache Software License"
    both = packages.license_of(meta(Classifier=[apache, mit]))
    assert both == "Apache Software License OR MIT License"
    assert packages.license_of(meta(License="MIT License\n\nCopyright ...")) == "MIT License"
    assert packages.license_of(meta(Name="x")) == "unknown"

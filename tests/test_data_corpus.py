"""The offline stdlib corpus: a split that depends on relative paths only, and the eval-text loader."""

import hashlib
import sys

import pytest

from ollm_triton.data.corpus import (
    EVAL_PERCENT,
    build_corpus,
    is_eval_path,
    list_source_files,
    load_corpus,
    load_eval_text,
)

# Pinned outcomes of the split rule: if these change, every recorded eval hash and perplexity changes meaning.
PINNED = {
    "_py_abc.py": True,
    "asyncio/threads.py": True,
    "collections/abc.py": True,
    "os.py": False,
    "json/decoder.py": False,
    "typing.py": False,
}


def _tree(root, files):
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def _fake_stdlib(n=200):
    files = {f"pkg{i % 7}/mod_{i}.py": f"def f{i}():\n    return {i}\n" for i in range(n)}
    files["site-packages/thirdparty/x.py"] = "third = 'party'\n"
    files["pkg0/latin1.py"] = b"s = '\xe9\xe8'\n"  # not UTF-8: skipped
    files["pkg0/notes.txt"] = "not python\n"
    return files


def test_split_rule_is_pinned():
    assert {p: is_eval_path(p) for p in PINNED} == PINNED


def test_split_depends_on_relative_path_not_root(tmp_path):
    files = _fake_stdlib()
    _tree(tmp_path / "a" / "lib", files)
    _tree(tmp_path / "elsewhere" / "python3.x", files)
    one = build_corpus(tmp_path / "a" / "lib", python_version="x")
    two = build_corpus(tmp_path / "elsewhere" / "python3.x", python_version="x")
    assert one.eval_paths == two.eval_paths and one.train_paths == two.train_paths
    assert one.eval_hash == two.eval_hash
    assert one.eval_paths == [p for p in sorted(one.eval_paths + one.train_paths) if is_eval_path(p)]
    assert set(one.eval_paths).isdisjoint(one.train_paths)


def test_split_is_stable_when_files_come_and_go(tmp_path):
    files = _fake_stdlib()
    _tree(tmp_path / "v1", files)
    fewer = {k: v for i, (k, v) in enumerate(files.items()) if i % 3}
    _tree(tmp_path / "v2", fewer)
    v1, v2 = build_corpus(tmp_path / "v1"), build_corpus(tmp_path / "v2")
    shared = set(v1.eval_paths + v1.train_paths) & set(v2.eval_paths + v2.train_paths)
    assert shared
    for p in shared:
        assert (p in v1.eval_paths) == (p in v2.eval_paths)


def test_skips_site_packages_non_utf8_and_non_python(tmp_path):
    _tree(tmp_path, _fake_stdlib())
    listed = list_source_files(tmp_path)
    assert not any(p.startswith("site-packages/") for p in listed)
    assert "pkg0/notes.txt" not in listed
    corpus = build_corpus(tmp_path)
    assert "pkg0/latin1.py" not in corpus.train_paths + corpus.eval_paths
    assert len(corpus.train_paths) + len(corpus.eval_paths) == 200


def test_eval_hash_is_content_hash(tmp_path):
    _tree(tmp_path, _fake_stdlib())
    corpus = build_corpus(tmp_path)
    assert corpus.eval_hash == hashlib.sha256(corpus.eval_text().encode()).hexdigest()


def test_bad_root(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        build_corpus(tmp_path / "missing")


def test_real_stdlib_corpus():
    corpus = load_corpus()
    assert load_corpus() is corpus  # cached
    assert corpus.python_version == "{}.{}.{}".format(*sys.version_info[:3])
    n = len(corpus.train_docs) + len(corpus.eval_docs)
    assert n > 500
    assert 0.5 * EVAL_PERCENT / 100 < len(corpus.eval_docs) / n < 2 * EVAL_PERCENT / 100
    assert sum(map(len, corpus.train_docs)) > 5_000_000  # megabytes of real source
    assert not any("site-packages" in p for p in corpus.train_paths)


def test_load_eval_text_corpus():
    text, meta = load_eval_text()
    corpus = load_corpus()
    assert text == corpus.eval_text()
    assert meta == {"data": "corpus", "python_version": corpus.python_version, "eval_hash": corpus.eval_hash}


def test_load_eval_text_local_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Call me Ishmael.\n", encoding="utf-8")
    text, meta = load_eval_text(str(path))
    assert text == "Call me Ishmael.\n"
    assert meta["data"] == str(path) and meta["eval_hash"] == hashlib.sha256(text.encode()).hexdigest()


def test_load_eval_text_rejects_unknown():
    with pytest.raises(ValueError, match="neither 'corpus', an existing text file"):
        load_eval_text("no/such/file.txt")


def test_load_eval_text_hf_offline_is_one_clear_line():
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("datasets is installed; the offline message is what this test checks")
    with pytest.raises(ValueError) as info:
        load_eval_text("hf:wikitext:wikitext-2-raw-v1:test")
    message = str(info.value)
    assert "\n" not in message and "network" in message and "'corpus'" in message
    with pytest.raises(ValueError, match="expected 'hf:<dataset>"):
        load_eval_text("hf:")

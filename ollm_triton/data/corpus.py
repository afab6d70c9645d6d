"""The offline text corpus: the Python standard library source of the running interpreter.

Every machine with Python has it, it holds long real documents with long-range dependencies (a name defined at the
top of a module is used hundreds of lines later), and nothing third-party has to be committed or downloaded.

Files are read in sorted order of their path relative to the stdlib root (site-packages excluded) and split into
train / eval by a hash of that relative path, so the same file lands in the same split on every machine and every
Python version that ships it. Results record the Python version and a content hash of the eval split, because the
text itself differs between Python versions.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

EVAL_PERCENT = 5
DOC_SEPARATOR = "\n\n"
# Folders whose content is not Python source worth learning from, or not ours to train on.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Corpus:
    """train_docs / eval_docs: file texts; paths: the relative paths in the same order."""

    root: str
    python_version: str
    train_docs: list[str] = field(repr=False)
    eval_docs: list[str] = field(repr=False)
    train_paths: list[str] = field(repr=False)
    eval_paths: list[str] = field(repr=False)
    eval_hash: str = ""

    def eval_text(self) -> str:
        return DOC_SEPARATOR.join(self.eval_docs)

    def train_text(self) -> str:
        return DOC_SEPARATOR.join(self.train_docs)

    def meta(self) -> dict[str, str]:
        return {"data": "corpus", "python_version": self.python_version, "eval_hash": self.eval_hash}


def is_eval_path(rel_path: str, eval_percent: int = EVAL_PERCENT) -> bool:
    """Split rule: sha256 of the POSIX relative path, first 8 bytes as an integer, modulo 100 < eval_percent."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < eval_percent


def list_source_files(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the *.py files under root, sorted, skipping site-packages and caches."""
    root = Path(root)
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of site-packages (which can be large) instead of filtering afterwards.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                rel_paths.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(rel_paths)


def build_corpus(root: str | os.PathLike, python_version: str | None = None) -> Corpus:
    """Read and split every readable UTF-8 *.py file under root (files that fail to decode are skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"corpus root {str(root)!r} is not a directory; expected a Python stdlib folder")
    train_docs, eval_docs, train_paths, eval_paths = [], [], [], []
    for rel in list_source_files(root):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        if is_eval_path(rel):
            eval_docs.append(text)
            eval_paths.append(rel)
        else:
            train_docs.append(text)
            train_paths.append(rel)
    if not train_docs or not eval_docs:
        raise ValueError(f"corpus root {str(root)!r} holds too few readable *.py files to split train/eval")
    eval_hash = hashlib.sha256(DOC_SEPARATOR.join(eval_docs).encode("utf-8")).hexdigest()
    return Corpus(
        root=str(root),
        python_version=python_version or platform.python_version(),
        train_docs=train_docs,
        eval_docs=eval_docs,
        train_paths=train_paths,
        eval_paths=eval_paths,
        eval_hash=eval_hash,
    )


@lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """The running interpreter's stdlib corpus, built once per process (about a second)."""
    return build_corpus(sysconfig.get_paths()["stdlib"])


def load_eval_text(data: str = "corpus") -> tuple[str, dict[str, str]]:
    """The text a perplexity evaluation reads, and metadata to record with the result.

    data: "corpus" (the stdlib eval split), a path to a local UTF-8 text file, or "hf:<dataset>[:<config>[:<split>]]"
    (e.g. "hf:wikitext:wikitext-2-raw-v1:test", "hf:pg19"), which needs the `datasets` library and network.
    """
    if data == "corpus":
        corpus = load_corpus()
        return corpus.eval_text(), corpus.meta()
    if data.startswith(_HF_PREFIX):
        return _load_hf_text(data)
    path = Path(data).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"data file {data!r} is not UTF-8 text") from None
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return text, {"data": str(path), "python_version": platform.python_version(), "eval_hash": digest}
    raise ValueError(
        f"data={data!r} is neither 'corpus', an existing text file, nor 'hf:<dataset>[:<config>[:<split>]]'"
    )


def _load_hf_text(data: str) -> tuple[str, dict[str, str]]:
    parts = data[len(_HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(
            f"data={data!r}: expected 'hf:<dataset>[:<config>[:<split>]]', e.g. hf:wikitext:wikitext-2-raw-v1"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    offline_hint = "offline, data= accepts 'corpus' (the stdlib eval split) or a local text file path"
    try:
        import datasets  # optional: only this option needs it
    except ImportError:
        raise ValueError(f"data={data!r} needs the `datasets` library and network; {offline_hint}") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # no network, unknown dataset, hub error: all end the same way for the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"data={data!r} could not be loaded ({first_line}); {offline_hint}") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    text = DOC_SEPARATOR.join(str(t) for t in ds[column])
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return text, {"data": data, "python_version": platform.python_version(), "eval_hash": digest}

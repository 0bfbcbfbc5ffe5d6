"""The reference corpus: CPython's own English documentation, read offline and without importing modules.

Documents are the language-reference topics of `pydoc_data` and the docstrings (module, class, function)
of the standard library's pure-Python sources, found with `ast` (nothing is imported or executed). Each
document becomes prose paragraphs; documents go to train or heldout by a hash of their text, so the split
does not depend on order or on the machine. Parts of the stdlib that distributions often leave out
(tkinter, idlelib, lib2to3, tests, ...) are skipped, so the same CPython minor version gives the same
corpus; `source_digest` covers exactly the files read, so any difference changes the model key."""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

# Optional or test-only parts of the stdlib, absent from some distributions' minimal installs.
SKIP_PARTS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "turtledemo",
    "tkinter",
    "lib2to3",
    "distutils",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "lib-dynload",
    "__pycache__",
    "__phello__",
    "pydoc_data",
}
SKIP_PREFIXES = ("_sysconfigdata", "config-")  # machine-specific build data
MIN_PARAGRAPH_CHARS = 40
MIN_PROSE_FRACTION = 0.8  # letters, spaces and ordinary punctuation; drops code, tables and signatures


def stdlib_dir() -> Path:
    return Path(sysconfig.get_path("stdlib"))


def topics_file() -> Path:
    return stdlib_dir() / "pydoc_data" / "topics.py"


@lru_cache(maxsize=1)
def source_files() -> tuple[Path, ...]:
    """The stdlib sources read for docstrings, in a fixed (sorted, relative-path) order."""
    root = stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_PARTS or part.startswith(SKIP_PREFIXES) for part in rel.parts):
            continue
        files.append(rel)
    return tuple(root / rel for rel in sorted(files, key=lambda p: p.as_posix()))


@lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over the relative path and bytes of every file the corpus is made from."""
    h = hashlib.sha256()
    root = stdlib_dir()
    for path in (topics_file(), *source_files()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a docstring or topic, each on one line with single spaces."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para) < MIN_PARAGRAPH_CHARS or para.startswith(">>>"):
            continue
        prose = sum(c.isalpha() or c in " .,;:'\"()-?!" for c in para)
        if prose / len(para) >= MIN_PROSE_FRACTION:
            out.append(para)
    return out


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # e.g. a grammar test fixture; deterministic per Python version
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    return [doc for doc in (ast.get_docstring(n, clean=True) for n in nodes) if doc]


def _topics() -> list[str]:
    # topics.py is a single dict literal; literal_eval reads it without importing anything.
    tree = ast.parse(topics_file().read_text(encoding="utf-8"))
    assign = next(n for n in tree.body if isinstance(n, ast.Assign))
    topics = ast.literal_eval(assign.value)
    return [topics[key] for key in sorted(topics)]


def documents() -> list[list[str]]:
    """Every document as its list of paragraphs; a paragraph seen before is dropped (no train/heldout leak)."""
    seen: set[str] = set()
    docs = []
    for raw in [*_topics(), *(d for f in source_files() for d in _docstrings(f))]:
        paras = []
        for para in paragraphs(raw):
            if para not in seen:
                seen.add(para)
                paras.append(para)
        if paras:
            docs.append(paras)
    return docs


def is_heldout(doc: list[str], heldout_percent: int) -> bool:
    digest = hashlib.sha256("\n\n".join(doc).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < heldout_percent


def split(heldout_percent: int) -> tuple[list[list[str]], list[list[str]]]:
    """(train docs, heldout docs), each in corpus order."""
    train, heldout = [], []
    for doc in documents():
        (heldout if is_heldout(doc, heldout_percent) else train).append(doc)
    return train, heldout


def write_split(out_dir: Path, heldout_percent: int) -> tuple[list[list[str]], list[list[str]]]:
    """Write train.txt / heldout.txt (blank-line separated paragraphs) and return the documents."""
    train, heldout = split(heldout_percent)
    for name, docs in (("train", train), ("heldout", heldout)):
        text = "\n\n".join(p for doc in docs for p in doc)
        (out_dir / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    return train, heldout

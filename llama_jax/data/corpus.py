"""The built-in corpus, read offline from the running interpreter: its standard library sources
(code) and the prose that ships with it (pydoc topics and docstrings).

Test suites and site-packages are left out. Files are split into train and validation by a hash
of their path relative to the stdlib root, so the split is the same on every machine and run.
"""

import ast
import functools
import hashlib
import pathlib
import sysconfig

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str, validation_fraction: float = 0.02, root=None) -> list:
    """Sorted list of .py paths for split 'train' or 'validation'."""
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} is unknown: use 'train' or 'validation'")
    root = pathlib.Path(root) if root else stdlib_root()
    files = [path for path in _python_files(root)
             if _in_split(path.relative_to(root).as_posix(), split, validation_fraction)]
    if not files:
        raise FileNotFoundError(f"no .py files for split {split!r} under {root}: the corpus "
                                "needs the interpreter's standard library sources")
    return files


@functools.lru_cache(maxsize=2)
def _python_files(root: pathlib.Path) -> tuple:
    """Every .py under root outside SKIP_DIRS, sorted: walked once a process (a second or so)."""
    return tuple(path for path in sorted(root.rglob("*.py"))
                 if not SKIP_DIRS & set(path.relative_to(root).parts[:-1]))


def read_text(path) -> str:
    return pathlib.Path(path).read_text(encoding="utf-8", errors="replace")


def _in_split(key: str, split: str, validation_fraction: float) -> bool:
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8
    return (bucket < validation_fraction) == (split == "validation")


def prose_documents(split: str, validation_fraction: float = 0.02) -> tuple:
    """(key, text) pairs of English prose that ships with Python: each pydoc topic (the language
    reference) and, per stdlib module, its module, class and function docstrings."""
    return tuple((k, t) for k, t in _prose() if _in_split(k, split, validation_fraction))


@functools.lru_cache(maxsize=1)
def _prose() -> tuple:
    """Every prose document of both splits. Parsing the stdlib takes seconds, and a run reads
    the prose three times (tokenizer, train and validation splits), hence the cache."""
    from pydoc_data.topics import topics
    docs = [(f"topic:{key}", topics[key]) for key in sorted(topics)]
    for path in stdlib_files("train") + stdlib_files("validation"):  # the order docs had
        try:
            tree = ast.parse(read_text(path))
        except SyntaxError:  # a few stdlib files are templates or target other versions
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(
            n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
        text = "\n\n".join(d for d in map(ast.get_docstring, nodes) if d)
        if text.strip():
            docs.append((f"docstrings:{path.relative_to(stdlib_root()).as_posix()}", text))
    return tuple(docs)

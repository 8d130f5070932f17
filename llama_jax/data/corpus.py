"""The built-in corpus: the running interpreter's standard library sources, read offline.

Test suites and site-packages are left out. Files are split into train and validation by a hash
of their path relative to the stdlib root, so the split is the same on every machine and run.
"""

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
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]):
            continue
        bucket = int(hashlib.sha256(rel.as_posix().encode()).hexdigest()[:8], 16) / 16**8
        if (bucket < validation_fraction) == (split == "validation"):
            files.append(path)
    if not files:
        raise FileNotFoundError(f"no .py files for split {split!r} under {root}: the corpus "
                                "needs the interpreter's standard library sources")
    return files


def read_text(path) -> str:
    return pathlib.Path(path).read_text(encoding="utf-8", errors="replace")

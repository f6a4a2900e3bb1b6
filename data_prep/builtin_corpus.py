"""Built-in corpora that exist on every machine with Python and need no download.

``builtin:python-docstrings``: the docstrings of the Python standard library that runs
data_prep (modules, classes, functions, its own test suite included), one document per
docstring, in sorted file order, then the topics of the language reference that
``pydoc`` ships (``pydoc_data/topics.py``). Read with :mod:`ast`, so nothing is imported
or executed. About 2.7 MB of English technical prose (Python 3.11), enough for the demo
and the tests; the exact bytes depend on the Python version.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import sys
import sysconfig
import warnings

from data_prep.atomic import atomic_file
from data_prep.errors import DataPrepError

BUILTINS = {"python-docstrings": "docstrings of the Python standard library"}
_MIN_CHARS = 40
_BLANK_LINES = re.compile(r"\n\s*\n")


def builtin_name(spec: str) -> str | None:
    """``NAME`` for an input spec ``builtin:NAME``, else None. Unknown names are an error."""
    if not spec.startswith("builtin:"):
        return None
    name = spec[len("builtin:") :]
    if name not in BUILTINS:
        raise DataPrepError(
            f"{spec}: unknown built-in corpus (available: "
            + ", ".join(f"builtin:{n}" for n in BUILTINS)
            + ")"
        )
    return name


def fingerprint(name: str) -> str:
    """What identifies the corpus' content: its name and the Python that produced it."""
    return f"builtin:{name} (Python {sys.version.split()[0]})"


def stdlib_files() -> list[str]:
    """The standard library's ``.py`` files (``site-packages`` left out), in sorted order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def _clean(doc: str) -> str:
    return _BLANK_LINES.sub("\n", inspect.cleandoc(doc)).strip()


def docstrings(path: str):
    """The docstrings of the file at ``path`` (module, classes, functions; at least
    :data:`_MIN_CHARS` characters, cleaned as ``inspect.cleandoc`` does, blank lines
    collapsed), and the topics of ``pydoc_data/topics.py``. Nothing in a file that does not
    parse."""
    try:
        with open(path, encoding="utf-8") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                text = _clean(doc)
                if len(text) >= _MIN_CHARS:
                    yield text
    if path.endswith(os.path.join("pydoc_data", "topics.py")):
        for node in tree.body:  # topics = {name: text, ...}
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                for value in node.value.values:
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        yield _clean(value.value)


def write_builtin(name: str, path: str) -> None:
    """Write the built-in corpus ``name`` to ``path`` as a ``.txt`` corpus (atomically)."""
    assert name == "python-docstrings", name
    # not synced: a work file of the run, deleted when it ends
    with atomic_file(path, sync=False) as out:
        for file in stdlib_files():
            for doc in docstrings(file):
                out.write(doc.replace("\x00", "").encode("utf-8"))
                out.write(b"\n\n")

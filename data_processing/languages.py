"""Map a file name to a programming language (or ``None`` when it is not source code we keep).

Matching is on the exact file name first (``Makefile``, ``Dockerfile``), then on the longest
known extension, so ``foo.d.ts`` is TypeScript and ``foo.min.js`` can be recognised as minified
by the ingest stage before it ever gets here.
"""

from __future__ import annotations

import os

# Extension -> language. Kept to extensions that almost always hold hand-written source: data
# formats (json, csv, yaml) are deliberately absent because they dominate byte counts without
# teaching a code model much (Codex and The Stack's "programming" subset make the same call).
EXTENSIONS: dict[str, str] = {
    ".py": "Python", ".pyi": "Python", ".pyw": "Python",
    ".js": "JavaScript", ".mjs": "JavaScript", ".cjs": "JavaScript", ".jsx": "JavaScript",
    ".ts": "TypeScript", ".tsx": "TypeScript", ".mts": "TypeScript", ".cts": "TypeScript",
    ".java": "Java",
    ".c": "C", ".h": "C",
    ".cc": "C++", ".cpp": "C++", ".cxx": "C++", ".c++": "C++", ".hh": "C++", ".hpp": "C++", ".hxx": "C++",
    ".cs": "C#",
    ".go": "Go",
    ".rs": "Rust",
    ".rb": "Ruby", ".rake": "Ruby", ".gemspec": "Ruby",
    ".php": "PHP",
    ".sh": "Shell", ".bash": "Shell", ".zsh": "Shell", ".ksh": "Shell",
    ".kt": "Kotlin", ".kts": "Kotlin",
    ".scala": "Scala", ".sc": "Scala",
    ".swift": "Swift",
    ".lua": "Lua",
    ".jl": "Julia",
    ".hs": "Haskell", ".lhs": "Haskell",
    ".r": "R", ".R": "R",
    ".sql": "SQL",
    ".pl": "Perl", ".pm": "Perl",
    ".m": "Objective-C", ".mm": "Objective-C",
    ".dart": "Dart",
    ".ex": "Elixir", ".exs": "Elixir",
    ".erl": "Erlang", ".hrl": "Erlang",
    ".clj": "Clojure", ".cljs": "Clojure",
    ".ml": "OCaml", ".mli": "OCaml",
    ".fs": "F#", ".fsx": "F#",
    ".f90": "Fortran", ".f95": "Fortran", ".f03": "Fortran",
    ".vue": "Vue",
    ".ps1": "PowerShell",
    ".groovy": "Groovy",
    ".zig": "Zig",
    ".nim": "Nim",
    ".cmake": "CMake",
    ".asm": "Assembly", ".s": "Assembly", ".S": "Assembly",
}

FILENAMES: dict[str, str] = {
    "Makefile": "Makefile", "makefile": "Makefile", "GNUmakefile": "Makefile",
    "Dockerfile": "Dockerfile",
    "CMakeLists.txt": "CMake",
    "Rakefile": "Ruby", "Gemfile": "Ruby",
    "Jenkinsfile": "Groovy",
}

LANGUAGES: frozenset[str] = frozenset(EXTENSIONS.values()) | frozenset(FILENAMES.values())


def detect_language(path: str | os.PathLike) -> str | None:
    """Language of a file from its name, or ``None`` when the name is not a known source type.

    Extensions are case-sensitive only where the case carries meaning (``.R`` vs ``.r`` both R,
    ``.S`` assembly); otherwise a lower-cased match is tried so ``FOO.PY`` is still Python.
    """
    name = os.path.basename(os.fspath(path))
    if name in FILENAMES:
        return FILENAMES[name]
    dot = name.find(".", 1)  # a leading dot is a hidden file, not an extension
    while dot != -1:
        ext = name[dot:]
        if ext in EXTENSIONS:
            return EXTENSIONS[ext]
        if ext.lower() in EXTENSIONS:
            return EXTENSIONS[ext.lower()]
        dot = name.find(".", dot + 1)
    return None

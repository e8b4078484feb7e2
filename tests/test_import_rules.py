"""The private-names import contract (tests/import_rules.py) on a planted package; the project's
own contracts run as ``lint-imports`` in run_scripts/test.sh."""

import sys

from tests.import_rules import private_name_imports


def test_private_names_found_across_modules_not_within(tmp_path, monkeypatch):
    pkg = tmp_path / "plantpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from ._impl import _helper  # own package: still another module\n")
    (pkg / "sub" / "_impl.py").write_text("def _helper():\n    return 1\n")
    (pkg / "a.py").write_text("def _own():\n    pass\n")
    (pkg / "b.py").write_text(
        "from plantpkg.a import (\n    ok_name,\n    _own,\n)\n\n\ndef f():\n    from .a import _own as x\n"
        "    from plantpkg import __doc__\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("plantpkg")]:
        monkeypatch.delitem(sys.modules, name)
    assert private_name_imports("plantpkg.b", {"plantpkg"}) == [(1, "plantpkg.a", "_own"), (8, "plantpkg.a", "_own")]
    assert private_name_imports("plantpkg.sub", {"plantpkg"}) == [(1, "plantpkg.sub._impl", "_helper")]
    assert private_name_imports("plantpkg.a", {"plantpkg"}) == []

"""License detection (licenseclassifier on LICENSE/COPYING files) and license filtering in prepare."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from data_processing import licenses, prepare
from data_processing.shards import ShardError, iter_dir_records

STDLIB = Path(sysconfig.get_paths()["stdlib"])

MIT = """MIT License

Copyright (c) 2024 Jane Doe

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

BSD2 = """Copyright (c) 2020, The Authors
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def test_detects_spdx_ids_from_license_texts():
    """Full texts are matched against the SPDX corpus; two licenses make an AND expression; a
    README that merely mentions a license, or a stub, is not a license."""
    assert licenses.detect_license_text(MIT) == "MIT"
    assert licenses.detect_license_text(BSD2) == "BSD-2-Clause"
    assert licenses.detect_license_text(MIT + "\n\n" + BSD2) == "MIT AND BSD-2-Clause"
    assert licenses.detect_license_text("This project is MIT licensed, see the docs.\n" * 3) == "unknown"
    assert licenses.detect_license_text("SPDX-License-Identifier: GPL-3.0-only\n") == "GPL-3.0-only"
    if (STDLIB / "LICENSE.txt").is_file():  # the interpreter's own license file (its whole history)
        found = licenses.detect_license_text((STDLIB / "LICENSE.txt").read_text())
        assert found.startswith("Python-2.0.1")
        assert licenses.LicensePolicy(licenses.read_license_list("permissive")).decide(found) == "kept"


def test_repo_license_file_names(tmp_path):
    """LICENSE, COPYING and LICENCE variants at the repository root; none means unknown."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "COPYING").write_text(BSD2)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "LICENSE.md").write_text(MIT)
    (tmp_path / "c" / "sub").mkdir(parents=True)
    (tmp_path / "c" / "sub" / "LICENSE").write_text(MIT)  # not at the root
    assert [licenses.detect_repo_license(tmp_path / r) for r in "abc"] == ["BSD-2-Clause", "MIT", "unknown"]


@pytest.mark.parametrize(("value", "decision"), [
    ("MIT", "kept"), ("mit", "kept"), ("Apache-2.0", "kept"), ("MIT,Apache-2.0", "kept"),
    (["MIT", "ISC"], "kept"), ("MIT OR GPL-3.0-only", "kept"), ("(GPL-2.0-only OR BSD-3-Clause)", "kept"),
    ("MIT AND GPL-3.0-only", "dropped_not_allowed"), ("GPL-3.0-only", "dropped_not_allowed"),
    ("MIT,GPL-2.0-or-later", "dropped_not_allowed"), ("unknown", "dropped_unknown"), ("", "dropped_unknown"),
    ([], "dropped_unknown"),
])
def test_permissive_decisions(value, decision):
    """Every AND part (list entry) needs an allowed OR alternative; ids compare case-insensitively."""
    assert licenses.LicensePolicy(licenses.read_license_list("permissive")).decide(value) == decision


def test_any_keeps_everything_and_keep_unknown():
    """``any`` keeps every record (today's behaviour); ``keep_unknown`` keeps unknown under a list."""
    assert licenses.LicensePolicy(None).decide("GPL-3.0-only") == "kept"
    assert licenses.LicensePolicy(None).decide("unknown") == "kept_unknown"
    allowed = licenses.read_license_list("permissive")
    assert licenses.LicensePolicy(allowed, keep_unknown=True).decide("unknown") == "kept_unknown"
    assert licenses.LicensePolicy(allowed, keep_unknown=True).decide("AGPL-3.0-only") == "dropped_not_allowed"


def test_license_list_file_and_bad_lists(tmp_path):
    """A FILE of SPDX ids with comments; a missing file, a malformed id or an empty file is an error."""
    good = tmp_path / "ok.txt"
    good.write_text("# ours\nMIT\n  GPL-3.0-only  # copyleft is fine here\n\nLicenseRef-Internal\n")
    assert licenses.read_license_list(str(good)) == {"mit", "gpl-3.0-only", "licenseref-internal"}
    with pytest.raises(ShardError, match="not 'permissive', 'any' or a file"):
        licenses.read_license_list("permisive")
    (tmp_path / "bad.txt").write_text("MIT\nApache 2.0\n")
    with pytest.raises(ShardError, match=r"bad.txt:2: 'Apache 2.0' is not an SPDX license id"):
        licenses.read_license_list(str(tmp_path / "bad.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ShardError, match="no license ids"):
        licenses.read_license_list(str(tmp_path / "empty.txt"))


@pytest.fixture
def three_repos(tmp_path):
    """An MIT repository, a GPL one (SPDX tag in its LICENSE) and one without a license file."""
    src = tmp_path / "src"
    for repo, lic in (("mitrepo", MIT), ("gplrepo", "SPDX-License-Identifier: GPL-3.0-or-later\n"), ("norepo", None)):
        shutil.copytree(STDLIB / "json", src / repo / repo, ignore=shutil.ignore_patterns("__pycache__"))
        if lic:
            (src / repo / "LICENSE").write_text(lic)
    return src


def test_prepare_permissive_keeps_only_mit(three_repos, tmp_path):
    """--licenses permissive: only the MIT repository's files reach the shards; counts per license
    and per decision in report.json."""
    out = tmp_path / "out"
    assert prepare.main(["--src", str(three_repos), "--out", str(out), "--workers", "1",
                         "--licenses", "permissive", "--validation-fraction", "0"]) == 0
    records = list(iter_dir_records(out / "train"))
    assert records and {r["meta"]["repo_name"] for r in records} == {"mitrepo"}
    assert {r["meta"]["license"] for r in records} == {"MIT"}
    report = json.loads((out / "report.json").read_text())["licenses"]
    n = len(list((STDLIB / "json").glob("*.py")))
    assert report["policy"] == "permissive" and report["keep_unknown"] is False
    assert {k: v["files"] for k, v in report["by_decision"].items()} == \
        {"kept": n, "dropped_not_allowed": n, "dropped_unknown": n}
    assert report["by_license"]["GPL-3.0-or-later"] == {"files": n, "bytes": report["by_license"]["MIT"]["bytes"],
                                                        "decision": "dropped_not_allowed"}
    assert report["by_license"]["unknown"]["decision"] == "dropped_unknown"


def test_prepare_default_any_keeps_all(three_repos, tmp_path):
    """The default (any) keeps every repository, as before; the report still counts licenses. (The
    three copies are exact duplicates, so dedup keeps the lowest repository name, gplrepo.)"""
    report = prepare.prepare(tmp_path / "out", sources=[str(three_repos)], workers=1, progress=False,
                             validation_fraction=0)
    n = len(list((STDLIB / "json").glob("*.py")))
    assert report["licenses"]["policy"] == "any"
    assert {k: v["files"] for k, v in report["licenses"]["by_decision"].items()} == {"kept": 2 * n, "kept_unknown": n}
    assert report["dedup"]["input"]["files"] == 3 * n
    assert {r["meta"]["repo_name"] for r in iter_dir_records(tmp_path / "out" / "train")} == {"gplrepo"}


def test_prepare_unknown_list_is_one_line_exit_2(three_repos, tmp_path, capsys):
    """An unknown license list: one line naming it, exit 2, no output folder."""
    assert prepare.main(["--src", str(three_repos), "--out", str(tmp_path / "out"), "--licenses", "copyleft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "copyleft" in err[0] and err[0].startswith("error:")
    assert not (tmp_path / "out").exists()


def test_cli_on_shards(tmp_path, capsys):
    """``python -m data_processing.licenses`` on shards: meta.license decides; report written."""
    from data_processing.shards import write_shard

    def rec(name, lic):
        return {"text": f"# {name}\n", "meta": {"repo_name": name, "file_name": "a.py", "license": lic}}

    write_shard(tmp_path / "in" / "a.jsonl", [rec("a", "mit"), rec("b", "GPL-3.0"), rec("c", "unknown"),
                                              rec("d", ["MIT", "Apache-2.0"])])
    assert licenses.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                          "--licenses", "permissive", "--keep-unknown-license"]) == 0
    assert [r["meta"]["repo_name"] for r in iter_dir_records(tmp_path / "out")] == ["a", "c", "d"]
    report = json.loads((tmp_path / "out" / "license_report.json").read_text())
    assert report["by_license"]["MIT,Apache-2.0"]["decision"] == "kept"
    assert json.loads(capsys.readouterr().out)["by_decision"] == {"kept": 2, "kept_unknown": 1,
                                                                  "dropped_not_allowed": 1}

"""Licenses: detect a repository's license (SPDX ids) and keep only files whose license is allowed.

Detection reads the ``LICENSE``/``COPYING`` file at the root of a source tree with
``licenseclassifier`` (a pure-Python port of Google's licensecheck that matches the SPDX License
List's texts and templates; it reports nothing rather than guess when the text is not mostly a
license). Several licenses in one file (a dual-licensed project, bundled notices) become an SPDX
``AND`` expression in their order of appearance.

    python -m data_processing.licenses --input SHARDS --output DIR --licenses permissive [--keep-unknown-license]

Filtering (``prepare --licenses permissive|FILE|any``, or the command above on shards) reads
``meta.license``: an SPDX id, an SPDX expression (``MIT OR Apache-2.0``, ``MIT AND BSD-3-Clause``),
a comma-separated list as The Stack's ``max_stars_repo_licenses`` / ``detected_licenses`` give it (every listed license
applies, like ``AND``), or ``unknown``. A record is kept when every ``AND`` part has at least one
allowed ``OR`` alternative; ids compare case-insensitively (Code Clippy wrote GitHub's lowercase
keys, ``mit``, ``apache-2.0``). Unknown licenses are dropped under a list unless
``--keep-unknown-license`` (The Stack v2 keeps them as ``no_license``; v1 and StarCoder's
permissive set did not).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_processing.atomic import write_json_atomic
from data_processing.shards import ShardError, ShardSetWriter, iter_dir_records

LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENSE.rst", "COPYING", "COPYING.txt", "COPYING.md",
                 "LICENCE", "LICENCE.txt", "LICENCE.md")
UNKNOWN = "unknown"
# Read at most this much of a license file: license texts are < 40 KB (AGPL-3.0 is 34 KB); a file
# larger than this is a bundle of third-party notices, whose head still names the project's own.
MAX_LICENSE_CHARS = 64_000

# Permissive licenses, drawn from the list The Stack published for its permissive subset (Kocetkov
# et al. 2022) that StarCoder trained on: no copyleft, no field-of-use restriction, attribution at
# most. Documented in docs/data.md; a project with other needs passes its own FILE.
PERMISSIVE = (
    "0BSD", "AFL-3.0", "Apache-1.1", "Apache-2.0", "Artistic-2.0", "BSL-1.0", "BSD-1-Clause", "BSD-2-Clause",
    "BSD-2-Clause-Patent", "BSD-3-Clause", "BSD-3-Clause-Clear", "BSD-4-Clause", "CC-BY-3.0", "CC-BY-4.0",
    "CC0-1.0", "ECL-2.0", "ISC", "MIT", "MIT-0", "MS-PL", "MulanPSL-2.0", "NCSA", "PHP-3.01", "PostgreSQL",
    "PSF-2.0", "Python-2.0", "Python-2.0.1", "Unicode-DFS-2016", "Unlicense", "UPL-1.0", "W3C", "WTFPL", "X11",
    "Zlib", "ZPL-2.1",
)
_SPDX_ID = re.compile(r"^(?:LicenseRef-)?[A-Za-z0-9][A-Za-z0-9.+\-]*$")
_SPDX_TAG = re.compile(r"SPDX-License-Identifier:\s*([^\s*#/]+(?:\s+(?:AND|OR|WITH)\s+[^\s*#/]+)*)")


def detect_license_text(text: str) -> str:
    """SPDX expression for a license file's text (``AND`` of every license found, in order), an
    ``SPDX-License-Identifier`` tag's expression when the text is no full license, or ``unknown``."""
    from licenseclassifier import identify_license  # ~30 ms to load its corpus; only when a file is read

    ids: list[str] = []
    for match in identify_license(text[:MAX_LICENSE_CHARS]):
        if match.id not in ids:
            ids.append(match.id)
    if ids:
        return " AND ".join(ids)
    tag = _SPDX_TAG.search(text[:MAX_LICENSE_CHARS])
    return tag.group(1) if tag else UNKNOWN


def detect_repo_license(repo_dir: str | Path) -> str:
    """License of the repository rooted at ``repo_dir``, from its first license file, or ``unknown``."""
    repo_dir = Path(repo_dir)
    for name in LICENSE_FILES:
        path = repo_dir / name
        if path.is_file():
            try:
                text = path.read_text("utf-8", errors="replace")
            except OSError:
                continue
            return detect_license_text(text)
    return UNKNOWN


def parse_license(value: Any) -> list[list[str]]:
    """``meta.license`` as conjunctive normal form: a list of ``AND`` parts, each a list of ``OR``
    alternatives. Lists and comma-separated strings are ``AND``s; ``unknown`` or empty is ``[]``."""
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    text = str(value or "").replace("(", " ").replace(")", " ").strip()
    if not text or text.lower() in (UNKNOWN, "none", "noassertion", "no_license"):
        return []
    parts = []
    for conjunct in re.split(r",|;|\s+AND\s+", text):
        alternatives = [a.strip() for a in re.split(r"\s+OR\s+|/", conjunct) if a.strip()]
        if alternatives:
            parts.append(alternatives)
    return parts


def read_license_list(spec: str) -> frozenset[str] | None:
    """The allowed ids (lowercased) for ``--licenses``: ``any`` is None (keep everything),
    ``permissive`` the list above, anything else a file of SPDX ids, one a line (``#`` comments).
    Raises ``ShardError`` (exit 2 in the CLIs) for a missing file or a line that is no SPDX id."""
    if spec == "any":
        return None
    if spec == "permissive":
        return frozenset(i.lower() for i in PERMISSIVE)
    path = Path(spec)
    if not path.is_file():
        raise ShardError(f"--licenses {spec}: not 'permissive', 'any' or a file of SPDX ids")
    ids = set()
    for lineno, line in enumerate(path.read_text("utf-8", errors="replace").splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not _SPDX_ID.match(entry):
            raise ShardError(f"{spec}:{lineno}: {entry!r} is not an SPDX license id")
        ids.add(entry.lower())
    if not ids:
        raise ShardError(f"{spec}: no license ids in the file")
    return frozenset(ids)


@dataclass
class LicensePolicy:
    """Which licenses pass: ``allowed`` ids (lowercased; None keeps everything) and whether records
    of unknown license are kept under a list."""

    allowed: frozenset[str] | None = None
    keep_unknown: bool = False
    spec: str = "any"

    def decide(self, value: Any) -> str:
        """``kept``, ``kept_unknown``, ``dropped_not_allowed`` or ``dropped_unknown``."""
        parts = parse_license(value)
        if not parts:
            return "kept_unknown" if self.allowed is None or self.keep_unknown else "dropped_unknown"
        if self.allowed is None:
            return "kept"
        ok = all(any(alt.lower() in self.allowed for alt in alts) for alts in parts)
        return "kept" if ok else "dropped_not_allowed"


@dataclass
class LicenseStats:
    """Counts for ``report.json["licenses"]``: per license value and per decision."""

    policy: str = "any"
    keep_unknown: bool = False
    by_license: dict[str, dict[str, int]] = field(default_factory=dict)
    by_decision: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, license_value: str, decision: str, size: int) -> None:
        for table, key in ((self.by_license, license_value), (self.by_decision, decision)):
            entry = table.setdefault(key, {"files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += size
        self.by_license[license_value].setdefault("decision", decision)

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "keep_unknown": self.keep_unknown,
            "by_decision": dict(sorted(self.by_decision.items())),
            "by_license": dict(sorted(self.by_license.items(), key=lambda kv: (-kv[1]["files"], kv[0]))),
        }


def filter_records(records: Iterable[dict[str, Any]], policy: LicensePolicy,
                   stats: LicenseStats) -> Iterator[dict[str, Any]]:
    """Pass on the records whose ``meta.license`` the policy keeps; count every decision."""
    stats.policy, stats.keep_unknown = policy.spec, policy.keep_unknown
    for record in records:
        meta = record["meta"]
        value = meta.get("license", UNKNOWN)
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        decision = policy.decide(value)
        stats.add(str(value or UNKNOWN), decision, int(meta.get("size") or len(record["text"].encode("utf-8"))))
        if decision.startswith("kept"):
            yield record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder, file or glob of input shards")
    p.add_argument("--output", required=True, help="folder for licensed-NNNNN.jsonl.zst and license_report.json")
    p.add_argument("--licenses", required=True, metavar="permissive|FILE|any", help="allowed SPDX ids")
    p.add_argument("--keep-unknown-license", action="store_true", help="also keep files of unknown license")
    p.add_argument("--shard-size-mb", type=float, default=64.0)
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad records instead of stopping")
    args = p.parse_args(argv)
    stats = LicenseStats()
    try:
        policy = LicensePolicy(read_license_list(args.licenses), args.keep_unknown_license, args.licenses)
        records = iter_dir_records(args.input, skip_bad=args.skip_bad)
        with ShardSetWriter(args.output, "licensed", max_bytes=int(args.shard_size_mb * (1 << 20))) as writer:
            for record in filter_records(records, policy, stats):
                writer.write(record)
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = stats.as_dict()
    write_json_atomic(Path(args.output) / "license_report.json", report)
    print(json.dumps({"files": writer.count, "by_decision": {k: v["files"] for k, v in report["by_decision"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

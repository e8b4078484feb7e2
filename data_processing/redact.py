"""Redact secrets and personal data: emails, IP addresses, keys, tokens and passwords become typed
placeholders (``<EMAIL>``, ``<IP_ADDRESS>``, ``<KEY>``, ``<PASSWORD>``), as BigCode's PII pipeline
does for The Stack / StarCoder (Li et al. 2023, §4; bigcode-dataset/pii).

Keys and tokens are found with Yelp's ``detect-secrets`` plugins (their maintained regexes and
false-positive heuristics); detect-secrets has no e-mail detector, so e-mails use a regex of ours
modelled on BigCode's; IPv4 candidates come from detect-secrets' ``IPPublicDetector`` and every IP
(v4 and v6) is checked with the standard library's ``ipaddress`` (only globally routable addresses
are personal data: private, loopback, documentation and reserved ranges are kept).

    python -m data_processing.redact --input DIR --output DIR     # shards in, redacted shards out

In ``prepare`` the stage is on by default (``--no-redact`` turns it off); counts by kind go to
``report.json`` under ``redact``.
"""

from __future__ import annotations

import argparse
import bisect
import ipaddress
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detect_secrets.filters import heuristic
from detect_secrets.plugins.artifactory import ArtifactoryDetector
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString
from detect_secrets.plugins.ip_public import IPPublicDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.keyword import KeywordDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

from data_processing import ingest
from data_processing.atomic import write_json_atomic
from data_processing.shards import ShardError, ShardSetWriter, iter_dir_records

PLACEHOLDERS = {"email": "<EMAIL>", "ip_address": "<IP_ADDRESS>", "key": "<KEY>", "password": "<PASSWORD>"}

# (kind counted in the report, placeholder family, detect-secrets plugin, prefilter: literals one of
# which must be in the text, or a literal-led regex that must match). Every plugin here has a token
# format distinctive enough to match anywhere in a file. The prefilter is for speed: a regex that
# starts with a character class makes Python's ``re`` try every position (Artifactory's ran at
# 4 MB/s on the stdlib); a substring test or a literal-led search runs at hundreds of MB/s.
TOKEN_PLUGINS = (
    ("aws_key", "key", AWSKeyDetector(), ("AKIA", "ASIA", "ABIA", "ACCA", "A3T", "aws", "AWS", "Aws")),
    ("github_token", "key", GitHubTokenDetector(), ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    ("gitlab_token", "key", GitLabTokenDetector(),
     re.compile(r"gl(?:pat|dt|ft|soat|rt|cbt|imt|ptt|agent|oas)-|GR1348941")),
    ("slack_token", "key", SlackDetector(), ("xox", "XOX", "hooks.slack.com")),
    ("stripe_key", "key", StripeDetector(), ("k_live_",)),
    ("sendgrid_key", "key", SendGridDetector(), ("SG.",)),
    ("twilio_key", "key", TwilioKeyDetector(), ("AC", "SK")),
    ("openai_key", "key", OpenAIDetector(), ("T3BlbkFJ",)),
    ("pypi_token", "key", PypiTokenDetector(), ("pypi-",)),
    ("npm_token", "key", NpmDetector(), ("_authToken",)),
    ("discord_token", "key", DiscordBotTokenDetector(), re.compile(r"\.[a-zA-Z\d_-]{6}\.[a-zA-Z\d_-]{27}")),
    ("mailchimp_key", "key", MailchimpDetector(), ("-us",)),
    ("square_oauth", "key", SquareOAuthDetector(), ("sq0csp-",)),
    ("azure_storage_key", "key", AzureStorageKeyDetector(), ("AccountKey=",)),
    ("artifactory_token", "key", ArtifactoryDetector(), re.compile(r"A(?:KC[a-zA-Z0-9]{10}|P[\dA-F][a-zA-Z0-9]{8})")),
    ("jwt", "key", JwtTokenDetector(), ("eyJ",)),
    ("url_password", "password", BasicAuthDetector(), ("://",)),
)

# detect-secrets reports only the "BEGIN ... PRIVATE KEY" header; the placeholder must cover the
# whole armoured block, so the block's extent is found here (to the END line, or else to the first
# blank line when the block is cut off).
_PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\n\s*\n|\Z)",
    re.DOTALL,
)
_PRIVATE_KEY = PrivateKeyDetector()
_JWT_TAIL = re.compile(r"[A-Za-z0-9_\-=+/.]*")

# E-mails: detect-secrets has none, so these regexes are ours, after BigCode's
# pii/utils/emails_ip_addresses_detection.py (which needs the third-party ``regex`` module for \p{L};
# ASCII domains are what code holds). Matching is anchored on "@" (a substring search) because a
# pattern that starts with a character class made ``re`` try every position (17 MB/s).
_EMAIL_AT = re.compile(r"@(?=[A-Za-z0-9])")
_EMAIL_LOCAL = re.compile(r"(?<![\w.%+\-/])[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}\Z")
_EMAIL_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w\-]|\.\w)")
# Domains reserved for documentation and tests (RFC 2606, RFC 6761): no person behind them.
_RESERVED_DOMAINS = ("example.com", "example.org", "example.net", "example.edu")
_RESERVED_TLDS = (".example", ".test", ".invalid", ".localhost", ".local")
# Mailbox names that are never a person's (git remotes, bots).
_ROLE_LOCALS = frozenset({"git", "noreply", "no-reply", "donotreply"})

# IPv4: detect-secrets' IPPublicDetector regex decides, but only where a cheap anchor (".d.d.d",
# led by a literal, ~200 MB/s) says an address may start; run over the whole text it made 4 MB/s.
_IPV4 = IPPublicDetector.denylist[0]
_IPV4_ANCHOR = re.compile(r"\.\d{1,3}\.\d{1,3}\.\d")
# IPv6 (detect-secrets has no detector): runs of hex digits and colons around a ":h:" anchor;
# ``ipaddress`` then decides what is an address.
_IPV6_ANCHOR = re.compile(r":[0-9A-Fa-f]{0,4}:")
_HEX_COLON_RUN = re.compile(r"[0-9A-Fa-f:]*")
# Version strings and section numbers look like IPv4 addresses (setup.py's version="1.2.3.4",
# "RFC 7231 section 7.1.1.1"): BigCode drops a match with "version" shortly before it on the line.
_VERSION_CONTEXT = re.compile(r"(?:version|ver|release|rev|sections?|sec|§)[\W_]{0,8}$", re.IGNORECASE)
# A network ("192.0.2.0/24") names a range, not a person's machine.
_CIDR_SUFFIX = re.compile(r"/\d{1,3}\b")
# Public DNS resolvers appear in configs and tests everywhere and identify no one (BigCode keeps them).
_PUBLIC_DNS = frozenset({"8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9", "149.112.112.112",
                         "208.67.222.222", "208.67.220.220", "76.76.19.19", "94.140.14.14", "94.140.15.15"})

# Generic secrets: a quoted high-entropy string (detect-secrets' entropy plugins and limits) is a
# secret only when the line assigns it to a secret-looking name; alone, the plugins flag every hash
# and test vector in ordinary code (the stdlib's test_hashlib has hundreds). Lines are found from a
# literal-led anchor (an assignment of a quoted string) and a look at the name before it.
_BASE64 = Base64HighEntropyString()
_HEX = HexHighEntropyString()
_ASSIGN_ANCHOR = re.compile(r"[=:]\s*@?['\"`]")
_SECRET_WORDS = ("key", "secret", "token", "passw", "pwd", "auth", "credential", "api", "signature", "salt",
                 "contrase")
_NAME_WINDOW = 48
_MIN_SECRET_CHARS = 20
_KEYWORD = KeywordDetector()


@dataclass
class Span:
    """One finding: ``text[start:end]`` is replaced by the placeholder of ``family``."""

    start: int
    end: int
    kind: str
    family: str


@dataclass
class RedactStats:
    """Counts for ``report.json``: findings redacted by kind, and candidates deliberately kept."""

    files: int = 0
    files_changed: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    redacted: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "files": self.files,
            "files_changed": self.files_changed,
            "redacted": dict(sorted(self.redacted.items())),
            "redacted_total": sum(self.redacted.values()),
            "kept_candidates": dict(sorted(self.kept.items())),
            "placeholders": PLACEHOLDERS,
            "seconds": self.seconds,
            "mb_per_s": self.bytes_in / 1e6 / max(self.seconds, 1e-9),
        }


def _line_bounds(text: str, pos: int) -> tuple[int, int]:
    """Start and end offsets of the line holding ``pos``."""
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return start, len(text) if end < 0 else end


def find_emails(text: str, kept: Counter) -> Iterator[Span]:
    """E-mail addresses, except reserved documentation domains and role mailboxes."""
    for at in _EMAIL_AT.finditer(text):
        i = at.start()
        local = _EMAIL_LOCAL.search(text, max(0, i - 64), i)
        domain_match = _EMAIL_DOMAIN.match(text, i + 1)
        if local is None or domain_match is None:
            continue
        domain = domain_match.group().lower()
        if domain in _RESERVED_DOMAINS or domain.endswith(_RESERVED_TLDS) or \
                any(domain.endswith("." + d) for d in _RESERVED_DOMAINS):
            kept["email_reserved_domain"] += 1
        elif local.group().lower() in _ROLE_LOCALS:
            kept["email_role_mailbox"] += 1
        else:
            yield Span(local.start(), domain_match.end(), "email", "email")


def _is_global_ip(candidate: str) -> bool:
    try:
        return ipaddress.ip_address(candidate).is_global
    except ValueError:
        return False


def _ipv4_kept_reason(text: str, start: int, end: int, address: str) -> str | None:
    """Why an IPv4 match is not personal data, or None when it is to be redacted."""
    line_start = text.rfind("\n", 0, start) + 1
    if _VERSION_CONTEXT.search(text, max(line_start, start - 24), start):
        return "ip_version_string"
    if _CIDR_SUFFIX.match(text, end):
        return "ip_network"
    if address in _PUBLIC_DNS:
        return "ip_public_dns"
    if not _is_global_ip(address):
        return "ip_not_global"
    return None


def find_ipv4(text: str, kept: Counter) -> Iterator[Span]:
    """Globally routable IPv4 addresses (detect-secrets' IPPublicDetector, then ``ipaddress``)."""
    done = 0
    for anchor in _IPV4_ANCHOR.finditer(text):
        start = anchor.start()
        while start > done and start > anchor.start() - 3 and text[start - 1].isdigit():
            start -= 1
        if start < done:
            continue
        m = _IPV4.match(text, start)
        if m is None:
            continue
        done = m.end()
        address = m.group(1).split(":")[0]
        end = m.start(1) + len(address)
        reason = _ipv4_kept_reason(text, m.start(1), end, address)
        if reason:
            kept[reason] += 1
        else:
            yield Span(m.start(1), end, "ipv4", "ip_address")


def find_ipv6(text: str, kept: Counter) -> Iterator[Span]:
    """Globally routable IPv6 addresses: hex-and-colon runs that ``ipaddress`` accepts."""
    done = 0
    for anchor in _IPV6_ANCHOR.finditer(text):
        if anchor.start() < done:
            continue
        start = anchor.start()
        while start > 0 and start > anchor.start() - 40 and text[start - 1] in "0123456789abcdefABCDEF:":
            start -= 1
        end = _HEX_COLON_RUN.match(text, start).end()
        done = end
        candidate = text[start:end]
        before = text[start - 1] if start else " "
        after = text[end] if end < len(text) else " "
        if before.isalnum() or before in "_." or after.isalnum() or after in "_." or \
                sum(c != ":" for c in candidate) < 4 or sum(1 for g in candidate.split(":") if g) < 2:
            continue  # part of a word or dotted name, "a::b" C++ scopes, slices such as a[::1000]
        if _CIDR_SUFFIX.match(text, end):
            kept["ip_network"] += 1
        elif _is_global_ip(candidate):
            yield Span(start, end, "ipv6", "ip_address")


def find_tokens(text: str) -> Iterator[Span]:
    """Service keys and tokens of distinctive formats: the values detect-secrets' regex plugins
    report (their own validation included, e.g. JWTs must decode), located in ``text``."""
    for kind, family, plugin, prefilter in TOKEN_PLUGINS:
        if not (prefilter.search(text) if isinstance(prefilter, re.Pattern) else any(s in text for s in prefilter)):
            continue
        reported = set(plugin.analyze_string(text))
        if not reported:
            continue
        for regex in plugin.denylist:
            for m in regex.finditer(text):
                if not any(m.group(g) in reported for g in range(0, (m.lastindex or 0) + 1)):
                    continue  # the plugin's own validation (e.g. a JWT must decode) said no
                start, end = _secret_extent(m)
                if kind == "jwt":
                    # detect-secrets' JWT regex ends lazily before the signature; the signature is
                    # part of the token.
                    end = _JWT_TAIL.match(text, end).end()
                value = text[start:end]
                if len(value) >= 8 and not heuristic.is_sequential_string(value):
                    yield Span(start, end, kind, family)


def _secret_extent(m: re.Match) -> tuple[int, int]:
    """The secret inside a plugin's match: its longest group when that is at least half the match
    (an AWS secret key after its name, a URL's password), else the whole match (a group that only
    captures the token's prefix, like GitHub's "ghp")."""
    groups = [g for g in range(1, (m.lastindex or 0) + 1) if m.group(g)]
    if groups:
        g = max(groups, key=lambda i: len(m.group(i)))
        if 2 * len(m.group(g)) >= len(m.group(0)):
            return m.start(g), m.end(g)
    return m.start(), m.end()


def find_private_keys(text: str) -> Iterator[Span]:
    """Armoured private-key blocks (PEM, OpenSSH, PGP, PuTTY headers as detect-secrets lists them)."""
    if "PRIVATE KEY" not in text and "PuTTY-User-Key" not in text:
        return
    if not any(True for _ in _PRIVATE_KEY.analyze_string(text)):
        return
    for m in _PRIVATE_KEY_BLOCK.finditer(text):
        yield Span(m.start(), m.end(), "private_key", "key")


def _plausible_secret(value: str, line: str) -> bool:
    """detect-secrets' false-positive heuristics for a candidate value on ``line``."""
    return not (
        len(value) < 4
        # The value names the field rather than being its content: PASSWORD_FIELD = "password".
        or any(word in value.lower() for word in _SECRET_WORDS)
        or heuristic.is_templated_secret(value)
        or heuristic.is_prefixed_with_dollar_sign(value)
        or heuristic.is_potential_uuid(value)
        or heuristic.is_sequential_string(value)
        or heuristic.is_likely_id_string(value, line)
        or heuristic.is_indirect_reference(line)
    )


def _secret_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(offset, line)`` of each line that assigns a quoted string to a secret-looking name."""
    seen = -1
    for anchor in _ASSIGN_ANCHOR.finditer(text):
        start, end = _line_bounds(text, anchor.start())
        if start == seen:
            continue
        name = text[max(start, anchor.start() - _NAME_WINDOW):anchor.start()].lower()
        if any(word in name for word in _SECRET_WORDS):
            seen = start
            yield start, text[start:end]


def find_assigned_secrets(text: str, kept: Counter) -> Iterator[Span]:
    """Passwords/keys assigned to secret-looking names: detect-secrets' KeywordDetector, and its
    quoted high-entropy strings (Base64 > 4.5 bits, hex > 3 bits per character, 20+ characters)."""
    for start, line in _secret_lines(text):
        if len(line) > 1000:
            continue  # KeywordDetector's regexes backtrack badly on very long lines
        found: set[tuple[int, int]] = set()
        for plugin in (_BASE64, _HEX):
            for m in plugin.regex.finditer(line):
                value = m.group(2)
                if len(value) < _MIN_SECRET_CHARS:
                    continue
                if plugin.calculate_shannon_entropy(value) > plugin.entropy_limit and _plausible_secret(value, line):
                    found.add((m.start(2), m.end(2)))
                    yield Span(start + m.start(2), start + m.end(2), "high_entropy_secret", "key")
                else:
                    kept["low_entropy_assignment"] += 1
        for value in _KEYWORD.analyze_string(line):
            offset = line.find(value) if value else -1
            if offset < 0 or (offset, offset + len(value)) in found or not _plausible_secret(value, line):
                continue
            yield Span(start + offset, start + offset + len(value), "keyword_password", "password")


def find_spans(text: str, kept: Counter | None = None) -> list[Span]:
    """Every finding in ``text``, in text order, without overlaps. Where findings overlap the
    first-found wins, in this order: private-key blocks, service tokens, assigned secrets, e-mails,
    IP addresses (so ``scheme://user:password@host`` is a password, not an e-mail address)."""
    kept = kept if kept is not None else Counter()
    accepted: list[Span] = []  # kept sorted by start; accepted spans never overlap
    starts: list[int] = []
    for found in (find_private_keys(text), find_tokens(text), find_assigned_secrets(text, kept),
                  find_emails(text, kept), find_ipv4(text, kept), find_ipv6(text, kept)):
        for span in sorted(found, key=lambda s: (s.start, -(s.end - s.start))):
            i = bisect.bisect_left(starts, span.start)
            if (i > 0 and accepted[i - 1].end > span.start) or (i < len(accepted) and accepted[i].start < span.end):
                continue
            accepted.insert(i, span)
            starts.insert(i, span.start)
    return accepted


def redact_text(text: str, stats: RedactStats | None = None) -> str:
    """``text`` with every finding replaced by its placeholder; counts go to ``stats``."""
    stats = stats if stats is not None else RedactStats()
    spans = find_spans(text, stats.kept)
    if not spans:
        return text
    parts, pos = [], 0
    for span in spans:
        parts.append(text[pos:span.start])
        parts.append(PLACEHOLDERS[span.family])
        pos = span.end
        stats.redacted[span.kind] += 1
    parts.append(text[pos:])
    return "".join(parts)


def redact_records(records: Iterable[dict[str, Any]], stats: RedactStats) -> Iterator[dict[str, Any]]:
    """Redact each record's text in place (``meta.size`` updated; ``meta.redactions`` when changed)."""
    for record in records:
        t0 = time.perf_counter()
        text = record["text"]
        before = sum(stats.redacted.values())
        new = redact_text(text, stats)
        stats.files += 1
        stats.bytes_in += len(text)
        if new is not text:
            record["text"] = new
            record["meta"]["size"] = len(new.encode("utf-8"))
            record["meta"]["redactions"] = sum(stats.redacted.values()) - before
            stats.files_changed += 1
        stats.seconds += time.perf_counter() - t0
        yield record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder, file or glob of input shards")
    p.add_argument("--output", required=True, help="folder for redact-NNNNN.jsonl.zst and redact_report.json")
    p.add_argument("--shard-size-mb", type=float, default=64.0)
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad records instead of stopping")
    args = p.parse_args(argv)
    stats = RedactStats()
    try:
        with ShardSetWriter(args.output, "redact", max_bytes=int(args.shard_size_mb * (1 << 20))) as writer:
            records = ingest.progress(iter_dir_records(args.input, skip_bad=args.skip_bad), "redact")
            for record in redact_records(records, stats):
                writer.write(record)
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = stats.as_dict()
    write_json_atomic(Path(args.output) / "redact_report.json", report)
    print(json.dumps({k: report[k] for k in ("files", "files_changed", "redacted_total", "mb_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Redaction of secrets and personal data: planted secrets are all replaced, ordinary code is left
alone (version strings, lock-file hashes, documentation addresses, a stdlib sample)."""

import base64
import json
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from data_processing import redact
from data_processing.shards import iter_dir_records, write_shard

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _jwt() -> str:
    """A formally valid (decodable) HS256 JWT, which detect-secrets' JwtTokenDetector requires."""
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'sub': '1234567890', 'name': 'Jane'})}." \
           "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"


# Fake secrets in the formats the real ones have (none of them is live).
PLANTED = {
    "email": ["jane.doe@acme-corp.io", "r.smith+ci@mail.university.edu.au"],
    "ipv4": ["34.117.59.81", "151.101.1.69"],
    "ipv6": ["2a03:2880:f12f:83:face:b00c:0:25de"],
    "aws_key": ["AKIAQYLPMN5HHHFPZAM2"],
    "github_token": ["ghp_1b3D5f7H9j2L4n6P8r0T2v4X6z8B0d2F4h6J"],
    "slack_token": ["xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"],
    "stripe_key": ["sk_live_4eC39HqLyjWDarjtT1zdp7dc"],
    "jwt": [_jwt()],
    "high_entropy_secret": ["q8Xf2LmZ9vTr4Kp7Wb1Nc6Yh3Jd5Gs0Aw"],
    "keyword_password": ["hunter2-Correct-Horse"],
    "url_password": ["s3cr3tPassw0rd"],
}
PRIVATE_KEY = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi6Z1zQ1QK9BdC7Ez3kA9n3xS6j\n"
    "QmVyeVNlY3JldEtleU1hdGVyaWFsVGhhdElzTm90UmVhbEF0QWxsMTIzNDU2Nzg5\n"
    "-----END RSA PRIVATE KEY-----"
)
SECRET_FILE = f"""
import boto3

AUTHOR = "Jane Doe <{PLANTED['email'][0]}>"   # and {PLANTED['email'][1]}
SERVERS = ["{PLANTED['ipv4'][0]}", "{PLANTED['ipv4'][1]}:8080", "{PLANTED['ipv6'][0]}"]
client = boto3.client("s3", aws_access_key_id="{PLANTED['aws_key'][0]}")
GITHUB = "{PLANTED['github_token'][0]}"
slack_hook_token = "{PLANTED['slack_token'][0]}"
stripe.api_key = "{PLANTED['stripe_key'][0]}"
headers = {{"Authorization": "Bearer {PLANTED['jwt'][0]}"}}
API_SECRET = "{PLANTED['high_entropy_secret'][0]}"
db_password = "{PLANTED['keyword_password'][0]}"
DSN = "postgres://admin:{PLANTED['url_password'][0]}@db.internal.acme-corp.io:5432/app"
KEY = '''{PRIVATE_KEY}'''
"""

ORDINARY = {
    "setup.py": 'from setuptools import setup\nsetup(name="pkg", version="1.2.3.4", url="https://example.com")\n'
                '__version__ = "2.10.0.1"\n',
    "docs.md": "Write to support@example.com or alice@example.org; bob@mail.test is fine too.\n"
               "Servers: 192.168.0.10, 10.0.0.1, 127.0.0.1, 192.0.2.15 (documentation range), 8.8.8.8 (public DNS).\n"
               "Network 203.0.113.0/24 and 2001:db8::1 are reserved for documentation.\n",
    "lock.toml": '[[package]]\nname = "idna"\nversion = "3.7"\nfiles = [\n  {file = "idna-3.7.tar.gz", '
                 'hash = "sha256:028ff3aadf0609c1fd278d8ea3089299412a7a8b9bd005dd08b9f8285bcb5cfc"},\n]\n'
                 'content-hash = "0f0c7c4d8f6ba1e2a6b8b9e7cbb1c9b1f2a3a4d5e6f7a8b9c0d1e2f3a4b5c6d7"\n',
    "hashes.py": 'EMPTY_SHA1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709"\n'
                 'digest = hashlib.sha256(b"abc").hexdigest()\nassert digest == '
                 '"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"\n'
                 'commit = "3aaef6f0e2c1d4b5a6978877665544332211aabb"\nuuid = "123e4567-e89b-12d3-a456-426614174000"\n',
    "code.cpp": "std::vector<int> v; a[::2]; ns::Foo::bar(); time = \"12:34:56\"; mac = \"00:1a:2b:3c:4d:5e\";\n",
    "config.py": 'password = getpass.getpass()\nsecret_key = os.environ["SECRET_KEY"]\n'
                 'token = request.headers["X-Token"]\nPASSWORD_FIELD = "password"\napi_key = "${API_KEY}"\n',
}


def test_every_planted_secret_is_redacted_with_typed_placeholders():
    """Each planted value is gone; each kind is counted; placeholders are the typed ones."""
    stats = redact.RedactStats()
    out = redact.redact_text(SECRET_FILE, stats)
    for kind, values in PLANTED.items():
        for value in values:
            assert value not in out, f"{kind} {value!r} left in the output"
        assert stats.redacted[kind] >= len(values), (kind, stats.redacted)
    assert "MIIEpAIBAAKCAQEA" not in out and "END RSA PRIVATE KEY" not in out
    assert stats.redacted["private_key"] == 1
    assert out.count("<EMAIL>") == 2 and out.count("<IP_ADDRESS>") == 3
    assert '"<KEY>"' in out and 'db_password = "<PASSWORD>"' in out
    assert "postgres://admin:<PASSWORD>@db.internal" in out
    # The code around the findings is untouched.
    assert out.startswith("\nimport boto3\n") and 'client = boto3.client("s3", aws_access_key_id="<KEY>")' in out


@pytest.mark.parametrize("name", sorted(ORDINARY))
def test_ordinary_code_is_left_alone(name):
    """Version strings, lock-file hashes, reserved/documentation addresses, digests, UUIDs,
    C++ scopes, indirect secret references: no redaction."""
    stats = redact.RedactStats()
    text = ORDINARY[name]
    assert redact.redact_text(text, stats) == text, redact.find_spans(text)
    assert sum(stats.redacted.values()) == 0


def test_kept_candidates_are_counted_by_reason():
    """The candidates deliberately kept say why, so the report shows what was considered."""
    stats = redact.RedactStats()
    redact.redact_text(ORDINARY["docs.md"] + ORDINARY["setup.py"], stats)
    assert stats.kept["email_reserved_domain"] == 3
    # 192.168/10/127 never match detect-secrets' public-IP regex; 192.0.2.15 is documentation.
    assert stats.kept["ip_not_global"] == 1 and stats.kept["ip_public_dns"] == 1
    assert stats.kept["ip_network"] == 1 and stats.kept["ip_version_string"] == 2


def test_stdlib_sample_has_no_key_false_positives():
    """Hash-heavy and crypto-adjacent stdlib modules: no key, token or high-entropy redaction
    (the stdlib holds no live credentials)."""
    names = ["hashlib.py", "secrets.py", "uuid.py", "hmac.py", "base64.py", "test/test_hashlib.py",
             "test/test_base64.py", "test/test_uuid.py", "test/test_hmac.py", "email/_header_value_parser.py"]
    stats = redact.RedactStats()
    for name in names:
        path = STDLIB / name
        if path.exists():
            redact.redact_text(path.read_text("utf-8", errors="replace"), stats)
    key_kinds = {k: n for k, n in stats.redacted.items() if k not in ("email", "ipv4", "ipv6", "keyword_password")}
    assert key_kinds == {}, key_kinds


def test_records_and_cli(tmp_path, capsys):
    """The standalone stage: shards in, redacted shards and redact_report.json out."""
    write_shard(tmp_path / "in" / "a.jsonl.zst", [
        {"text": SECRET_FILE, "meta": {"repo_name": "r", "file_name": "leak.py", "language": "Python"}},
        {"text": ORDINARY["setup.py"], "meta": {"repo_name": "r", "file_name": "setup.py", "language": "Python"}},
    ])
    assert redact.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 0
    records = list(iter_dir_records(tmp_path / "out"))
    assert records[0]["meta"]["redactions"] == 14 and records[0]["meta"]["size"] == len(records[0]["text"].encode())
    assert "redactions" not in records[1]["meta"] and records[1]["text"] == ORDINARY["setup.py"]
    report = json.loads((tmp_path / "out" / "redact_report.json").read_text())
    assert report["files"] == 2 and report["files_changed"] == 1
    assert Counter(report["redacted"])["email"] == 2 and report["mb_per_s"] > 0
    assert json.loads(capsys.readouterr().out)["redacted_total"] == report["redacted_total"]


def test_unreadable_input_is_one_line_exit_2(tmp_path, capsys):
    """A missing input folder: one error line, exit 2, no output folder left behind."""
    assert redact.main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not list((tmp_path / "out").glob("*.jsonl.zst")) if (tmp_path / "out").exists() else True


def test_prepare_redacts_by_default_and_not_with_the_flag(tmp_path):
    """prepare: no planted value in any output shard, counts in report.json; --no-redact keeps them."""
    from data_processing import prepare

    for repo in ("leaky", "clean"):
        (tmp_path / "src" / repo).mkdir(parents=True)
    (tmp_path / "src" / "leaky" / "settings.py").write_text(SECRET_FILE)
    (tmp_path / "src" / "clean" / "setup.py").write_text(ORDINARY["setup.py"])
    report = prepare.prepare(tmp_path / "on", sources=[str(tmp_path / "src")], workers=1, progress=False)
    texts = [r["text"] for side in ("train", "validation") for r in iter_dir_records(tmp_path / "on" / side)]
    assert len(texts) == 2 and ORDINARY["setup.py"] in texts
    assert not [v for vals in PLANTED.values() for v in vals if any(v in t for t in texts)]
    saved = json.loads((tmp_path / "on" / "report.json").read_text())
    assert saved["redact"] == json.loads(json.dumps(report["redact"]))
    assert saved["redact"]["redacted"]["aws_key"] == 1 and saved["redact"]["files_changed"] == 1
    assert prepare.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "off"), "--workers", "1",
                         "--no-redact"]) == 0
    off = [r["text"] for side in ("train", "validation") for r in iter_dir_records(tmp_path / "off" / side)]
    assert SECRET_FILE in off
    assert json.loads((tmp_path / "off" / "report.json").read_text())["redact"] == {"enabled": False}

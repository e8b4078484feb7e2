"""The HumanEval sandbox (train/evaluation/sandbox.py): wrong completions that cheat count as failed,
and attacks change nothing outside the sample's own directory.

Each attack is a body for ``add(a, b)``; the check is ``add(1, 2) == 3``. An attack that escaped
would ``return a + b`` and pass, so "failed" shows the attack was stopped, not merely that the
answer was wrong. Targets live in a directory this test makes under /var/tmp, which the sandbox
sees read-only (``/tmp`` it does not see at all), with modes that would let anyone write them:
only the sandbox's read-only view protects them.
"""

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from train.evaluation import sandbox
from train.evaluation.sandbox import Limits, SandboxUnavailableError, decode, encode, run_checked

PROGRAM = "def add(a, b):\n{body}\n"
CHECKER = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
FAST = Limits(timeout=2.0)


def run(body: str, limits: Limits = FAST, **kwargs) -> tuple[bool, str]:
    return run_checked(PROGRAM.format(body=body), CHECKER, "add", limits, **kwargs)


def indent(code: str) -> str:
    return "\n".join("    " + line for line in code.strip("\n").splitlines())


@pytest.fixture
def targets():
    """A directory visible to the sandbox with a world-writable file in it; checked intact after."""
    root = tempfile.mkdtemp(prefix="codeneo-sandbox-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    os.chmod(root, 0o777)
    victim = Path(root) / "victim.txt"
    victim.write_text("intact")
    os.chmod(victim, 0o666)
    yield Path(root)
    shutil.rmtree(root, ignore_errors=True)


def assert_intact(targets: Path) -> None:
    victim = targets / "victim.txt"
    assert sorted(p.name for p in targets.iterdir()) == ["victim.txt"]
    assert victim.read_text() == "intact"
    assert victim.stat().st_mode & 0o777 == 0o666
    assert victim.stat().st_nlink == 1


@pytest.fixture
def listener():
    """A TCP listener on the host's 127.0.0.1."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv
    srv.close()


def assert_nothing_arrived(srv: socket.socket) -> None:
    srv.setblocking(False)
    with pytest.raises(BlockingIOError):
        srv.accept()


def processes_named(comm: str) -> list[int]:
    """Host pids whose /proc/PID/comm is ``comm`` (a sample can set its own name, children inherit it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


# --------------------------------------------------------------------------- the verdict cannot be forged

CHEATS = {name: indent(code) for name, code in {
    "exit()": "exit()",
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "atexit os._exit(0)": "import atexit, os\natexit.register(os._exit, 0)\nreturn a - b",
    "excepthook exits 0": "import sys\nsys.excepthook = lambda *exc: sys.exit(0)\nreturn a - b",
    "prints passed": "import sys\nprint('passed')\nprint('passed', file=sys.stderr)\nreturn a - b",
    "forged verdict on every fd": (
        "import os\nfor fd in map(int, os.listdir('/proc/self/fd')):\n"
        "    try:\n        os.write(fd, b'{\"result\": \"passed\"}\\npassed\\n')\n    except OSError:\n        pass\n"
        "os._exit(0)"),
    "always-equal object": "class Eq:\n    def __eq__(self, other):\n        return True\nreturn Eq()",
    "always-equal int": "class Eq(int):\n    def __eq__(self, other):\n        return True\nreturn Eq(7)",
}.items()}
CHEATS["os._exit(0) at import"] = "    return a - b\nimport os\nos._exit(0)"  # top level, after the function


@pytest.mark.parametrize("name", list(CHEATS))
def test_cheats_count_as_failed(name):
    passed, result = run(CHEATS[name])
    assert not passed and result.startswith("failed"), result


@pytest.mark.parametrize("name", ["os._exit(0)", "atexit os._exit(0)", "excepthook exits 0",
                                  "forged verdict on every fd"])
def test_cheats_fail_without_isolation_too(name):
    """The verdict comes from the checker's process, so exit-code tricks fail even unsandboxed."""
    passed, result = run(CHEATS[name], unsafe_no_isolation=True)
    assert not passed and result.startswith("failed"), result


def test_correct_and_wrong_answers():
    assert run("    return a + b") == (True, "passed")
    assert run("    return a - b") == (False, "failed: AssertionError")
    assert run("    raise ValueError('no')") == (False, "failed: ValueError")
    assert run("    return a +") == (False, "failed: SyntaxError")


# --------------------------------------------------------------------------- escapes

def escapes(targets: Path, port: int) -> dict[str, str]:
    victim, folder = str(targets / "victim.txt"), str(targets)
    return {
        "fresh posix unlink": f"import sys\nsys.modules.pop('posix', None)\nimport posix\nposix.unlink({victim!r})",
        "io.FileIO write": f"import io\nio.FileIO({victim!r}, 'w').write(b'pwned')",
        "os.link": f"import os\nos.link({victim!r}, {folder + '/linked'!r})",
        "os.fchmod": f"import os\nfd = os.open({victim!r}, os.O_RDONLY)\nos.fchmod(fd, 0o600)",
        "new file": f"open({folder + '/new.txt'!r}, 'w').write('pwned')",
        "ctypes system()": ("import sys\nsys.modules.pop('ctypes', None)\nimport ctypes\n"
                            f"assert ctypes.CDLL(None).system(b'touch {folder}/shell && test $(id -u) = 0') == 0"),
        "_socket to the host": (f"import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
                                f"s.connect(('127.0.0.1', {port}))\ns.sendall(b'pwned')"),
    }


def test_escapes_fail_and_change_nothing(targets, listener):
    for name, code in escapes(targets, listener.getsockname()[1]).items():
        passed, result = run(indent(code + "\nreturn a + b"))
        assert not passed and result.startswith("failed"), (name, result)
        assert_intact(targets)
    assert_nothing_arrived(listener)


def test_the_sample_sees_only_what_it_may(targets, monkeypatch):
    """Run as a passing sample that asserts its confinement from the inside."""
    secret = secrets.token_hex(16)
    monkeypatch.setenv("CODENEO_TEST_SECRET", secret)  # the harness holds it; nothing in a sandbox may
    victim = str(targets / "victim.txt")
    # Beside its own directory, /tmp shows only the way to this Python when it lives below /tmp
    # (a venv in a clone under /tmp, as CI may make), bound back read-only.
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    shown = sorted({p.split("/")[2] for p in prefixes if p.startswith("/tmp/")} | {"sample"})
    code = f"""
import os, socket
status = open('/proc/self/status').read()
assert os.getuid() != 0 and os.geteuid() != 0 and os.getgid() != 0
assert 'CapEff:\\t0000000000000000' in status and 'NoNewPrivs:\\t1' in status, status
assert [name for _, name in socket.if_nameindex()] == ['lo']
assert len([p for p in os.listdir('/proc') if p.isdigit()]) <= 3, os.listdir('/proc')
for pid in (p for p in os.listdir('/proc') if p.isdigit()):
    try:
        assert {secret!r}.encode() not in open('/proc/%s/environ' % pid, 'rb').read()
    except PermissionError:
        pass
assert {secret!r} not in str(os.environ)
assert open({victim!r}).read() == 'intact' and not os.access({victim!r}, os.W_OK)
assert sorted(os.listdir('/tmp')) == {shown!r} and os.getcwd() == '/tmp/sample' == os.environ['HOME']
open('scratch.txt', 'w').write('mine')
return a + b
"""
    assert run(indent(code)) == (True, "passed")
    assert_intact(targets)


def test_home_directories_are_hidden():
    mine = tempfile.mkdtemp(prefix=".codeneo-sandbox-", dir=Path.home())
    try:
        code = f"import os\nassert not os.path.exists({mine!r})\nassert os.listdir('/home') == []\nreturn a + b"
        assert run(indent(code)) == (True, "passed")
    finally:
        os.rmdir(mine)


def test_own_directory_is_small_and_private():
    code = ("import os\nopen('one.bin', 'wb').write(bytes(1 << 20))  # the file-size limit allows 1 MiB\n"
            "assert os.statvfs('.').f_blocks * os.statvfs('.').f_frsize == 16 << 20\n"
            "for i in range(20):\n    open(f'{i}.bin', 'wb').write(bytes(1 << 20))\nreturn a + b")
    assert run(indent(code)) == (False, "failed: OSError")  # ENOSPC after 16 MiB


def test_stop_iteration_cannot_end_the_test_early():
    """all(map(...)) would stop at a StopIteration and pass every case not yet run."""
    checker = "def check(candidate):\n    assert all(map(lambda x: candidate(x) == x + 1, range(5)))\n"
    program = "def inc(x):\n    raise StopIteration\n"
    assert run_checked(program, checker, "inc", FAST) == (False, "failed: StopIteration")
    assert run_checked("def inc(x):\n    return x + 1\n", checker, "inc", FAST) == (True, "passed")


def test_the_harness_and_its_neighbours_survive_kill():
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        code = f"import os, signal\nos.kill(-1, signal.SIGKILL)\nos.kill({bystander.pid}, signal.SIGKILL)\nreturn a + b"
        passed, result = run(indent(code))
        assert (passed, result) == (False, "failed: ProcessLookupError")
        assert bystander.poll() is None
        os.kill(os.getpid(), 0)
    finally:
        bystander.kill()
        bystander.wait()


# --------------------------------------------------------------------------- processes and limits

def test_infinite_loop_times_out():
    t0 = time.monotonic()
    assert run("    while True:\n        pass") == (False, "timed out")
    assert time.monotonic() - t0 < FAST.timeout + 5


def test_huge_allocation_fails():
    assert run("    x = bytearray(10 * 1024 ** 3)\n    return a + b") == (False, "failed: MemoryError")


def test_setsid_child_does_not_outlive_the_timeout(targets):
    name = "hv" + secrets.token_hex(6)
    late = str(targets / "late.txt")
    code = f"""
import os, time
if os.fork() == 0:
    os.setsid()
    open('/proc/self/comm', 'w').write({name!r})
    time.sleep(3)
    open({late!r}, 'w').write('still alive')
    os._exit(0)
while True:
    pass
"""
    assert run(indent(code)) == (False, "timed out")
    assert processes_named(name) == []  # run_checked returns only once the pid namespace is gone
    assert_intact(targets)


def test_fork_bomb_is_contained():
    name = "hv" + secrets.token_hex(6)
    code = f"""
import os
open('/proc/self/comm', 'w').write({name!r})
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    seen, out = [], {}
    worker = threading.Thread(target=lambda: out.update(result=run(indent(code), Limits(timeout=3.0))))
    worker.start()
    while worker.is_alive():
        seen.append(len(processes_named(name)))
        time.sleep(0.05)
    worker.join()
    assert out["result"] == (False, "timed out")
    assert 2 <= max(seen) <= FAST.processes, max(seen)  # it forked, and no further than the limit
    assert processes_named(name) == []


COUNT_FORKS = """def count_forks():
    import os, time
    forks = 0
    while True:
        try:
            pid = os.fork()
        except OSError:
            return forks
        if pid == 0:
            open('/proc/self/comm', 'w').write(NAME)
            time.sleep(60)
            os._exit(0)
        forks += 1
"""


def test_process_limit_is_per_sample():
    """A sample holding all its processes does not reduce what another sample may fork."""
    limits = Limits(timeout=180.0, processes=5)  # the hog is killed below, long before its timeout
    hog_name, counter_name = "hv" + secrets.token_hex(6), "hv" + secrets.token_hex(6)
    hog = COUNT_FORKS.replace("NAME", repr(hog_name)).replace("return forks", "while True: pass")
    hog = hog.replace("    forks = 0\n", f"    forks = 0\n    open('/proc/self/comm', 'w').write({hog_name!r})\n")
    checker = f"def check(candidate):\n    assert candidate() == {limits.processes - 1}\n"
    out = {}
    thread = threading.Thread(target=lambda: out.update(hog=run_checked(hog, checker, "count_forks", limits)))
    thread.start()
    deadline = time.monotonic() + 60
    while len(processes_named(hog_name)) < limits.processes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(processes_named(hog_name)) == limits.processes  # itself and 4 children
    counter = COUNT_FORKS.replace("NAME", repr(counter_name))
    assert run_checked(counter, checker, "count_forks", limits._replace(timeout=60.0)) == (True, "passed")
    assert thread.is_alive() and len(processes_named(hog_name)) == limits.processes  # held all along
    for pid in processes_named(hog_name):
        with contextlib.suppress(ProcessLookupError):  # killing one of them can end the sandbox with the rest
            os.kill(pid, 9)
    thread.join()
    assert out["hog"] == (False, "failed: the program exited")
    assert processes_named(hog_name) == processes_named(counter_name) == []


# --------------------------------------------------------------------------- the batch keeps going

def test_batch_of_attacks_and_one_correct_solution(targets, listener):
    from train.evaluation.code_eval import evaluate

    problem = {"task_id": "T/0", "prompt": "def add(a, b):\n", "entry_point": "add", "test": CHECKER}
    attacks = [*escapes(targets, listener.getsockname()[1]).values(), "while True:\n    pass",
               "x = bytearray(10 * 1024 ** 3)",
               "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"]
    attacks = [*CHEATS.values(), *(indent(code + "\nreturn a + b") for code in attacks)]
    completions = [body + "\n" for body in attacks] + ["    return a + b\n"]
    rows, summary = evaluate({"T/0": problem}, {"T/0": completions}, workers=2, timeout=2.0)
    assert [r["passed"] for r in rows] == [False] * len(attacks) + [True], [r["result"] for r in rows]
    assert summary["pass@1"] == pytest.approx(1 / len(completions))
    assert_intact(targets)
    assert_nothing_arrived(listener)


# --------------------------------------------------------------------------- as an ordinary user

ENVIRON_SCAN = """
import os
for pid in (p for p in os.listdir('/proc') if p.isdigit()):
    try:
        if {secret!r}.encode() in open('/proc/%s/environ' % pid, 'rb').read():
            return a + b
    except OSError:
        pass
"""

USER_SCRIPT = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sb)
checker = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
out = {"problem": sb.isolation_problem()}
for name, body in json.loads(sys.argv[2]).items():
    out[name] = sb.run_checked("def add(a, b):\n" + body + "\n", checker, "add", sb.Limits(timeout=5.0))
forks = sys.argv[3].replace("NAME", "'hvuser'")
out["forks"] = sb.run_checked(forks, "def check(c):\n    assert c() == 7\n", "count_forks", sb.Limits(timeout=5.0))
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody (as a user, the other tests run as one)")
def test_works_for_an_ordinary_user(targets, listener):
    python = shutil.which("python3", path="/usr/bin:/bin")
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python or "python3",
                            "-I", "-c", "import json, site"], capture_output=True)
    if python is None or probe.returncode != 0:
        pytest.skip("no Python that nobody may run")
    secret = secrets.token_hex(16)
    bodies = {"correct": "    return a + b", "wrong": "    return a - b", "os._exit": CHEATS["os._exit(0)"],
              "environ": indent(ENVIRON_SCAN.format(secret=secret))}
    for name, code in escapes(targets, listener.getsockname()[1]).items():
        bodies[name] = indent(code + "\nreturn a + b")
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c",
                           USER_SCRIPT, sandbox.__file__, json.dumps(bodies), COUNT_FORKS],
                          capture_output=True, text=True, timeout=120, cwd="/",
                          env={**os.environ, "CODENEO_TEST_SECRET": secret})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out.pop("problem") is None
    assert out.pop("correct") == [True, "passed"]
    assert out.pop("forks") == [True, "passed"]  # 8 processes: itself and 7 children
    assert all(not passed for passed, _ in out.values()), out
    assert_intact(targets)
    assert_nothing_arrived(listener)


# --------------------------------------------------------------------------- refusing, and the data channel

def test_refuses_without_bubblewrap(monkeypatch, tmp_path, capsys):
    from train.evaluation.humaneval import main

    monkeypatch.setattr(sandbox, "_cache", {})
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    with pytest.raises(SandboxUnavailableError, match=r"apt-get install bubblewrap.*--unsafe-no-isolation"):
        run("    return a + b")
    assert main(["--canonical", "--limit", "1", "--no-docs"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bubblewrap" in err
    assert main(["--canonical", "--limit", "2", "--no-docs", "--unsafe-no-isolation"]) == 0
    assert "| 2 | 1 | 1.0000 |" in capsys.readouterr().out


@pytest.mark.parametrize("value", [None, True, 0, -3, 2 ** 80, 1.5, float("inf"), -0.0, "é\n", b"\x00\xff",
                                   1 + 2j, [1, [2.5, "x"]], (1, (2,)), (), {"a": 1, (1, 2): [3]}, {1, 2},
                                   frozenset({"x"}), [{}, set(), []]])
def test_values_round_trip_exactly(value):
    back = decode(json.loads(json.dumps(encode(value))))
    assert back == value and type(back) is type(value) and repr(back) == repr(value)


@pytest.mark.parametrize("data", [{"x": 1}, {"t": 1}, {"d": [[1]]}, {"c": ["a", 1]}, {"t": [], "s": []}, {"b": 5}])
def test_decode_rejects_what_encode_never_makes(data):
    with pytest.raises(ValueError):
        decode(data)


def test_encode_refuses_objects():
    with pytest.raises(TypeError, match="only plain data"):
        encode(object())
    assert type(encode(True)) is bool and encode(type("S", (str,), {})("x")) == "x"

"""An operating-system sandbox for untrusted code (model completions) and an unforgeable pass verdict.

Design. A sample is two programs: the untrusted *program* (prompt + completion, defining the entry
point) and the trusted *checker* (prompt + test, defining ``check``). Each runs in its own
bubblewrap sandbox; they are connected only by two pipes. In the checker, ``check`` is called with
a stand-in for the entry point that forwards every call to the program (arguments and results
cross as JSON-encoded plain data: None, bool, int, float, str, bytes, complex, list, tuple, dict,
set) and raises there what the program raised. The verdict is written by the checker on a third
pipe only it holds, and it is "passed" only when ``check`` returned.

Threat model. The completion is arbitrary code with the sandbox user's rights. It never runs in
the process that decides the verdict, so nothing it does to its own interpreter (exit codes,
``os._exit``, ``atexit``, ``sys.excepthook``, printing "passed", patching ``check`` or
``AssertionError``, returning objects whose ``__eq__`` is always true: only plain data crosses)
reaches the verdict; all it controls is the bytes it sends on its pipe, which the checker parses
as data and never executes. It cannot reach the checker otherwise: separate pid, network, IPC and
mount namespaces, and the checker's sources never touch a disk (they arrive on stdin). There is no
secret to steal, so reading memory or files gains nothing. The checker runs only the dataset's
prompt and test, which are trusted.

Isolation (bubblewrap >= 0.8, ``apt-get install bubblewrap``; ``setpriv`` from util-linux when
root): new pid, network (loopback only), IPC, UTS and mount namespaces; the whole filesystem
read-only, with ``/tmp``, ``/run`` (host sockets), ``/home``, ``/root`` and ``$HOME`` (keys, tokens)
replaced by empty read-only tmpfs (the interpreter's prefixes bound back where they lie below one),
a fresh ``/proc`` and a read-only ``/dev``; the only writable place is the program's own directory,
a private tmpfs of ``Limits.scratch`` bytes (nothing reaches the host's disk); an empty
environment, for the sandbox and for bwrap itself. This assumes the host has procfs mounted only
at ``/proc``, which bwrap replaces: another procfs in view would show the harness. Running as
an ordinary user, bwrap maps the sample into a new user namespace with no capabilities and no
further user namespaces. Running as root (CI), bwrap sets up the namespaces and ``setpriv`` then
switches to a random unused uid (a fresh one per sandbox) with no capabilities and no_new_privs:
mapping the sample to root in a user namespace would leave it uid 0 on the host, for which the
kernel skips RLIMIT_NPROC. Limits (setrlimit, first thing in the sandbox): CPU seconds, address
space, file size, no core files, and a process count. RLIMIT_NPROC counts per uid per user
namespace (Linux >= 5.14), so with a fresh uid (root) or a fresh user namespace (user) every
sample has its own count and parallel samples do not starve each other. At the timeout, or once
the checker is done, pid 1 of the program's pid namespace is killed, which kills every process
in it (``setsid`` does not escape), and the harness waits until it is gone.

``unsafe_no_isolation`` runs the same two programs as plain subprocesses (own session, the same
rlimits except the process count): the verdict channel is then only as safe as the machine,
since the program could reach the checker's process. Use it only where bwrap cannot run.

This file is stdlib-only: its own source is the runner executed inside the sandbox.
"""

from __future__ import annotations

import builtins
import json
import os
import sys

SAMPLE_DIR = "/tmp/sample"  # where the program's writable directory appears inside its sandbox
_INNER_UID = 65534  # what the sample sees as its uid in a user namespace (nobody)
_ROOT_UID_BASE, _ROOT_UID_SPAN = 0x71000000, 1 << 24  # uids no account uses (systemd leaves them free)
_MAX_MESSAGE = 16 << 20  # bytes per reply line; larger replies fail the sample


# --------------------------------------------------------------------------- values across the pipe

def encode(value):
    """``value`` as JSON-ready data; raises TypeError for anything but None, bool, int, float, str,
    bytes, complex and lists, tuples, dicts, sets and frozensets of those."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {"t": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"d": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, (set, frozenset)):
        return {"fs" if isinstance(value, frozenset) else "s": [encode(v) for v in value]}
    if isinstance(value, bytes):
        return {"b": bytes(value).hex()}
    if isinstance(value, complex):
        return {"c": [value.real, value.imag]}
    raise TypeError(f"a {type(value).__name__} cannot leave the sandbox (only plain data can)")


def decode(data):
    """The value ``encode`` made ``data`` from, built from builtin types only; ValueError when
    ``data`` is not such an encoding (the program may send anything)."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(v) for v in data]
    if type(data) is dict and len(data) == 1:
        (tag, body), = data.items()
        if tag == "b" and type(body) is str:
            return bytes.fromhex(body)
        if type(body) is list:
            if tag == "t":
                return tuple(decode(v) for v in body)
            if tag == "s":
                return {decode(v) for v in body}
            if tag == "fs":
                return frozenset(decode(v) for v in body)
            if tag == "d" and all(type(p) is list and len(p) == 2 for p in body):
                return {decode(k): decode(v) for k, v in body}
            if tag == "c" and len(body) == 2 and all(type(x) in (int, float) for x in body):
                return complex(*body)
    raise ValueError("not an encoded value")


# --------------------------------------------------------------------------- inside the sandbox

class ProtocolBrokenError(Exception):
    """Raised in the checker when the program broke the protocol; ``str`` is the reason."""


class RemoteError(Exception):
    """An exception the program raised that the checker does not raise as itself: not a builtin
    ``Exception`` subclass, or StopIteration; ``name`` is its class name."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name


def _describe(err: BaseException) -> list[str]:
    try:
        message = str(err)[:500]
    except Exception:  # a hostile __str__
        message = ""
    return [type(err).__name__, message]


def _remote_error(desc) -> Exception:
    """The exception to raise in the checker for the program's ``[name, message]``: the builtin
    class of that name when there is one (so a test may catch ValueError), else RemoteError."""
    if not (type(desc) is list and len(desc) == 2 and all(type(x) is str for x in desc)):
        return ProtocolBrokenError("unreadable reply")
    name, message = desc[0][:60], desc[1][:500]
    name = name if name.isidentifier() else "Exception"
    cls = vars(builtins).get(name)
    # StopIteration raised through map() or filter() would end the test's iteration early, as if
    # every remaining case had passed: it comes back as a RemoteError.
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, (StopIteration,
                                                                                       StopAsyncIteration)):
        try:
            return cls(message)
        except Exception:  # e.g. UnicodeDecodeError wants five arguments
            pass
    return RemoteError(name, message)


def _apply_limits(spec: dict) -> None:
    import resource

    def limit(which: int, soft: int, hard: int) -> None:
        ceiling = resource.getrlimit(which)[1]  # never above a hard limit the harness already had
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(which, (soft, hard))

    limit(resource.RLIMIT_CPU, spec["cpu"], spec["cpu"] + 1)
    limit(resource.RLIMIT_AS, spec["memory"], spec["memory"])
    limit(resource.RLIMIT_FSIZE, spec["fsize"], spec["fsize"])
    limit(resource.RLIMIT_CORE, 0, 0)
    if spec["nproc"]:
        limit(resource.RLIMIT_NPROC, spec["nproc"], spec["nproc"])
    if os.getpgrp() != os.getpid():  # its own session: no terminal signal from the harness's reaches it
        os.setsid()


class _Channel:
    """The checker's end of the two pipes to the program: one JSON line per message."""

    def __init__(self, read_fd: int, write_fd: int):
        self._in = os.fdopen(read_fd, "rb")
        self._out = os.fdopen(write_fd, "wb")

    def receive(self) -> dict:
        line = self._in.readline(_MAX_MESSAGE + 1)
        if not line:
            raise ProtocolBrokenError("the program exited")
        if len(line) > _MAX_MESSAGE or not line.endswith(b"\n"):
            raise ProtocolBrokenError("reply too large")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            raise ProtocolBrokenError("unreadable reply") from None
        if type(message) is not dict or len(message) != 1:
            raise ProtocolBrokenError("unreadable reply")
        return message

    def call(self, *args, **kwargs):
        try:
            self._out.write(json.dumps(encode((args, kwargs))).encode() + b"\n")
            self._out.flush()
        except BrokenPipeError:
            raise ProtocolBrokenError("the program exited") from None
        message = self.receive()
        if "exc" in message:
            raise _remote_error(message["exc"])
        if "ok" not in message:
            raise ProtocolBrokenError("unreadable reply")
        try:
            return decode(message["ok"])
        except (ValueError, TypeError, RecursionError):  # TypeError: an unhashable set member or key
            raise ProtocolBrokenError("unreadable reply") from None


def _run_check(source: str, spec: dict) -> str:
    channel = _Channel(spec["in"], spec["out"])
    namespace = {"__name__": "__main__"}
    exec(compile(source, "check.py", "exec"), namespace)
    hello = channel.receive()
    if "exc" in hello:  # the program did not load: SyntaxError, NameError...
        raise _remote_error(hello["exc"])
    if hello != {"ready": True}:
        raise ProtocolBrokenError("unreadable reply")

    def candidate(*args, **kwargs):
        return channel.call(*args, **kwargs)

    candidate.__name__ = spec["entry"]
    namespace[spec["entry"]] = candidate  # the prompt's helpers call the program's function too
    namespace[spec["check"]](candidate)
    return "passed"


def _check_main(source: str, spec: dict) -> int:
    """Checker: run ``check(candidate)``; only after it returned is "passed" written."""
    try:
        result = _run_check(source, spec)
    except BaseException as err:
        reason = str(err) if isinstance(err, ProtocolBrokenError) else \
            err.name if isinstance(err, RemoteError) else type(err).__name__
        result = f"failed: {reason}"
    with os.fdopen(spec["verdict"], "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"result": result}))
    return 0


def _serve_main(source: str, spec: dict) -> int:
    """Program: load it, then answer one call per request line until the checker hangs up."""
    out = os.fdopen(spec["out"], "w", encoding="utf-8")

    def send(message) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    sys.argv = ["program.py"]
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
        function = namespace[spec["entry"]]
    except BaseException as err:
        send({"exc": _describe(err)})
        return 1
    send({"ready": True})
    pid = os.getpid()
    for line in os.fdopen(spec["in"], "r", encoding="utf-8"):
        try:
            args, kwargs = decode(json.loads(line))
            reply = json.dumps({"ok": encode(function(*args, **kwargs))})
        except BaseException as err:
            reply = json.dumps({"exc": _describe(err)})
        if os.getpid() != pid:  # a child the program forked returned here: only the program answers
            os._exit(0)
        out.write(reply + "\n")
        out.flush()
    return 0


def _runner_main(argv: list[str]) -> int:
    role, spec = argv[0], json.loads(argv[1])
    _apply_limits(spec)
    sys.path.extend(spec["path"])
    source = sys.stdin.buffer.read().decode("utf-8")  # the harness closes stdin after the source
    return _serve_main(source, spec) if role == "serve" else _check_main(source, spec)


# --------------------------------------------------------------------------- the harness side
# Imported here, not at the top: the runner (the part above) pays for every import twice a sample.
import contextlib  # noqa: E402
from collections import namedtuple  # noqa: E402

Limits = namedtuple("Limits", "timeout memory file_size processes scratch",
                    defaults=(5.0, 1 << 30, 1 << 20, 8, 16 << 20))
Limits.__doc__ = """Per-sample limits: wall-clock seconds, address space and file size in bytes,
processes the program may have at once (itself included), and bytes its own directory may hold."""


class SandboxUnavailableError(RuntimeError):
    """No sandbox can be made on this machine; the message (one line) says what to install."""


class _Started:
    """A started runner: its Popen (bwrap, or the runner itself when unsafe), the read end of
    bwrap's --info-fd until ``resolve``, then a pidfd for pid 1 of its pid namespace (None when
    unsafe or when bwrap failed)."""

    def __init__(self, proc, info_fd: int | None = None):
        self.proc, self.info_fd, self.pidfd = proc, info_fd, None

    def resolve(self) -> None:
        """Read bwrap's info (it comes once the namespaces exist) and open the pidfd."""
        if self.info_fd is not None:
            info_fd, self.info_fd = self.info_fd, None
            self.pidfd = _open_pid1(info_fd)


def _is_root() -> bool:
    return os.geteuid() == 0


_cache: dict = {}


_HARNESS_SIDE = "# " + "-" * 75 + " the harness side"


def _runner_source() -> str:
    """This file up to the harness side, plus a call of the runner: what ``python -c`` runs in a
    sandbox (half the source to compile, twice per sample)."""
    if "source" not in _cache:
        with open(__file__, encoding="utf-8") as fh:
            text = fh.read()
        _cache["source"] = text[:text.index(_HARNESS_SIDE)] + "\nsys.exit(_runner_main(sys.argv[1:]))\n"
    return _cache["source"]


def _bwrap() -> str | None:
    import shutil

    return shutil.which("bwrap")


def _setpriv() -> str:
    import shutil

    return shutil.which("setpriv") or "setpriv"


def _bwrap_version() -> tuple[int, ...]:
    import re
    import subprocess

    try:
        out = subprocess.run([_bwrap(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    match = re.search(r"(\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else (0, 0)


def _closed_ancestor(path: str) -> str | None:
    """The topmost directory above ``path`` that others may not enter (a Python under /root)."""
    import stat

    current = ""
    for part in path.strip("/").split("/")[:-1]:
        current += "/" + part
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _hidden_dirs(root: bool) -> list[str]:
    """Directories the sandbox sees as empty: home directories (tokens, keys), and as root the
    topmost directory closed to others above each interpreter prefix (e.g. /root for a pyenv
    Python), which the sample's uid could not enter anyway."""
    # /tmp and /run too (other users' files, host sockets); an interpreter installed below one of
    # these (a venv in a clone under /tmp, as CI may make) is bound back by ``_hiding_mounts``.
    dirs = {"/tmp", "/run", "/home", "/root", os.path.realpath(os.path.expanduser("~"))}
    if root:
        dirs |= {d for d in map(_closed_ancestor, _interpreter_prefixes()) if d}
    system = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc")  # a $HOME of / or /usr must stay visible
    dirs = {d for d in dirs if os.path.isdir(d) and not any(x == d or x.startswith(d.rstrip("/") + "/")
                                                             for x in system)}
    return sorted(d for d in dirs if not any(d.startswith(o + "/") for o in dirs))


def _interpreter_prefixes() -> list[str]:
    exe_prefix = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    return sorted({os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix,
                                                  sys.base_exec_prefix, exe_prefix)})


def _hiding_mounts(root: bool) -> tuple[list[str], list[str]]:
    """bwrap arguments that put an empty tmpfs over each hidden directory and bind this Python's
    prefixes back read-only at their own paths where they lie below one (a venv names its base
    by path); and the remounts that make those tmpfs read-only afterwards."""
    key = ("mounts", root)
    if key in _cache:
        return _cache[key]
    hidden = _hidden_dirs(root)
    setup = [arg for d in hidden for arg in ("--tmpfs", d)]
    made, bound = set(hidden), []
    for path in _interpreter_prefixes():
        top = next((d for d in hidden if path == d or path.startswith(d + "/")), None)
        if top is None or any(path == b or path.startswith(b + "/") for b in bound):
            continue
        current = top
        for part in path[len(top):].strip("/").split("/")[:-1]:
            current += "/" + part
            if current not in made:
                setup += ["--dir", current]
                made.add(current)
        setup += ["--ro-bind", path, path]
        bound.append(path)
    _cache[key] = (setup, [arg for d in hidden for arg in ("--remount-ro", d)])
    return _cache[key]


def _bwrap_argv(scratch: int | None, uid: int | None, info_fd: int | None) -> list[str]:
    """The bwrap command line up to the sandboxed command. ``scratch``: bytes of the writable
    tmpfs at SAMPLE_DIR (None: none, the checker's case); ``uid``: the host uid to drop to when
    the harness is root (None: map into a new user namespace)."""
    argv = [_bwrap(), "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid", "--unshare-net",
            "--unshare-uts", "--unshare-cgroup-try"]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    if uid is None:
        argv += ["--unshare-user", "--disable-userns", "--uid", str(_INNER_UID), "--gid", str(_INNER_UID)]
    setup, remount = _hiding_mounts(uid is not None)
    argv += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", *setup]
    if scratch is not None:  # its own directory: a private tmpfs, so it can fill neither disk nor memory
        argv += ["--perms", "1777", "--size", str(scratch), "--tmpfs", SAMPLE_DIR]
    home = SAMPLE_DIR if scratch is not None else "/tmp"
    argv += ["--remount-ro", "/dev", *remount,
             "--clearenv", "--chdir", home]
    for key, value in _environment(home).items():
        argv += ["--setenv", key, value]
    argv += ["--"]
    if uid is not None:
        argv += [_setpriv(), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                 "--inh-caps=-all", "--bounding-set=-all", "--"]
    return argv


_BWRAP_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _environment(home: str) -> dict[str, str]:
    return {"HOME": home, "TMPDIR": home, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}


def _root_uids() -> tuple[int, int]:
    import random

    rng = random.SystemRandom()
    first = _ROOT_UID_BASE + rng.randrange(_ROOT_UID_SPAN)
    second = first
    while second == first:
        second = _ROOT_UID_BASE + rng.randrange(_ROOT_UID_SPAN)
    return first, second


def isolation_problem() -> str | None:
    """Why no sandbox can be made here (one line naming what to install), or None when one can.
    Probed once per process by starting a sandbox."""
    if "problem" not in _cache:
        _cache["problem"] = _probe()
    return _cache["problem"]


def _probe() -> str | None:
    """What ``isolation_problem`` reports: the first missing piece, else the error of a trial sandbox."""
    import shutil
    import subprocess

    if not sys.platform.startswith("linux"):
        return "the sandbox needs Linux namespaces"
    if _bwrap() is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    version = _bwrap_version()
    if version < (0, 8):
        return (f"bubblewrap {'.'.join(map(str, version))} is too old (needs 0.8 or later for --disable-userns "
                "and --size; Debian 12 has it)")
    if _is_root() and shutil.which("setpriv") is None:
        return "setpriv is not installed (apt-get install util-linux)"
    uid = _root_uids()[0] if _is_root() else None
    argv = [*_bwrap_argv(1 << 20, uid, None), sys.executable, "-I", "-S", "-c", "pass"]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=_BWRAP_ENV, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bubblewrap did not start ({err})"
    if done.returncode != 0:
        why = (done.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return (f"bubblewrap cannot make a sandbox here ({why}); it needs unprivileged user namespaces, "
                "or root with CAP_SYS_ADMIN")
    return None


def require_isolation() -> None:
    """Raise SandboxUnavailableError (one line) unless samples can be sandboxed here."""
    problem = isolation_problem()
    if problem:
        raise SandboxUnavailableError(f"no sandbox for untrusted code: {problem}; "
                                 "or run without isolation (--unsafe-no-isolation)")


def _limit_spec(limits: Limits, unsafe: bool, uid: int | None) -> dict:
    # In a user namespace bwrap's own pid 1 has the sample's uid and counts too; as root it is root's.
    nproc = 0 if unsafe else limits.processes + (1 if uid is None else 0)
    return {"cpu": int(limits.timeout) + 1, "memory": int(limits.memory), "fsize": int(limits.file_size),
            "nproc": nproc, "path": _site_packages()}


def _site_packages() -> list[str]:
    """This interpreter's site-packages, which the runner (``python -S``) appends to sys.path itself:
    a sample may import what the harness can, without the ~30 ms a venv's .pth files cost at startup."""
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _start(role: str, spec: dict, fds: list[int], scratch: int | None, uid: int | None, unsafe: bool,
           home: str) -> _Started:
    """Start the runner as ``role`` in a sandbox (``scratch``: bytes of its writable directory, or
    None for none), or as a plain subprocess in the host directory ``home`` when ``unsafe``."""
    import subprocess

    runner = [sys.executable, "-I", "-B", "-S", "-c", _runner_source(), role, json.dumps(spec)]
    # No preexec_fn or user=: subprocess can then spawn without running Python in the child, which
    # matters when the caller is multithreaded (a JAX trainer calling humaneval_quick).
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if unsafe:
        proc = subprocess.Popen(runner, cwd=home, env=_environment(home), pass_fds=fds, start_new_session=True,
                                **pipes)
        return _Started(proc)
    info_r, info_w = os.pipe()
    try:
        # bwrap's own processes (pid 1 of the sandbox among them) get no environment of the harness:
        # in a user namespace the sample may read /proc/1/environ, and the harness may hold tokens.
        proc = subprocess.Popen([*_bwrap_argv(scratch, uid, info_w), *runner], pass_fds=[*fds, info_w], env=_BWRAP_ENV,
                                **pipes)
    except BaseException:
        os.close(info_r)
        raise
    finally:
        os.close(info_w)
    return _Started(proc, info_r)


def _open_pid1(info_r: int) -> int | None:
    """A pidfd for pid 1 of the new sandbox, from bwrap's --info-fd JSON; None when bwrap failed."""
    data = b""
    with os.fdopen(info_r, "rb") as fh:
        while chunk := fh.read(4096):
            data += chunk
    try:
        info = json.loads(data)
        pid, ns = int(info["child-pid"]), int(info["pid-namespace"])
        pidfd = os.pidfd_open(pid)
    except (ValueError, KeyError, TypeError, OSError):
        return None
    try:  # the pid could have been reused before pidfd_open: keep the pidfd only if it is ours
        if os.stat(f"/proc/{pid}/ns/pid").st_ino == ns:
            return pidfd
    except OSError:
        pass
    os.close(pidfd)
    return None


def _feed(started: _Started, source: str) -> None:
    try:
        started.proc.stdin.write(source.encode("utf-8"))
        started.proc.stdin.close()
    except OSError:  # it died before reading: the verdict says so
        pass


def _stop(started: _Started, unsafe: bool) -> None:
    """Kill the sandbox and wait until no process of it is left."""
    import select
    import signal
    import subprocess

    proc = started.proc
    started.resolve()
    if started.pidfd is not None:
        with contextlib.suppress(OSError):  # pid 1 dying takes every process of its pid namespace with it
            signal.pidfd_send_signal(started.pidfd, signal.SIGKILL)
    if unsafe:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    if started.pidfd is not None:
        select.select([started.pidfd], [], [], 30)  # readable once pid 1, and so the namespace, is gone
        os.close(started.pidfd)


def _read_verdict(fd: int, returncode: int) -> tuple[bool, str]:
    data = os.read(fd, 65536)
    try:
        result = json.loads(data)["result"]
    except (ValueError, KeyError, TypeError):
        return False, f"failed: checker exited without a verdict (exit code {returncode})"
    return result == "passed", result


def run_checked(program: str, checker: str, entry_point: str, limits: Limits | None = None, *, check: str = "check",
                unsafe_no_isolation: bool = False) -> tuple[bool, str]:
    """Run untrusted ``program`` (defines ``entry_point``) and trusted ``checker`` (defines
    ``check``) each in its own sandbox, and call ``check(candidate)`` in the checker, every call of
    ``candidate`` answered by ``entry_point`` in the program. Returns ``(passed, result)``, result
    "passed", "timed out" or "failed: <reason>"; raises SandboxUnavailableError when no sandbox can be
    made and ``unsafe_no_isolation`` is false."""
    import shutil
    import subprocess
    import tempfile

    limits = limits or Limits()
    unsafe = bool(unsafe_no_isolation)
    if not unsafe:
        require_isolation()
    tmp = tempfile.mkdtemp(prefix="heval-") if unsafe else None  # sandboxes get a private tmpfs instead
    started: list[_Started] = []
    fds: list[int] = []
    try:
        uids = _root_uids() if _is_root() and not unsafe else (None, None)
        to_program, to_checker, verdict = os.pipe(), os.pipe(), os.pipe()
        fds = [*to_program, *to_checker, *verdict]
        serve = {"entry": entry_point, "in": to_program[0], "out": to_checker[1],
                 **_limit_spec(limits, unsafe, uids[0])}
        judge = {"entry": entry_point, "check": check, "in": to_checker[0], "out": to_program[1],
                 "verdict": verdict[1], **_limit_spec(limits, unsafe, uids[1])}
        started.append(_start("serve", serve, [to_program[0], to_checker[1]], limits.scratch, uids[0], unsafe, tmp))
        started.append(_start("check", judge, [to_checker[0], to_program[1], verdict[1]], None, uids[1], unsafe, tmp))
        for fd in fds[:-2] + fds[-1:]:  # only the sandboxes hold these now, so EOF means one is gone
            os.close(fd)
        fds = [verdict[0]]
        for s in started:  # after both are started, so that their setups overlap
            s.resolve()
        _feed(started[0], program)
        _feed(started[1], checker)
        try:
            started[1].proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            return False, "timed out"
        return _read_verdict(verdict[0], started[1].proc.returncode)
    except Exception as err:  # the harness itself must keep going
        return False, f"failed: harness error {type(err).__name__}: {err}"
    finally:
        for s in started:
            _stop(s, unsafe)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # the runner, as ``python sandbox.py ROLE SPEC`` (sandboxes run _runner_source)
    sys.exit(_runner_main(sys.argv[1:]))

"""A throw-away Postfix relay for the benchmark: the "Postfix as relay" row of issue 8.

``PostfixRelay`` starts, per scenario, a private Postfix instance that shares nothing
with the system's (which may be running on port 25 and is left alone):

- its own ``config_directory`` (``main.cf``/``master.cf`` generated here), and its own
  ``queue_directory`` and ``data_directory``, all under one temporary directory;
- ``smtpd`` on ``127.0.0.1:<free port>`` only, accepting mail from ``127.0.0.0/8`` and
  relaying everything to ``smtp-sink`` on loopback (``relayhost = [127.0.0.1]:<port>``);
- no local delivery, no DNS (``smtp_host_lookup = native``, ``disable_dns_lookups``,
  no reverse lookup of clients), no chroot, IPv4 only;
- the queue as Postfix ships it: ``cleanup`` fsyncs every queue file before ``smtpd``
  answers ``250``; delivery concurrency and ``in_flow_delay`` are Postfix's defaults.

``smtp-sink`` (shipped with Postfix, accepts and discards) is the destination; its
``-c`` counters (``mesg=N`` per ``.`` received) say how many messages arrived, so
"delivered" is end to end.  The CPU of the instance is the CPU of ALL its processes
(``master`` and the ``smtpd``, ``cleanup``, ``qmgr``, ``trivial-rewrite``, ``smtp``,
``postlogd`` ... children that come and go), read from a cgroup made for the run; when
no cgroup can be created, from ``master``'s own and reaped children's times
(``utime + stime + cutime + cstime``) plus its live children's.

Starting it needs root (``postfix start``), the ``postfix`` user and the ``postdrop``
group of the Debian package; ``unavailable_reason()`` says what is missing.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
# smtpd processes (one per session) and the default for every other service: room for
# 200 sessions reconnecting per message.
DEFAULT_PROCESS_LIMIT = 256
MESSAGE_SIZE_LIMIT = 30 * 1024 * 1024  # as esprelay's ESPRELAY_MAX_MESSAGE_SIZE in the bench


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/bin"):
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    return None


def unavailable_reason() -> str | None:
    """Why a Postfix relay cannot run here, or None when it can."""
    for name in ("postfix", "postconf", "smtp-sink"):
        if _tool(name) is None:
            return f"{name} is not installed (Debian package postfix)"
    if os.geteuid() != 0:
        return "starting a Postfix instance needs root"
    try:
        pwd.getpwnam(MAIL_OWNER)
        grp.getgrnam(SETGID_GROUP)
    except KeyError as exc:
        return f"missing user or group {exc}"
    return None


@dataclass(frozen=True)
class RelayConfig:
    """Where a relay instance lives and which ports it uses."""

    root: Path
    smtpd_port: int
    sink_port: int
    process_limit: int = DEFAULT_PROCESS_LIMIT
    message_size_limit: int = MESSAGE_SIZE_LIMIT

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"


def main_cf(config: RelayConfig) -> str:
    """main.cf of a loopback-only relay that sends everything to smtp-sink."""
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(config.queue_dir),
        "data_directory": str(config.data_dir),
        "mail_owner": MAIL_OWNER,
        "setgid_group": SETGID_GROUP,
        "myhostname": "postfix-relay.bench.invalid",
        "mydomain": "bench.invalid",
        "myorigin": "$myhostname",
        # No local delivery: nothing is local, and if anything were, it would bounce.
        "mydestination": "",
        "local_recipient_maps": "",
        "local_transport": "error:5.1.1 local delivery is disabled",
        "alias_maps": "",
        "alias_database": "",
        "relay_domains": "",
        "relayhost": f"[127.0.0.1]:{config.sink_port}",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        # No DNS anywhere: the relayhost is a bracketed address, clients are not looked up.
        "smtp_host_lookup": "native",
        "disable_dns_lookups": "yes",
        "smtpd_peername_lookup": "no",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
        "default_process_limit": str(config.process_limit),
        "message_size_limit": str(config.message_size_limit),
        "biff": "no",
        # Postfix's own log, in the instance (postlogd writes it; there is no syslog here).
        "maillog_file": str(config.maillog),
        "maillog_file_prefixes": str(config.root),
    }
    return "".join(f"{name} = {value}\n" for name, value in settings.items())


# service, type, private, unpriv, chroot, wakeup, maxproc, command (see master(5)).
_SERVICES: tuple[tuple[str, ...], ...] = (
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
)


def master_cf(config: RelayConfig) -> str:
    """master.cf: smtpd on 127.0.0.1:<port> only, the services a relay uses, no chroot."""
    smtpd = (
        f"127.0.0.1:{config.smtpd_port}",
        "inet",
        "n",
        "-",
        "n",
        "-",
        str(config.process_limit),
        "smtpd",
    )
    return "".join(" ".join(fields) + "\n" for fields in (smtpd, *_SERVICES))


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (callers retry if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, timeout: float, alive: Callable[[], bool] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        if alive is not None and not alive():
            return False
        time.sleep(0.05)
    return False


_MESG = re.compile(rb"mesg=(\d+)")


def sink_messages(counter_file: Path) -> int:
    """Messages smtp-sink has received, from the tail of its ``-c`` output."""
    try:
        with counter_file.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 256))
            tail = handle.read()
    except FileNotFoundError:
        return 0
    found = _MESG.findall(tail)
    return int(found[-1]) if found else 0


# ---------------------------------------------------------------------------------------
# CPU of every process of the instance


class CpuAccount:
    """utime + stime of a group of processes, in seconds, however they come and go."""

    method = "none"

    def seconds(self) -> float:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return []

    def join(self) -> None:
        """Called in the child before exec: put this process into the group."""

    def close(self) -> None:
        """Remove what was created (after every process has gone)."""


_CGROUP_V2 = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup/cpu,cpuacct"))


class CgroupCpu(CpuAccount):
    """A cgroup made for the run: v2 ``cpu.stat`` usage_usec or v1 ``cpuacct.usage``."""

    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version
        self.method = f"cgroup-v{version}"
        self._procs = str(path / "cgroup.procs")

    @classmethod
    def create(cls, name: str) -> CgroupCpu | None:
        """A new child cgroup under the first writable hierarchy that counts CPU."""
        candidates = [
            (base, 2) for base in _CGROUP_V2 if (base / "cgroup.controllers").exists()
        ] + [(base, 1) for base in _CGROUP_V1 if (base / "cpuacct.usage").exists()]
        for base, version in candidates:
            path = base / name
            try:
                path.mkdir()
            except OSError:
                continue
            group = cls(path, version)
            try:
                group.seconds()
                Path(group._procs).read_text()
            except (OSError, ValueError):
                with contextlib.suppress(OSError):
                    path.rmdir()
                continue
            return group
        return None

    def seconds(self) -> float:
        if self.version == 2:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            raise OSError(f"no usage_usec in {self.path / 'cpu.stat'}")
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in Path(self._procs).read_text().split()]
        except OSError:
            return []

    def join(self) -> None:
        # Runs between fork and exec: keep it to one write.
        with open(self._procs, "w") as handle:
            handle.write(str(os.getpid()))

    def kill_all(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def close(self) -> None:
        self.kill_all()
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _proc_times(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime + stime + cutime + cstime in seconds) of a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return int(fields[1]), ticks / CLOCK_TICKS


class ProcTreeCpu(CpuAccount):
    """Fallback without cgroups: master (its own time and that of the children it reaped)
    plus its live children.  Postfix's daemons do not fork further, and master reaps
    every child, so nothing escapes; a child that has exited but is not yet reaped is
    still readable in /proc."""

    method = "proc-tree"

    def __init__(self, master_pid: int) -> None:
        self.master_pid = master_pid

    def pids(self) -> list[int]:
        found = [self.master_pid]
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                times = _proc_times(int(entry.name))
                if times and times[0] == self.master_pid:
                    found.append(int(entry.name))
        return found

    def seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            times = _proc_times(pid)
            if times:
                total += times[1]
        return total


# ---------------------------------------------------------------------------------------


class PostfixRelay:
    """One Postfix relay instance and its smtp-sink, started and stopped as a unit."""

    def __init__(
        self,
        root: Path,
        *,
        server_cpus: set[int] | None = None,
        helper_cpus: set[int] | None = None,
        process_limit: int = DEFAULT_PROCESS_LIMIT,
        start_timeout: float = 30.0,
    ) -> None:
        self.root = root
        self.server_cpus = server_cpus
        self.helper_cpus = helper_cpus
        self.process_limit = process_limit
        self.start_timeout = start_timeout
        self.config: RelayConfig | None = None
        self.cpu: CpuAccount | None = None
        self._sink: subprocess.Popen[bytes] | None = None
        self._started = False
        self._postfix = _tool("postfix") or "postfix"

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> PostfixRelay:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self.config is not None
        return self.config.smtpd_port

    @property
    def counter_file(self) -> Path:
        return self.root / "smtp-sink.out"

    def start(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot run Postfix: {reason}")
        # Postfix daemons run as the postfix user and must reach the queue directory.
        self.root.chmod(0o755)
        sink_port = self._start_sink()
        for _attempt in range(3):
            self.config = RelayConfig(
                self.root,
                smtpd_port=free_port(),
                sink_port=sink_port,
                process_limit=self.process_limit,
            )
            self._write_config(self.config)
            if self._start_postfix():
                return
            self._stop_postfix()
        raise RuntimeError(f"Postfix did not start:\n{self._log_tail()}")

    def _start_sink(self) -> int:
        tool = _tool("smtp-sink") or "smtp-sink"
        for _attempt in range(3):
            port = free_port()
            with (
                self.counter_file.open("wb") as out,
                (self.root / "smtp-sink.err").open("wb") as err,
            ):
                self._sink = subprocess.Popen(
                    [tool, "-c", "-u", MAIL_OWNER, "-m", "1024", f"127.0.0.1:{port}", "1024"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=self.root,
                )
            if self.helper_cpus:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(self._sink.pid, self.helper_cpus)
            if _wait_listening(port, 10.0, alive=self._sink_alive):
                return port
            self._stop_sink()
        raise RuntimeError(
            f"smtp-sink did not start: {(self.root / 'smtp-sink.err').read_text()[-500:]}"
        )

    def _sink_alive(self) -> bool:
        return self._sink is not None and self._sink.poll() is None

    def _write_config(self, config: RelayConfig) -> None:
        config.config_dir.mkdir(exist_ok=True)
        config.queue_dir.mkdir(exist_ok=True)
        config.data_dir.mkdir(exist_ok=True)
        postfix = pwd.getpwnam(MAIL_OWNER)
        # What `postfix check` expects: root owns the config and queue roots, the
        # mail owner its data directory; `postfix start` creates the queue's subdirectories.
        os.chown(config.data_dir, postfix.pw_uid, postfix.pw_gid)
        (config.config_dir / "main.cf").write_text(main_cf(config))
        (config.config_dir / "master.cf").write_text(master_cf(config))

    def _start_postfix(self) -> bool:
        assert self.config is not None
        if self.cpu is None:
            name = f"esprelay-bench-postfix-{os.getpid()}-{time.monotonic_ns()}"
            self.cpu = CgroupCpu.create(name)
        cpu, cpus = self.cpu, self.server_cpus

        def enter() -> None:
            # In the child of fork: master and every daemon it forks inherit both.
            if cpu is not None:
                cpu.join()
            if cpus:
                os.sched_setaffinity(0, cpus)

        completed = subprocess.run(
            [self._postfix, "-c", str(self.config.config_dir), "start"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=self.start_timeout,
            preexec_fn=enter,
            check=False,
        )
        self._started = True
        if completed.returncode != 0:
            return False
        if not _wait_listening(self.config.smtpd_port, self.start_timeout):
            return False
        if self.cpu is None:
            master = self.master_pid()
            if master is None:
                return False
            self.cpu = ProcTreeCpu(master)
        return True

    def master_pid(self) -> int | None:
        assert self.config is not None
        try:
            return int((self.config.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _postfix_command(self, command: str, timeout: float = 60.0) -> None:
        assert self.config is not None
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                [self._postfix, "-c", str(self.config.config_dir), command],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )

    def _stop_postfix(self) -> None:
        if not self._started or self.config is None:
            return
        self._started = False
        master = self.master_pid()
        self._postfix_command("stop")
        if master is not None and _alive(master):
            self._postfix_command("abort", timeout=30.0)
        # Whatever is left (nothing, normally) is killed by pid: the cgroup's members,
        # or master and its children.
        if isinstance(self.cpu, CgroupCpu):
            self.cpu.kill_all()
        elif master is not None and _alive(master):
            for pid in ProcTreeCpu(master).pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _stop_sink(self) -> None:
        sink, self._sink = self._sink, None
        if sink is None:
            return
        if sink.poll() is None:
            sink.terminate()
            try:
                sink.wait(10)
            except subprocess.TimeoutExpired:
                sink.kill()
                sink.wait(10)

    def stop(self) -> None:
        try:
            self._stop_postfix()
        finally:
            try:
                self._stop_sink()
            finally:
                if self.cpu is not None:
                    self.cpu.close()
                    self.cpu = None

    # -- measurements -------------------------------------------------------------------

    def delivered(self) -> int:
        return sink_messages(self.counter_file)

    def cpu_seconds(self) -> float:
        assert self.cpu is not None
        return self.cpu.seconds()

    @property
    def cpu_method(self) -> str:
        return self.cpu.method if self.cpu is not None else "none"

    def memory_mb(self) -> float:
        """Pss summed over the instance's processes, now (call it at the end of the load).

        Not a peak: dozens of processes share Postfix's libraries, so summing their
        VmHWM would count the shared pages once per process (~8x too much at 2 KB x 20);
        Pss splits each shared page between the processes that map it.
        """
        total = 0
        for pid in self.cpu.pids() if self.cpu else []:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        return total / 1024

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "maillog").read_text(errors="replace")[-3000:]
        return "(no maillog)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

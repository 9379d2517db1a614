"""Run a real ``esprelay serve`` process on loopback for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

LISTENING = re.compile(rb"smtp listening on [^:]+:(\d+)")
HTTP_LISTENING = re.compile(rb"http listening on [^:]+:(\d+)")


class RelayProcess:
    """``python -m esprelay serve`` with its own environment and working directory.

    The SMTP port is 0 unless given, and read back from the "listening" log line.
    Every log line is kept in ``self.log`` for assertions.
    """

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = {
            "ESPRELAY_SMTP_HOST": "127.0.0.1",
            "ESPRELAY_SMTP_PORT": "0",
            "ESPRELAY_OUTBOX_DIR": str(workdir / "outbox"),
            "ESPRELAY_SPOOL_URL": f"sqlite:///{workdir / 'data' / 'spool.db'}",
            "ESPRELAY_POLL_INTERVAL": "0.2",
            "ESPRELAY_SHUTDOWN_GRACE": "5",
            "ESPRELAY_HTTP_PORT": "0",
            # Header repair (on in production) adds Date/Message-ID to the many test
            # messages without them; tests of the pipeline compare exact bytes, so it is
            # off here and tests/test_security_repair.py turns it on.
            "ESPRELAY_REPAIR_HEADERS": "false",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        #: More arguments for `esprelay serve` (--host, --port).
        self.args: list[str] = []
        self.port: int = int(self.env["ESPRELAY_SMTP_PORT"])
        self.http_port: int = 0
        self._lines: list[bytes] = []
        self._lock = threading.Lock()

    def cli(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """``esprelay ARGS`` with this relay's environment (its output as text)."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
        environ.update(self.env)
        return subprocess.run(
            [sys.executable, "-m", "esprelay", *args],
            capture_output=True,
            text=True,
            env=environ,
            cwd=self.workdir,
            check=check,
            timeout=timeout,
        )

    @property
    def outbox(self) -> Path:
        return Path(self.env["ESPRELAY_OUTBOX_DIR"])

    @property
    def log(self) -> str:
        with self._lock:
            return b"".join(self._lines).decode(errors="replace")

    def start(self, timeout: float = 60.0) -> RelayProcess:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
        environ.update(self.env)
        with self._lock:
            self._lines.append(b"--- start ---\n")
        self.port = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "esprelay", "serve", *self.args],
            cwd=self.workdir,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        ready = threading.Event()
        self._pump_thread = threading.Thread(
            target=self._pump, args=(self.proc, ready), daemon=True
        )
        self._pump_thread.start()
        if not ready.wait(timeout) or not self.port:
            self.kill()
            raise RuntimeError(f"esprelay did not start:\n{self.log}")
        return self

    def _pump(self, proc: subprocess.Popen[bytes], ready: threading.Event) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                with self._lock:
                    self._lines.append(line)
                http = HTTP_LISTENING.search(line)
                if http:
                    self.http_port = int(http.group(1))
                match = LISTENING.search(line)
                if match:
                    self.port = int(match.group(1))
                    ready.set()
        ready.set()  # process ended; start() reports it

    def wait_for_log(self, pattern: str, timeout: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.log)) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} x{count} not in log within {timeout}s:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._pump_thread.join(5)
        return code

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self._pump_thread.join(5)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send_signal(self, sig: int) -> None:
        """Signal the running process (SIGSTOP/SIGCONT/SIGKILL...), if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def deliveries(self) -> list[str]:
        """Spool ids in the order the outbox wrote them; an id twice is a duplicate."""
        log = self.outbox / "deliveries.log"
        if not log.exists():
            return []
        return [line.split()[0] for line in log.read_text().splitlines() if line.strip()]

    def delivered_ids(self) -> list[str]:
        """Ids whose .json (written last) is in the outbox."""
        if not self.outbox.exists():
            return []
        return sorted(p.stem for p in self.outbox.glob("*.json"))

    def wait_delivered(self, count: int, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = self.delivered_ids()
            if len(ids) >= count:
                return ids
            time.sleep(0.05)
        raise AssertionError(
            f"{len(self.delivered_ids())} of {count} delivered after {timeout}s:\n{self.log}"
        )

"""Starting and stopping the OpenAI-compatible servers of lmserve and the anchors on loopback, one key per config."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerSpec:
    key: str                      # one running server per key, e.g. "vllm" or "lmserve-cache"
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 600.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ServerPool:
    """Servers by key: started in turn (each waits until it is ready), logs under `log_dir`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, tuple[ServerSpec, subprocess.Popen]] = {}

    def ensure(self, spec: ServerSpec) -> str:
        """Start `spec` unless it already runs; returns its base URL; raises RuntimeError with the log tail."""
        running = self.procs.get(spec.key)
        if running and running[1].poll() is None and running[0].argv == spec.argv:
            return spec.base_url
        self.stop(spec.key)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.key}.log"
        log = log_path.open("a")
        log.write(f"\n=== {time.strftime('%F %T')} {' '.join(spec.argv)}\n")
        log.flush()
        proc = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **spec.env},
                                start_new_session=True)
        self.procs[spec.key] = (spec, proc)
        deadline = time.monotonic() + spec.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _ready(spec.base_url):
                return spec.base_url
            time.sleep(2.0)
        self.stop(spec.key)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"server {spec.key} did not come up (log {log_path}):\n{tail}")

    def stop(self, key: str) -> None:
        entry = self.procs.pop(key, None)
        if entry is None:
            return
        proc = entry[1]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers, nothing else
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)

    def keep_only(self, keys: set[str]) -> None:
        for key in list(self.procs):
            if key not in keys:
                self.stop(key)

    def stop_all(self) -> None:
        self.keep_only(set())

    def pids(self) -> list[int]:
        return [p.pid for _, p in self.procs.values() if p.poll() is None]


def _ready(base_url: str) -> bool:
    """/health (200 once the model has loaded, for lmserve, vLLM and llama-server alike) and /v1/models answer."""
    try:
        for path in ("/health", "/v1/models"):
            with urllib.request.urlopen(base_url + path, timeout=5) as response:
                if response.status != 200:
                    return False
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """How busy all CPUs were over `seconds` (0..1), from /proc/stat."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(threshold: float = 0.15, timeout_s: float = 300.0) -> float:
    """Wait until the machine is mostly idle (others' tests, a server still winding down); returns the last load."""
    deadline = time.monotonic() + timeout_s
    busy = cpu_busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(3.0)
        busy = cpu_busy_fraction()
    return busy

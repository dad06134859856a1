"""The studio as it runs scaled out: one ``serve --no-worker`` and N ``worker`` processes, each on its own
machine of a netlab.Lab, sharing only PostgreSQL, Redis (the queue) and S3 (moto). Used by
tests/test_scaleout.py and the benchmarks in tests/bench/.

    with Lab(tmp) as lab:
        cluster = Cluster(lab, tmp, workers=2, env={"FAKE_STEP_S": "0.05"})
        key = cluster.api_key("alice")
        job = cluster.api(key, "/api/jobs", {...})
        cluster.stop()

Also a small Server-Sent Events client that reconnects with Last-Event-ID as a browser's EventSource
does, recording every event id it got.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.netlab import Lab, Machine, wait_port

REPO = Path(__file__).resolve().parent.parent
WEB_PORT = 8765
PASSWORD = "correct horse battery staple"


class Cluster:
    def __init__(self, lab: Lab, tmp: str | os.PathLike, *, workers: int = 2, env: dict[str, str] | None = None,
                 web_threads: int = 48):
        self.lab, self.tmp = lab, Path(tmp)
        self.pg, self.s3 = lab.postgres(), lab.s3()
        self.database_url = self.pg.new_database()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NCS_")}
        self.env.update({
            "PYTHONPATH": str(REPO), "AWS_DEFAULT_REGION": "us-east-1", "OMP_NUM_THREADS": "1",
            "NCS_MODE": "lab", "NCS_SECRET_KEY": "a-shared-secret-key-for-the-lab-only",
            "NCS_DATABASE_URL": self.database_url, "NCS_QUEUE_URL": lab.redis() + "/0",
            "NCS_STORAGE_URL": f"s3://{self.s3.bucket}/studio", "NCS_STORAGE_OPTIONS": json.dumps(self.s3.options),
            "NCS_TRAINER_MODULE": "tests.fake_trainer", "NCS_GPUS": "none", "NCS_CPU_SLOTS": "1",
            "NCS_LEASE_SECONDS": "3", "NCS_RECONCILE_SECONDS": "0.5", "NCS_RETRY_BACKOFF_SECONDS": "0.2",
            "NCS_TERM_GRACE_SECONDS": "20", "NCS_MAX_QUEUED_JOBS": "100", "NCS_MAX_RUNNING_JOBS": "8",
            "NCS_ALLOWED_HOSTS": "*", "NCS_THREADS": str(web_threads), "NCS_LOG_FORMAT": "text",
            # one user watches a job with a browser and eight SSE clients at once (test_scaleout.py)
            "NCS_MAX_STREAMS_PER_USER": "16",
            **(env or {}),
        })
        self.web_machine = lab.machine("web")
        self.web_port = WEB_PORT if lab.isolated else _free_port()
        self.url = f"http://{self.web_machine.ip}:{self.web_port}"
        self.web: subprocess.Popen | None = None
        self.start_web()
        self.workers: list[tuple[Machine, subprocess.Popen]] = []
        for i in range(workers):
            self.start_worker(f"w{i + 1}")

    # -- processes --
    def home(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _spawn(self, machine: Machine, name: str, cmd: list[str]) -> subprocess.Popen:
        env = dict(self.env, NCS_HOME=str(self.home(name)))
        log = open(self.home(name) / "process.log", "ab")
        return subprocess.Popen(machine.argv(cmd), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def start_web(self) -> None:
        cmd = [sys.executable, "-m", "nanochat_studio", "serve", "--no-worker", "--host", self.web_machine.ip,
               "--port", str(self.web_port)]
        self.web = self._spawn(self.web_machine, "web", cmd)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.web.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("the web process did not start: " + self.log("web")[-3000:])

    def stop_web(self, sig: int = signal.SIGTERM) -> float:
        """Stop the web process; the seconds it took to exit."""
        t0 = time.monotonic()
        self.web.send_signal(sig)
        self.web.wait(60)
        return time.monotonic() - t0

    def start_worker(self, name: str) -> None:
        machine = self.lab.machine(name)
        proc = self._spawn(machine, name, [sys.executable, "-m", "nanochat_studio", "worker"])
        self.workers.append((machine, proc))

    def worker(self, name: str) -> tuple[Machine, subprocess.Popen]:
        return next((m, p) for m, p in self.workers if m.name == name)

    def check_alive(self) -> None:
        """AssertionError with its log when a process of the cluster died on its own."""
        for machine, proc in [(self.web_machine, self.web), *self.workers]:
            if proc.poll() is not None and not getattr(proc, "killed_on_purpose", False):
                raise AssertionError(f"{machine.name} exited {proc.returncode}: {self.log(machine.name)[-3000:]}")

    def log(self, name: str) -> str:
        path = self.home(name) / "process.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        procs = [p for _, p in self.workers] + ([self.web] if self.web else [])
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
        # Sidecars and trainers left by a killed worker live on in its namespace until they are done:
        # they are ours (the namespace was made for them), so end them by pid.
        for machine, _ in self.workers:
            for pid in machine.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # -- accounts and the API --
    def api_key(self, name: str) -> str:
        """An approved account ``{name}@example.com`` (password PASSWORD) and an API key of it, made
        through the shared database as an admin's CLI would."""
        from nanochat_studio import auth, db

        db.open_database(self.database_url)
        try:
            user = auth.create_user(f"{name}@example.com", password=PASSWORD, name=name.title())
            return auth.create_api_key(user, "lab")[1]
        finally:
            db.database.close()

    def api(self, key: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        req = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                              "Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def wait_web_port(self) -> None:
        wait_port(self.web_machine.ip, self.web_port)


def _free_port() -> int:
    from tests.netlab import free_port

    return free_port()


class SseClient(threading.Thread):
    """Follows one SSE URL until its ``end`` event; on a dropped connection waits ``retry_s`` and
    reconnects with Last-Event-ID (what EventSource does). ``ids`` holds every event id received."""

    def __init__(self, host: str, port: int, path: str, key: str, *, retry_s: float = 0.5, deadline_s: float = 120):
        super().__init__(daemon=True)
        self.host, self.port, self.path, self.key = host, port, path, key
        self.retry_s, self.deadline = retry_s, time.monotonic() + deadline_s
        self.ids: list[int] = []
        self.kinds: list[str] = []
        self.connects = 0
        self.ended = False

    def run(self) -> None:
        while not self.ended and time.monotonic() < self.deadline:
            headers = {"Authorization": f"Bearer {self.key}", "Accept": "text/event-stream"}
            if self.ids:
                headers["Last-Event-ID"] = str(self.ids[-1])
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                if resp.status == 200:
                    self.connects += 1
                    self._read(resp)
                conn.close()
            except (OSError, http.client.HTTPException):
                pass
            if not self.ended:
                time.sleep(self.retry_s)

    def _read(self, resp: http.client.HTTPResponse) -> None:
        event: dict[str, str] = {}
        while True:
            line = resp.readline()
            if not line:
                return  # the server went away mid-stream
            line = line.decode().rstrip("\r\n")
            if line:
                field, _, value = line.partition(":")
                event[field] = value.lstrip(" ")
                continue
            if "id" in event:
                self.ids.append(int(event["id"]))
            if "data" in event:
                self.kinds.append(event.get("event", "message"))
            if event.get("event") == "end":
                self.ended = True
                return
            event = {}

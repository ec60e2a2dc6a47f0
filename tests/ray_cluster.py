"""Real Ray clusters for tests: a head and extra nodes started with `ray start`, each its own raylet and object
store, on ports of their own (the suite's runtime, and other clusters on this machine, keep theirs).

Never `ray stop`: it stops every cluster on the machine. A node stops by its own processes: its `ray start
--block` process group, then anything still naming its temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_env(path_dirs: list[str] | None = None) -> dict[str, str]:
    """Environment for `ray start` / `ray job submit`: token auth (Ray >= 2.5x clusters use it; the head
    writes ~/.ray/auth_token and the CLI reads it), no usage stats, no inherited RAY_ADDRESS."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    if path_dirs is not None:
        env["PATH"] = os.pathsep.join(path_dirs)
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class RayNode:
    """One `ray start --block` process (a raylet, its object store and agents) and its temp dir."""

    process: subprocess.Popen
    temp_dir: str
    log: Path
    node_id: str = ""  # Ray's id, once the node has joined

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop this node alone: its processes (the raylet's workers, which renamed themselves `ray::...`,
        included), its process group, then every process still naming its temp dir."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.send_signal(sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(self.temp_dir in part for part in proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()


@dataclass
class LocalRayCluster:
    """A head plus extra nodes on this machine; `address` is the job server's (dashboard) address."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=cluster_env)
    nodes: list[RayNode] = field(default_factory=list)
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> RayNode:
        temp_dir = tempfile.mkdtemp(prefix=f"ray{name}", dir="/tmp")  # short: socket paths stay < 108 chars
        log = self.log_dir / f"ray_{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                [
                    RAY_CLI,
                    "start",
                    "--block",
                    "--node-ip-address=127.0.0.1",
                    f"--temp-dir={temp_dir}",
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}",
                    f"--metrics-export-port={free_port()}",
                    f"--node-manager-port={free_port()}",
                    f"--object-manager-port={free_port()}",
                    f"--object-store-memory={512 << 20}",
                    "--disable-usage-stats",
                    *args,
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killing it spares the suite's runtime
            )
        node = RayNode(process, temp_dir, log)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int, resources: dict[str, float] | None = None) -> str:
        """Start the head; returns its node id once the cluster answers."""
        args = [
            "--head",
            f"--port={self.gcs_port}",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources or {})}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        ]
        return self._start_and_join("head", args).node_id

    def add_node(
        self, num_cpus: int, resources: dict[str, float] | None = None, name: str = "node"
    ) -> RayNode:
        """A worker node joining the head; returns once the cluster lists it alive."""
        args = [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}"]
        return self._start_and_join(name, [*args, f"--resources={json.dumps(resources or {})}"])

    def _start_and_join(self, name: str, args: list[str]) -> RayNode:
        """Start a node and wait until the cluster lists it alive. `ray start` gives a raylet 30 s to register
        (hard-coded in Ray 2.60) and exits if it takes longer, as on a loaded machine: then start it again."""
        before = {n["node_id"] for n in self.alive_nodes()}
        for attempt in range(3):
            node = self._start(name if not attempt else f"{name}{attempt}", args)

            def joined_or_exited(node=node):
                if node.process.poll() is not None:
                    return {"exited"}
                return {n["node_id"] for n in self.alive_nodes()} - before

            found = self.wait_for(joined_or_exited, 300, f"{name} to join")
            if found != {"exited"}:
                node.node_id = found.pop()
                return node
            node.kill()
            self.nodes.remove(node)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        raise RuntimeError(f"`ray start` for {name} failed 3 times; see {node.log}")

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY_CLI, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def state(self, kind: str, *filters: str) -> list[dict]:
        """`ray list <kind> --detail` as dicts (Ray's own record: node ids, pids, states); [] before it answers."""
        args = ["list", kind, "--detail", "--format=json", f"--address={self.address}", "--limit=1000"]
        for f in filters:
            args += ["--filter", f]
        done = self.cli(*args)
        if done.returncode != 0:
            return []
        start = done.stdout.find("[")
        return json.loads(done.stdout[start:]) if start >= 0 else []

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n.get("state") == "ALIVE"]

    @staticmethod
    def wait_for(check, timeout_s: float, what: str):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            found = check()
            if found:
                return found
            time.sleep(1)
        raise TimeoutError(f"waited {timeout_s:g} s for {what}")

    def submit(
        self, entrypoint: list[str], submission_id: str, timeout_s: float = 900
    ) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- ENTRYPOINT`, waiting for the
        job's end; retried while the head's job agent is still coming up."""
        command = [
            "job",
            "submit",
            f"--address={self.address}",
            "--working-dir=.",
            "--runtime-env=jobs/runtime_env.yaml",
            f"--submission-id={submission_id}",
            "--",
            *entrypoint,
        ]
        deadline = time.time() + 180
        while True:
            done = self.cli(*command, timeout=timeout_s)
            not_ready = "No available agent" in done.stderr or "Failed to connect" in done.stderr
            if not (not_ready and time.time() < deadline):
                return done
            time.sleep(3)

    def job_logs(self, submission_id: str) -> str:
        """The whole driver log of a job (`ray job submit` prints only its last 20,000 characters on failure)."""
        return self.cli("job", "logs", f"--address={self.address}", submission_id).stdout

    def stop(self) -> None:
        """Stop every node of this cluster (extra nodes first), and remove their temp dirs."""
        for node in reversed(self.nodes):
            node.kill(signal.SIGTERM)
            node.kill(signal.SIGKILL)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.nodes = []

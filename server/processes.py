"""Real Flower processes on this machine: a SuperLink (for a deployment or the simulation engine), SuperNodes, and
`flwr run` against them. Used by the examples, the benchmarks and the tests; everything started is stopped by
process id (a process group each, so ClientApp, ServerApp and simulation children go too).

A SuperLink we start ourselves rather than `flwr run`'s own local one, which keeps running after the run with no
handle to stop it by.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Loopback:
    """A SuperLink and SuperNodes on 127.0.0.1, with a Flower home whose connection `loopback` points at it.

    With ``simulation=True`` the SuperLink runs Flower's simulation engine (Ray) and :meth:`run` simulates
    ``num_supernodes`` nodes instead of talking to SuperNodes.
    """

    def __init__(self, root: Path, simulation: bool = False, credentials: Path | None = None,
                 authenticate: bool = False) -> None:
        """``credentials``: a folder from ``gramfuse credentials`` (``ca.crt``, ``server.pem``, ``server.key``, site
        keys): TLS everywhere. ``authenticate``: only sites registered with :meth:`register` may connect."""
        self.simulation = simulation
        self.credentials = credentials.resolve() if credentials else None
        self.authenticate = authenticate
        self.root = root.resolve()
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # The SuperLink and SuperNodes start Flower's other commands (flower-superexec) by name: our environment's
        # bin folder must be on PATH even when it was never activated (make, CI).
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(self.home), "PATH": path}
        self.processes: dict[str, subprocess.Popen] = {}
        transport = (f'root-certificates = "{self.credentials / "ca.crt"}"\n' if self.credentials
                     else "insecure = true\n")
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n'
            f'[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n{transport}'
        )

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def start_superlink(self) -> None:
        # A file database: the in-memory one fails under concurrent pushes in flwr 1.41; our entry point waits
        # longer for its locks (server/superlink.py says why).
        command = [str(BIN / "gramfuse-superlink"), *self._tls_flags(), "--port", str(self.port),
                   "--database", str(self.root / "superlink.db")]
        if self.authenticate:
            command.append("--enable-supernode-auth")
        self._start("superlink", command + (["--simulation", "--isolation", "subprocess"] if self.simulation else []))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the SuperLink did not open port {self.port}; see {self.root / 'superlink.log'}")

    def _tls_flags(self) -> list[str]:
        if self.credentials is None:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.credentials / "ca.crt"), "--ssl-certfile",
                str(self.credentials / "server.pem"), "--ssl-keyfile", str(self.credentials / "server.key")]

    def register(self, public_key: Path) -> int:
        """Register a site's public key with the SuperLink (``flwr supernode register``); returns its node id."""
        done = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public_key), "loopback", "--format",
                               "json"], env=self.env, capture_output=True, text=True, timeout=120, cwd=self.root)
        try:
            return int(json.loads(done.stdout)["node-id"])
        except (ValueError, KeyError) as error:
            raise RuntimeError(f"registering {public_key} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}") from error

    def start_supernode(self, name: str, model_path: Path, data_path: Path,
                        key: Path | None = None, extra_config: str = "") -> subprocess.Popen:
        """A SuperNode for one site; ``key``: its private key, for a SuperLink that authenticates sites;
        ``extra_config``: more node config (``require-secure=true``)."""
        node_config = f"model-path='{model_path}' data-path='{data_path}' name='{name}' {extra_config}".strip()
        transport = (["--root-certificates", str(self.credentials / "ca.crt")] if self.credentials
                     else ["--insecure"])
        auth = ["--auth-supernode-private-key", str(key)] if key else []
        return self._start(name, [str(BIN / "flower-supernode"), *transport, *auth, "--superlink",
                                  f"127.0.0.1:{self.port}", "--port", str(free_port()), "--node-config", node_config])

    def run(self, run_config: str, num_supernodes: int = 0, timeout: float = 600,
            capture: bool = True, app: Path = REPO) -> subprocess.CompletedProcess:
        """`flwr run APP loopback` (the repository's app by default), waiting for the run to end (logs streamed)."""
        command = [str(BIN / "flwr"), "run", str(app), "loopback", "--stream", "-c", run_config]
        if self.simulation:
            # One CPU per simulated node: on 2 cores Ray would otherwise oversubscribe.
            command += ["--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1"]
        return subprocess.run(command, env=self.env, capture_output=capture, text=True, timeout=timeout, cwd=REPO)

    def ours(self) -> list:
        """Every live process started from this loopback, at any depth: those that left our process groups (Flower's
        SuperLink starts its ServerApp in a session of its own) and orphans re-parented to init, found by the Flower
        home in their environment, which every one of them inherited."""
        import psutil

        found = []
        for process in psutil.process_iter():
            try:
                if process.pid != os.getpid() and process.environ().get("FLWR_HOME") == str(self.home):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def stop(self) -> None:
        """Stop what this loopback started: its process groups first, then anything of ours still running."""
        import psutil

        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        leftovers = self.ours()
        for process in leftovers:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(leftovers, timeout=10)
        for process in alive:
            process.kill()

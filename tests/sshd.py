"""A real OpenSSH server on 127.0.0.1 for the tests: its own config, host key and client key in a temp dir.

The suite runs in a network namespace with only loopback, so this server is the one device the SSH tests
reach. Debian's openssh-server provides sshd (./run-tests installs it when it runs as root).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def unavailable() -> str | None:
    if not Path(SSHD).exists():
        return "no sshd here (apt-get install openssh-server; ./run-tests does it as root)"
    if shutil.which("ssh-keygen") is None:
        return "no ssh-keygen here (apt-get install openssh-client)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Sshd:
    root: Path
    port: int
    host_key: str  # the server's public host key, as an inventory pins it
    client_key: Path  # the private key the client logs in with
    user: str
    process: subprocess.Popen | None = None

    @classmethod
    def prepare(cls, root: Path) -> "Sshd":
        root.mkdir(parents=True, exist_ok=True)
        host_pub = keygen(root / "host_ed25519")
        client_pub = keygen(root / "client_ed25519")
        (root / "authorized_keys").write_text(client_pub + "\n")
        server = cls(root, free_port(), host_pub, root / "client_ed25519", getpass.getuser())
        server.write_config()
        return server

    def write_config(self) -> None:
        (self.root / "sshd_config").write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {self.port}", f"HostKey {self.root / 'host_ed25519'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}", f"PidFile {self.root / 'sshd.pid'}",
            # The temp dir is world-writable, which StrictModes would refuse.
            "StrictModes no", "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp", "MaxStartups 64:30:128",
            "MaxSessions 64", "LogLevel ERROR", "",
        ]))

    def start(self) -> "Sshd":
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
        # -D: stay in the foreground, so the test owns the process and can kill it mid-job.
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                        stdout=subprocess.DEVNULL, stderr=open(self.root / "sshd.log", "ab"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start listening within 10 s")

    def kill(self) -> None:
        """Stops the server and every session it runs, as a device losing power would."""
        if self.process is not None and self.process.poll() is None:
            # Per-connection sshd processes and the jobs they run detach into sessions of their own, so the
            # listener's process group does not reach them: kill the whole tree below it.
            for pid in [self.process.pid, *descendants(self.process.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait()

    def inventory_entry(self, python: list[str] | None = None, workdir: Path | None = None) -> dict:
        return {"transport": "ssh", "address": f"127.0.0.1:{self.port}", "user": self.user,
                "host_key": self.host_key, "identity": str(self.client_key),
                **({"python": python} if python else {}), **({"workdir": str(workdir)} if workdir else {})}

"""A device reached over SSH (asyncssh), its host key pinned in the inventory and always verified.

There is no option to skip the check: a board that answers with another key is either another board or
a reinstalled one, and a benchmark must never land on a machine nobody meant. Every argument of the remote
command is quoted, so file names reach the device as they are.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import uuid
from pathlib import Path

from edge_deploy.pipeline.errors import ConfigError, DeviceError, DeviceTimeout, ToolchainMissing
from edge_deploy.targets.transports import ConnectionDropped, Execution, Session, Transport

CONNECT_TIMEOUT_S = 15
# Reads the versions of the runtime packages on the device; importlib.metadata is in every Python >= 3.8.
VERSIONS_SCRIPT = (
    "import json, platform, sys\n"
    "from importlib import metadata\n"
    "def version(name):\n"
    "    try:\n"
    "        return metadata.version(name)\n"
    "    except metadata.PackageNotFoundError:\n"
    "        return 'not installed'\n"
    "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),\n"
    "                  'packages': {n: version(n) for n in sys.argv[1:]}}))\n"
)


def _asyncssh():
    try:
        import asyncssh
    except ImportError:
        raise ToolchainMissing("SSH devices need asyncssh: pip install 'edge-deploy[remote]'") from None
    return asyncssh


def pinned_key(line: str, device: str):
    """The public key an inventory entry pins ("ssh-ed25519 AAAA..." as in a known_hosts or .pub file)."""
    asyncssh = _asyncssh()
    words = str(line or "").split()
    # Accept a known_hosts line too: its first word is the host pattern.
    if len(words) >= 3 and not words[0].startswith(("ssh-", "ecdsa-", "sk-")):
        words = words[1:]
    try:
        return asyncssh.import_public_key(" ".join(words[:2]))
    except (asyncssh.KeyImportError, ValueError, IndexError):
        raise ConfigError(f"device {device}: host_key is not an SSH public key (expected e.g. 'ssh-ed25519 AAAA…', "
                          "as printed by ssh-keyscan or found in the device's /etc/ssh/ssh_host_*_key.pub)") from None


class SshTransport(Transport):
    kind = "ssh"

    def __init__(self, name: str, host: str, port: int = 22, user: str | None = None, host_key: str = "",
                 identity: Path | None = None, python: list[str] | None = None, workdir: str = "/tmp"):
        if not host_key:
            raise ConfigError(f"device {name}: an SSH device needs its host_key pinned in the inventory "
                              "(ssh-keyscan HOST prints it; check it against the device's console)")
        self.name, self.host, self.port, self.user = name, host, int(port), user
        self.key = pinned_key(host_key, name)
        self.identity = Path(identity).expanduser() if identity else None
        if self.identity is not None and not self.identity.is_file():
            raise ConfigError(f"device {name}: identity file {self.identity} not found")
        self.python_argv = list(python or ["python3"])
        self.workdir = workdir
        self._described: dict[tuple, dict] = {}

    @property
    def address(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.port}"

    def python(self) -> list[str]:
        return self.python_argv

    async def connect(self):
        asyncssh = _asyncssh()
        options = {"known_hosts": ([self.key], [], []), "username": self.user or os.environ.get("USER") or "root",
                   "connect_timeout": CONNECT_TIMEOUT_S, "agent_path": None, "keepalive_interval": 15,
                   "keepalive_count_max": 4}
        if self.identity is not None:
            options["client_keys"] = [str(self.identity)]
        try:
            return await asyncssh.connect(self.host, self.port, **options)
        except asyncssh.HostKeyNotVerifiable:
            offered = await self._offered_fingerprint()
            raise DeviceError(f"{self.name}: {self.host}:{self.port} offered a host key that is not the one pinned in "
                              f"the inventory (pinned {self.key.get_fingerprint()}, offered {offered}); refused. If "
                              "the device was reinstalled, check the new key on its console and update host_key") \
                from None
        except asyncssh.PermissionDenied:
            raise DeviceError(f"{self.name}: {self.address} refused our key (check `user` and `identity` in the "
                              "inventory, and the device's authorized_keys)") from None
        except (asyncio.TimeoutError, TimeoutError):
            raise ConnectionDropped(f"{self.name}: {self.address} did not answer within {CONNECT_TIMEOUT_S} s") \
                from None
        except (OSError, asyncssh.Error) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise ConnectionDropped(f"{self.name}: cannot connect to {self.address} ({reason})") from None

    async def _offered_fingerprint(self) -> str:
        asyncssh = _asyncssh()
        try:
            key = await asyncio.wait_for(asyncssh.get_server_host_key(self.host, self.port), CONNECT_TIMEOUT_S)
            return key.get_fingerprint() if key is not None else "none"
        except Exception:  # only decorates the message; the refusal stands either way
            return "unknown"

    async def open(self) -> Session:
        connection = await self.connect()
        return SshSession(self, connection)

    def describe(self, packages: tuple[str, ...]) -> dict:
        return asyncio.run(self.adescribe(packages))

    async def adescribe(self, packages: tuple[str, ...]) -> dict:
        key = tuple(packages)
        if key not in self._described:
            self._described[key] = await self._describe(packages)
        return self._described[key]

    async def _describe(self, packages: tuple[str, ...]) -> dict:
        connection = await self.connect()
        try:
            command = shlex.join([*self.python_argv, "-c", VERSIONS_SCRIPT, *packages])
            done = await asyncio.wait_for(connection.run(command, check=False), CONNECT_TIMEOUT_S * 4)
        except (OSError, _asyncssh().Error) as exc:
            raise DeviceError(f"{self.name}: lost the connection while asking for versions ({exc})") from None
        except asyncio.TimeoutError:
            raise DeviceTimeout(f"{self.name}: did not say which runtime versions it has within "
                                f"{CONNECT_TIMEOUT_S * 4} s") from None
        finally:
            connection.close()
        if done.exit_status != 0:
            last = (str(done.stderr).strip().splitlines() or ["no output"])[-1]
            raise DeviceError(f"{self.name}: cannot run {shlex.join(self.python_argv)} on the device ({last}); set "
                              "`python` in the inventory to an interpreter that exists there")
        import json

        facts = json.loads(str(done.stdout))
        return {"transport": self.kind, "device": self.name, "address": f"{self.host}:{self.port}",
                "host_key": self.key.get_fingerprint(), **facts}


class SshSession(Session):
    def __init__(self, transport: SshTransport, connection):
        self.transport, self.connection = transport, connection

    def _dropped(self, exc: Exception, doing: str) -> ConnectionDropped:
        return ConnectionDropped(f"{self.transport.name}: connection lost while {doing} ({exc or type(exc).__name__})")

    async def push(self, job_dir: Path) -> str:
        asyncssh = _asyncssh()
        remote = f"{self.transport.workdir.rstrip('/')}/edge-deploy-job-{uuid.uuid4().hex[:12]}"
        try:
            async with self.connection.start_sftp_client() as sftp:
                await sftp.mkdir(remote)
                await sftp.put([str(p) for p in sorted(Path(job_dir).iterdir()) if p.is_file()], remote)
        except asyncssh.SFTPError as exc:
            raise DeviceError(f"{self.transport.name}: cannot write the job to {remote} ({exc.reason}); check "
                              "`workdir` in the inventory and the space left on the device") from None
        except (OSError, asyncssh.Error) as exc:
            raise self._dropped(exc, "uploading the job") from None
        return remote

    async def execute(self, argv: list[str], remote_dir: str, timeout: float) -> Execution:
        asyncssh = _asyncssh()
        command = f"cd {shlex.quote(remote_dir)} && exec {shlex.join(argv)}"
        try:
            done = await self.connection.run(command, check=False)
        except (OSError, asyncssh.Error) as exc:
            raise self._dropped(exc, "the job ran") from None
        except asyncio.CancelledError:
            # Closing the channel does not stop the job (no pty, so no hangup): stop it before the folder goes.
            await self._stop_job(remote_dir)
            raise
        if done.exit_status is None:  # the channel closed without a status: sshd or the link went away
            raise self._dropped(RuntimeError("no exit status"), "the job ran")
        return Execution(done.exit_status, str(done.stderr or ""))

    async def _stop_job(self, remote_dir: str) -> None:
        try:
            await asyncio.wait_for(self.connection.run(shlex.join(["pkill", "-KILL", "-f", remote_dir]), check=False),
                                   10)
        except (OSError, asyncio.TimeoutError, _asyncssh().Error):
            pass  # the device's own `timeout` still ends it

    async def pull(self, remote_dir: str, names: list[str], job_dir: Path) -> None:
        asyncssh = _asyncssh()
        try:
            async with self.connection.start_sftp_client() as sftp:
                for name in names:
                    partial = Path(job_dir) / f".{name}.partial"
                    try:
                        await sftp.get(f"{remote_dir}/{name}", str(partial))
                    except asyncssh.SFTPNoSuchFile:
                        continue  # run_job says what is missing
                    os.replace(partial, Path(job_dir) / name)
        except (OSError, asyncssh.Error) as exc:
            raise self._dropped(exc, "downloading the result") from None

    async def clean(self, remote_dir: str) -> None:
        asyncssh = _asyncssh()
        try:
            async with self.connection.start_sftp_client() as sftp:
                await sftp.rmtree(remote_dir, ignore_errors=True)
        except (OSError, asyncssh.Error) as exc:
            raise self._dropped(exc, "removing the job folder") from None

    async def close(self) -> None:
        self.connection.close()
        try:
            await asyncio.wait_for(self.connection.wait_closed(), 5)
        except (asyncio.TimeoutError, OSError):
            pass

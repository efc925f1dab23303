"""The device inventory (devices.yaml) and the lock that keeps two runs off one board.

    devices:
      orin-01:
        transport: ssh
        address: 10.0.0.7          # host or host:port
        user: nvidia
        host_key: ssh-ed25519 AAAA...   # pinned; ssh-keyscan prints it, the device's console confirms it
        identity: ~/.ssh/id_ed25519
        python: python3
        target: jetson
        profile: jetson-orin-nano
        power_sensor: tegrastats

`local` (this machine) is always there. Each entry becomes a Transport; the transport modules are imported
only when an entry of theirs is used, so listing devices needs neither asyncssh nor adbutils.
"""

from __future__ import annotations

import asyncio
import difflib
import fcntl
import os
import socket
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_deploy.pipeline.errors import ConfigError, DeviceTimeout
from edge_deploy.pipeline.userfiles import read_yaml, shown

DEFAULT_INVENTORY = Path("devices.yaml")
LOCAL = "local"
POWER_SENSORS = ("auto", "none", "rapl", "hwmon", "tegrastats", "ina3221", "android-battery")


class Device(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    transport: Literal["local", "ssh", "adb", "serial", "labgrid"]
    address: Optional[str] = Field(None, description="ssh: host or host:port")
    user: Optional[str] = None
    # ssh/labgrid: the device's public host key, pinned; for a labgrid pool, one per place name.
    host_key: Union[str, dict[str, str], None] = None
    identity: Optional[Path] = None
    python: Union[str, list[str]] = "python3"
    workdir: str = "/tmp"
    serial: Optional[str] = Field(None, description="adb: the phone's serial (adb devices)")
    benchncnn: Optional[Path] = Field(None, description="adb: an arm64 benchncnn binary to push")
    port: Optional[str] = Field(None, description="serial: e.g. /dev/ttyACM0")
    baud: int = Field(115200, gt=0)
    coordinator: Optional[str] = Field(None, description="labgrid: the coordinator's host:port")
    tags: dict[str, str] = Field(default_factory=dict, description="labgrid: tags the place must carry")
    wait_s: float = Field(300, gt=0, description="labgrid: how long to wait for a busy place")
    service: Optional[str] = Field(None, description="labgrid: the NetworkService to use when a place has several")
    target: Optional[str] = None
    profile: Optional[str] = None
    power_sensor: str = "auto"
    timeout_s: float = Field(900, gt=0)
    attempts: int = Field(3, ge=1, le=10)

    @field_validator("power_sensor")
    @classmethod
    def _known_sensor(cls, value: str) -> str:
        if value not in POWER_SENSORS:
            raise ValueError(f"unknown power sensor '{value}'; known: {', '.join(POWER_SENSORS)}")
        return value

    def python_argv(self) -> list[str]:
        return self.python.split() if isinstance(self.python, str) else list(self.python)

    def where(self) -> str:
        return {"local": "this machine", "ssh": self.address, "adb": self.serial or "the only adb device",
                "serial": self.port, "labgrid": f"{self.coordinator} tags {self.tags}"}[self.transport] or "?"


REQUIRED = {"ssh": ("address", "host_key"), "serial": ("port",), "labgrid": ("coordinator", "tags", "host_key"),
            "adb": ("benchncnn",), "local": ()}


class Inventory:
    def __init__(self, devices: dict[str, Device], source: str):
        self.devices, self.source = {LOCAL: Device(transport="local"), **devices}, source

    @classmethod
    def load(cls, path: Path | None = None) -> "Inventory":
        explicit = path is not None or bool(os.environ.get("DEPLOY_DEVICES"))
        path = Path(path or os.environ.get("DEPLOY_DEVICES") or DEFAULT_INVENTORY)
        if not path.exists():
            if explicit:
                raise ConfigError(f"device inventory {shown(path)} not found")
            return cls({}, "no devices.yaml (only `local`)")
        raw = read_yaml(path, "device inventory")
        unknown = set(raw) - {"devices"}
        if unknown:
            raise ConfigError(f"{shown(path)}: unknown key '{sorted(unknown)[0]}' (the file holds `devices:`)")
        entries = raw.get("devices") or {}
        if not isinstance(entries, dict):
            raise ConfigError(f"{shown(path)}: `devices` must map names to entries")
        devices = {}
        for name, entry in entries.items():
            name = str(name)
            if name == LOCAL:
                raise ConfigError(f"{shown(path)}: '{LOCAL}' is this machine and cannot be redefined")
            devices[name] = _validate(name, entry, path)
        return cls(devices, shown(path))

    def get(self, name: str) -> Device:
        if name not in self.devices:
            close = difflib.get_close_matches(name, list(self.devices), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown device '{name}'{hint}; {self.source} lists: {', '.join(sorted(self.devices))}")
        return self.devices[name]

    def transport(self, name: str):
        return make_transport(name, self.get(name))


def _validate(name: str, entry, path: Path) -> Device:
    if not isinstance(entry, dict):
        raise ConfigError(f"{shown(path)}: device {name} must be a mapping of settings")
    try:
        device = Device.model_validate(entry)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(where, list(Device.model_fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{shown(path)}: device {name}: unknown key '{where}'{hint}") from None
        raise ConfigError(f"{shown(path)}: device {name}: {where}: {error['msg'].removeprefix('Value error, ')}") \
            from None
    missing = [key for key in REQUIRED[device.transport] if not getattr(device, key)]
    if missing:
        raise ConfigError(f"{shown(path)}: device {name}: a {device.transport} device needs {', '.join(missing)}")
    return device


def split_address(address: str, default_port: int = 22) -> tuple[str, int]:
    host, _, port = address.rpartition(":") if address.count(":") == 1 else (address, "", "")
    if not host:
        host, port = address, ""
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ConfigError(f"address '{address}': the port must be a number") from None


def make_transport(name: str, device: Device):
    """The Transport an entry describes; its module is imported here, on first use."""
    if device.transport == "local":
        from edge_deploy.targets.transports.local import LocalTransport

        transport = LocalTransport(name)
    elif device.transport == "ssh":
        from edge_deploy.targets.transports.ssh import SshTransport

        host, port = split_address(device.address)
        if isinstance(device.host_key, dict):
            raise ConfigError(f"device {name}: an ssh device pins one host_key (a mapping is for labgrid pools)")
        transport = SshTransport(name, host, port, device.user, device.host_key, device.identity,
                                 device.python_argv(), device.workdir)
    elif device.transport == "labgrid":
        from edge_deploy.targets.transports.labgrid import LabgridTransport

        transport = LabgridTransport(name, device.coordinator, device.tags, host_key=device.host_key,
                                     user=device.user, identity=device.identity, python=device.python_argv(),
                                     workdir=device.workdir, wait_s=device.wait_s, service=device.service)
    elif device.transport == "adb":
        from edge_deploy.targets.transports.adb import AdbTransport

        transport = AdbTransport(name, serial=device.serial, benchncnn=device.benchncnn,
                                 power_sensor=device.power_sensor)
    else:
        from edge_deploy.targets.transports.serial import SerialTransport

        transport = SerialTransport(name, device.port, device.baud)
    transport.attempts = device.attempts
    return transport


def lock_file(home: Path, name: str) -> Path:
    """`local` is whichever machine runs the job: its lock is named for the host, so nodes of a cluster sharing one
    DEPLOY_HOME each time their own jobs one at a time instead of all taking turns on one file."""
    stem = f"{LOCAL}-{socket.gethostname()}" if name == LOCAL else name
    return Path(home) / "locks" / f"{stem}.lock"


@asynccontextmanager
async def device_lock(home: Path, name: str, wait_s: float, on_wait=None):
    """Holds the device for one run. An flock on a file under home/locks: released by the kernel if the holder
    dies, so a crashed run never leaves a board locked. Polled, so other devices' jobs go on while one waits."""
    path = lock_file(home, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DeviceTimeout(f"{name}: still in use by another run ({_holder(handle)}) after "
                                        f"{wait_s:.0f} s") from None
                if not told and on_wait is not None:
                    on_wait(f"waiting for {name}: in use by {_holder(handle)}")
                    told = True
                await asyncio.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing drops the flock


def _holder(handle) -> str:
    try:
        handle.seek(0)
        lines = handle.read().split()
        return " ".join(lines[-2:]) if lines else "another process"
    except OSError:
        return "another process"


# What `deploy devices` asks a device for when its entry names no target.
DEFAULT_RUNTIMES = ("onnxruntime", "ncnn")
CHECK_TIMEOUT_S = 30


async def check_devices(inventory: Inventory) -> dict[str, dict]:
    """Asks every device, concurrently, which runtime versions it has: proof that it answers and can run jobs."""
    from edge_deploy.pipeline.errors import DeployError
    from edge_deploy.targets import load_target

    async def one(name: str, device: Device) -> dict:
        try:
            packages = load_target(device.target).runtime_packages if device.target else DEFAULT_RUNTIMES
            transport = make_transport(name, device)
            facts = await asyncio.wait_for(transport.adescribe(tuple(packages)), CHECK_TIMEOUT_S)
        except asyncio.TimeoutError:
            return {"ok": False, "summary": f"no answer within {CHECK_TIMEOUT_S} s"}
        except DeployError as exc:
            return {"ok": False, "summary": str(exc)}
        versions = facts.get("packages", {})
        summary = ", ".join(f"{k} {v}" for k, v in versions.items()) or "answers"
        return {"ok": True, "summary": f"ok: {summary}", "facts": facts}

    names = list(inventory.devices)
    states = await asyncio.gather(*(one(n, inventory.devices[n]) for n in names))
    return dict(zip(names, states))

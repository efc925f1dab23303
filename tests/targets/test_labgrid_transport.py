"""The labgrid transport against a real labgrid-coordinator and labgrid-exporter on 127.0.0.1.

The lab is set up, and inspected afterwards, with labgrid's own client (a separate connection, and for "someone
else" a separate user), so what these tests see is the coordinator's state, not the transport's idea of it.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import re
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_deploy.pipeline.errors import ConfigError, DeviceError, DeviceTimeout, ToolchainMissing

pytest.importorskip("labgrid", reason="labgrid is not installed (pip install 'edge-deploy[lab]')")
asyncssh = pytest.importorskip("asyncssh", reason="asyncssh is not installed (pip install 'edge-deploy[lab]')")

from edge_deploy.targets.transports import labgrid as lab_transport  # noqa: E402
from edge_deploy.targets.transports.labgrid import LabgridTransport  # noqa: E402
from tests import sshd as sshd_helper  # noqa: E402

BIN = Path(sys.executable).parent
EXPORTER = "bench"
PLACES = {
    # name: (tags, the exporter resource it matches)
    "rpi-1": ({"board": "rpi5", "lab": "ci"}, f"{EXPORTER}/rpi/NetworkService"),
    "orin-1": ({"board": "orin"}, f"{EXPORTER}/orin/NetworkService"),
    # Matches an exporter that never connects: the place exists, its board does not answer.
    "ghost-1": ({"board": "ghost"}, "gone/*/NetworkService"),
}


def started(process: subprocess.Popen, log: Path, pattern: str, what: str, timeout: float = 30) -> re.Match:
    """Waits for a line the labgrid tool prints (flushed) once it serves; its log file, not a pipe, so a chatty
    process can never block on a full pipe."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start: {log.read_text(errors='replace')[-800:]}")


@dataclass
class Lab:
    root: Path
    address: str = ""
    processes: list[subprocess.Popen] = field(default_factory=list)
    startup_s: dict[str, float] = field(default_factory=dict)

    def start_coordinator(self) -> None:
        t = time.perf_counter()
        log = self.root / "coordinator.log"
        # Port 0: the coordinator prints the port it bound, so no free-port guess can race another test run.
        process = self.spawn([str(BIN / "labgrid-coordinator"), "-l", "127.0.0.1:0"], log)
        port = started(process, log, r"listening on 127\.0\.0\.1:(\d+)", "coordinator")[1]
        self.address = f"127.0.0.1:{port}"
        self.startup_s["coordinator"] = time.perf_counter() - t

    def start_exporter(self, name: str, services: dict[str, dict]) -> None:
        """An exporter announcing one NetworkService per group: {group: {address, port, username}}."""
        t = time.perf_counter()
        config = self.root / f"{name}.yaml"
        config.write_text(json.dumps({group: {"NetworkService": service} for group, service in services.items()}))
        log = self.root / f"{name}.log"
        process = self.spawn([str(BIN / "labgrid-exporter"), "-c", self.address, "-n", name,
                              "--hostname", "127.0.0.1", str(config)], log)
        started(process, log, "Exporter ready", f"exporter {name}")
        self.startup_s[f"exporter {name}"] = time.perf_counter() - t

    def spawn(self, argv: list[str], log: Path) -> subprocess.Popen:
        # The coordinator saves places.yaml into its working directory: the lab's own folder, never the repository.
        with open(log, "wb") as out:
            process = subprocess.Popen(argv, cwd=self.root, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):  # exporters before the coordinator they report to
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # ---- labgrid's own client: set-up and inspection ----

    @asynccontextmanager
    async def client(self, user: str | None = None):
        labgrid = lab_transport._labgrid()

        class Client(labgrid.client.ClientSession):
            def getuser(self):
                return user or super().getuser()

        session = Client(self.address, asyncio.get_running_loop())
        await session.start()
        try:
            yield session, labgrid.pb
        finally:
            await session.stop()
            await session.close()

    async def add_place(self, name: str, tags: dict[str, str], match: str) -> None:
        async with self.client() as (session, pb):
            await session.stub.AddPlace(pb.AddPlaceRequest(name=name))
            await session.stub.AddPlaceMatch(pb.AddPlaceMatchRequest(placename=name, pattern=match))
            await session.stub.SetPlaceTags(pb.SetPlaceTagsRequest(placename=name, tags=tags))

    async def acquire_as(self, user: str, place: str) -> None:
        async with self.client(user) as (session, pb):
            await session.stub.AcquirePlace(pb.AcquirePlaceRequest(placename=place))

    async def release(self, place: str) -> None:
        async with self.client() as (session, pb):
            await session.stub.ReleasePlace(pb.ReleasePlaceRequest(placename=place))

    async def holder(self, place: str) -> str | None:
        async with self.client() as (session, _):
            return session.places[place].acquired

    async def reservations(self) -> list[str]:
        async with self.client() as (session, pb):
            answer = await session.stub.GetReservations(pb.GetReservationsRequest())
            return [r.token for r in answer.reservations]

    def state(self, place: str) -> tuple[str | None, list[str]]:
        """Who holds the place, and which reservations the coordinator keeps: (None, []) once we let go."""
        return asyncio.run(self.holder(place)), asyncio.run(self.reservations())


@pytest.fixture(scope="module")
def unused_port() -> int:
    """A port where nothing listens: the address the test boards' NetworkServices give out."""
    return sshd_helper.free_port()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, unused_port):
    lab = Lab(tmp_path_factory.mktemp("labgrid"))
    try:
        lab.start_coordinator()
        lab.start_exporter(EXPORTER, {
            "rpi": {"address": "127.0.0.1", "port": unused_port, "username": "pi"},
            "orin": {"address": "127.0.0.1", "port": unused_port, "username": "nvidia"}})

        async def places():
            for name, (tags, match) in PLACES.items():
                await lab.add_place(name, tags, match)

        asyncio.run(places())
        print("labgrid start-up: " + ", ".join(f"{k} {v:.2f} s" for k, v in lab.startup_s.items()))
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="module")
def host_key() -> str:
    """Any well-formed key: these tests stop before SSH checks it against a board."""
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def board(lab: Lab, host_key: str, **overrides) -> LabgridTransport:
    settings = {"name": "lab-board", "coordinator": lab.address, "tags": {"board": "rpi5"}, "host_key": host_key,
                "wait_s": 5}
    settings.update(overrides)
    return LabgridTransport(**settings)


def test_a_place_is_found_by_its_tags_lent_with_its_exported_address_and_given_back(lab, host_key, unused_port):
    transport = board(lab, host_key, tags={"lab": "ci"})

    async def scenario():
        async with transport.hold() as lease:
            during = await lab.holder("rpi-1"), len(await lab.reservations())
        return lease, during

    lease, (holder_during, reservations_during) = asyncio.run(scenario())
    assert (lease.place, lease.host, lease.port, lease.user) == ("rpi-1", "127.0.0.1", unused_port, "pi")
    assert holder_during is not None and holder_during.endswith("/" + getpass.getuser())
    assert reservations_during == 1
    assert lab.state("rpi-1") == (None, [])


def test_devices_of_one_lab_are_taken_at_once_from_one_process(lab, host_key):
    # What `deploy bench --device a --device b` does: both transports talk to the coordinator from one event loop,
    # here one while the other is still connected, waiting for its board.
    async def both():
        await lab.acquire_as("alice", "orin-1")
        waiting = asyncio.create_task(_lease_and_release(board(lab, host_key, tags={"board": "orin"}, wait_s=30)))
        await asyncio.sleep(0.5)
        first = await _lease_and_release(board(lab, host_key))
        await lab.release("orin-1")
        return first.place, (await asyncio.wait_for(waiting, 10)).place

    assert asyncio.run(both()) == ("rpi-1", "orin-1")
    assert lab.state("rpi-1") == (None, []) and lab.state("orin-1") == (None, [])


def test_the_inventory_user_wins_over_the_labs_username(lab, host_key):
    lease = asyncio.run(_lease_and_release(board(lab, host_key, user="ci-runner")))
    assert lease.user == "ci-runner"


async def _lease_and_release(transport: LabgridTransport):
    async with transport.hold() as lease:
        return lease


def test_a_failing_job_still_gives_the_place_back(lab, host_key):
    async def scenario():
        async with board(lab, host_key).hold():
            raise RuntimeError("the job failed")

    with pytest.raises(RuntimeError, match="the job failed"):
        asyncio.run(scenario())
    assert lab.state("rpi-1") == (None, [])


def test_tags_no_place_has_are_one_line_naming_the_places_there(lab, host_key):
    with pytest.raises(ConfigError) as info:
        asyncio.run(board(lab, host_key, tags={"board": "jetson-thor"}).acquire())
    message = str(info.value)
    assert "\n" not in message
    assert f"no place on labgrid coordinator {lab.address} has tags board=jetson-thor" in message
    assert "rpi-1 [board=rpi5 lab=ci]" in message and "orin-1 [board=orin]" in message
    assert asyncio.run(lab.reservations()) == []


def test_a_busy_place_is_waited_for_and_the_timeout_names_who_holds_it(lab, host_key):
    asyncio.run(lab.acquire_as("alice", "orin-1"))
    try:
        started_at = time.monotonic()
        with pytest.raises(DeviceTimeout) as info:
            asyncio.run(board(lab, host_key, tags={"board": "orin"}, wait_s=1).acquire())
        waited = time.monotonic() - started_at
        message = str(info.value)
        assert "\n" not in message and re.search(r"came free within 1 s \(orin-1 acquired by [^ ]+/alice\)", message)
        assert 1 <= waited < 5
        holder, reservations = lab.state("orin-1")
        assert holder.endswith("/alice")  # alice keeps her board
        assert reservations == []  # and ours is withdrawn, or it would take the place the moment she lets go
    finally:
        asyncio.run(lab.release("orin-1"))


def test_a_place_freed_while_waiting_is_taken_and_a_cancelled_wait_leaves_no_reservation(lab, host_key):
    transport = board(lab, host_key, tags={"board": "orin"}, wait_s=30)

    async def freed_while_waiting():
        await lab.acquire_as("alice", "orin-1")
        waiting = asyncio.create_task(_lease_and_release(transport))
        await asyncio.sleep(0.7)
        assert not waiting.done()
        await lab.release("orin-1")
        return await asyncio.wait_for(waiting, 10)

    assert asyncio.run(freed_while_waiting()).place == "orin-1"
    assert lab.state("orin-1") == (None, [])

    async def cancelled_wait():
        await lab.acquire_as("alice", "orin-1")
        waiting = asyncio.create_task(transport.acquire())
        await asyncio.sleep(0.7)
        queued = len(await lab.reservations())
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return queued

    try:
        assert asyncio.run(cancelled_wait()) == 1
        assert asyncio.run(lab.reservations()) == []
    finally:
        asyncio.run(lab.release("orin-1"))


def test_a_place_whose_exporter_is_absent_is_a_clear_error_and_is_given_back(lab, host_key):
    with pytest.raises(DeviceError, match="place ghost-1 has no NetworkService resource") as info:
        asyncio.run(board(lab, host_key, tags={"board": "ghost"}).acquire())
    assert "\n" not in str(info.value)
    assert lab.state("ghost-1") == (None, [])


def test_an_unreachable_coordinator_is_one_line_at_once(host_key):
    address = f"127.0.0.1:{sshd_helper.free_port()}"
    transport = LabgridTransport("lab-board", address, {"board": "rpi5"}, host_key=host_key, connect_timeout_s=20)
    started_at = time.monotonic()
    with pytest.raises(DeviceError, match=f"cannot reach labgrid coordinator {re.escape(address)}") as info:
        asyncio.run(transport.acquire())
    assert "\n" not in str(info.value)
    assert time.monotonic() - started_at < 5  # refused is known at once; the timeout is for silent hosts


def test_keys_pinned_per_place_must_cover_a_place_with_the_tags(lab, host_key):
    transport = board(lab, host_key={"orin-1": host_key})
    with pytest.raises(ConfigError, match="host_key pins keys for orin-1, but the places with tags board=rpi5 "
                                          "are rpi-1"):
        asyncio.run(transport.acquire())
    assert asyncio.run(lab.reservations()) == []


def test_the_inventory_entry_is_checked_before_any_place_is_taken(host_key):
    good = {"name": "lab-board", "coordinator": "lab.example:20408", "tags": {"board": "rpi5"}, "host_key": host_key}
    assert LabgridTransport(**{**good, "coordinator": "lab.example"}).coordinator == "lab.example:20408"
    for bad, message in [({"coordinator": "lab.example:port"}, "is not host:port"),
                         ({"tags": {}}, "needs tags"),
                         ({"host_key": ""}, "needs host_key"),
                         ({"host_key": "ssh-ed25519 not-a-key"}, "not an SSH public key"),
                         ({"host_key": {"rpi-1": "nonsense"}}, r"lab-board \(rpi-1\): host_key is not")]:
        with pytest.raises(ConfigError, match=message):
            LabgridTransport(**{**good, **bad})


def test_without_labgrid_the_error_names_the_extra_to_install(monkeypatch, host_key):
    monkeypatch.setitem(sys.modules, "labgrid", None)  # as if not installed
    with pytest.raises(ToolchainMissing, match=re.escape("pip install 'edge-deploy[lab]'")):
        LabgridTransport("lab-board", "lab.example:20408", {"board": "rpi5"}, host_key=host_key)


def test_labgrid_is_imported_only_when_used_and_leaves_the_excepthook_alone():
    script = ("import sys\n"
              "from edge_deploy.targets.transports import labgrid\n"
              "assert 'labgrid' not in sys.modules, 'imported with the module'\n"
              "hook = sys.excepthook\n"
              "labgrid._labgrid()\n"
              "assert 'labgrid.remote.client' in sys.modules\n"
              "assert sys.excepthook is hook, 'excepthook replaced'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_board_that_does_not_answer_ssh_is_given_back(lab, host_key):
    # rpi-1's NetworkService points where nothing listens: our SSH fails after the place was acquired.
    with pytest.raises(DeviceError, match=r"lab-board \(rpi-1\): cannot connect to pi@127\.0\.0\.1"):
        asyncio.run(board(lab, host_key).open())
    assert lab.state("rpi-1") == (None, [])


# ---- a whole job: labgrid lends the place, our SSH (its key pinned by us) runs it ----

@pytest.fixture(scope="module")
def sshd_place(lab, tmp_path_factory):
    if sshd_helper.unavailable():
        pytest.skip(sshd_helper.unavailable())
    server = sshd_helper.Sshd.prepare(tmp_path_factory.mktemp("sshd")).start()
    try:
        lab.start_exporter("sshd-exporter", {"pi": {"address": "127.0.0.1", "port": server.port,
                                                    "username": server.user}})
        asyncio.run(lab.add_place("pi-ssh", {"board": "pi_ssh"}, "sshd-exporter/pi/NetworkService"))
        yield server
    finally:
        server.kill()


def sshd_board(lab, server, tmp_path, **overrides) -> LabgridTransport:
    workdir = tmp_path / "device"
    workdir.mkdir(exist_ok=True)
    settings = {"name": "lab-pi", "coordinator": lab.address, "tags": {"board": "pi_ssh"},
                "host_key": server.host_key, "identity": server.client_key, "python": [sys.executable],
                "workdir": str(workdir), "wait_s": 5}
    settings.update(overrides)
    return LabgridTransport(**settings)


def test_a_job_runs_on_the_lent_board_over_our_pinned_key_ssh(lab, sshd_place, tmp_path):
    from tests.targets.test_transports import RESULT, job_dir, runner

    script = runner(tmp_path, f"import measure\nmeasure.write_result(job, {json.dumps(RESULT)})\n")
    transport = sshd_board(lab, sshd_place, tmp_path)
    result = transport.run(job_dir(tmp_path), script, ("numpy",))
    assert result.runtime == "fakert 1.0"
    described = result.device["transport"]
    assert (described["transport"], described["place"], described["tags"]) == ("labgrid", "pi-ssh",
                                                                                {"board": "pi_ssh"})
    assert described["host_key"].startswith("SHA256:") and described["packages"]["numpy"] != "not installed"
    assert lab.state("pi-ssh") == (None, [])
    assert list((tmp_path / "device").iterdir()) == []


def test_a_board_with_another_host_key_than_ours_is_refused_and_given_back(lab, sshd_place, tmp_path):
    from tests.targets.test_transports import job_dir, runner

    other = sshd_helper.keygen(tmp_path / "another_host_key")
    transport = sshd_board(lab, sshd_place, tmp_path, host_key={"pi-ssh": other})
    with pytest.raises(DeviceError, match="not the one pinned in the inventory"):
        transport.run(job_dir(tmp_path), runner(tmp_path, "pass\n"))
    assert lab.state("pi-ssh") == (None, [])
    assert list((tmp_path / "device").iterdir()) == []

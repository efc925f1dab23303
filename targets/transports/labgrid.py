"""A board from a labgrid lab, reached over our own pinned-key SSH: the `labgrid` transport.

labgrid (PyPI `labgrid`, 24 and later: a gRPC `labgrid-coordinator`) lends out *places*: named sets of
resources that exporters next to the boards announce. For each job this transport reserves a place whose tags
match the inventory entry, acquires it, reads the address of its NetworkService resource, runs the job with
edge_deploy's SshTransport and releases the place. The host key is the one pinned in our inventory; labgrid
knows none, and its own SSHDriver connects with StrictHostKeyChecking=no, so a board swapped or reinstalled
behind a place would go unnoticed: it is never used here.

Why it is done this way:
- A reservation (filter = our tags) before the acquire: the coordinator's scheduler picks among the matching
  free places and queues waiters in order. Acquiring a place by name could only race other clients, not wait.
- The coordinator holds a place for a user (host/user), not for a connection: a client that dies keeps it.
  So every way out of a job (success, failure, cancel) releases it, and a place that could not be released is
  named in a warning with the labgrid-client command that frees it.
- labgrid's ClientSession is driven in our own event loop (no CLI to parse, no RemotePlace/Environment, whose
  manager is process-wide), each on a connection of its own. Of what its import changes for the whole process,
  sys.excepthook is undone; a log level name it registers is harmless.
- Releases ask the coordinator to release only what *we* hold (fromuser), so a cleanup never kicks someone
  else's session; a fresh connection is used, so a coordinator restarted during a long job does not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
import time
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NamedTuple
from urllib.parse import urlsplit

from edge_deploy.pipeline.errors import ConfigError, DeviceError, DeviceTimeout, ToolchainMissing
from edge_deploy.targets.transports import Execution, Session, Transport

INSTALL_HINT = "pip install 'edge-deploy[lab]'"
# labgrid-coordinator's own default.
DEFAULT_PORT = 20408
CONNECT_TIMEOUT_S = 10.0
RPC_TIMEOUT_S = 10.0
# How long a job waits for a busy place before giving up; a lab's boards are shared, so minutes are normal.
DEFAULT_WAIT_S = 300.0
# The coordinator allocates a freed place at once; this only bounds how late we notice. Each poll also keeps the
# reservation alive (it expires 60 s after the last one).
POLL_S = 0.5


class _Labgrid(NamedTuple):
    client: ModuleType  # ClientSession: one connection to a coordinator, run in our event loop
    common: ModuleType  # Reservation, ReservationState
    pb: ModuleType  # the coordinator's protocol messages
    pb_grpc: ModuleType  # its stub
    grpc: ModuleType


def _labgrid() -> _Labgrid:
    """labgrid's client side, imported on first use (half a second, and nothing a local run needs)."""
    hook = sys.excepthook
    try:
        import grpc
        from labgrid.remote import client, common
        from labgrid.remote.generated import labgrid_coordinator_pb2, labgrid_coordinator_pb2_grpc
    except ImportError:
        raise ToolchainMissing(f"labgrid devices need the labgrid client: {INSTALL_HINT}") from None
    finally:
        # labgrid.remote.client swaps the process's excepthook at import, for its own CLI's sake.
        sys.excepthook = hook
    return _Labgrid(client, common, labgrid_coordinator_pb2, labgrid_coordinator_pb2_grpc, grpc)


def coordinator_address(value: str, device: str) -> str:
    """host:port as grpc takes it; labgrid's default port when none is given."""
    text = str(value or "").strip()
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError:
        port, parts = None, None
    if parts is None or not parts.hostname or parts.path or parts.query or parts.username:
        raise ConfigError(f"device {device}: coordinator '{value}' is not host:port (e.g. lab.example:20408)")
    return text if port is not None else f"{text}:{DEFAULT_PORT}"


@dataclass(frozen=True)
class Lease:
    """A place we hold, and where its NetworkService says the board answers."""

    place: str
    host: str
    port: int
    user: str  # the inventory's user if it names one, else the NetworkService's username
    token: str  # our reservation; cancelled with the release so the place is free for others at once


class LabgridTransport(Transport):
    kind = "labgrid"

    def __init__(self, name: str, coordinator: str, tags: dict[str, str], host_key: str | dict[str, str] = "",
                 user: str | None = None, identity: Path | None = None, python: list[str] | None = None,
                 workdir: str = "/tmp", wait_s: float = DEFAULT_WAIT_S, service: str | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.name = name
        if importlib.util.find_spec("labgrid") is None:
            raise ToolchainMissing(f"device {name}: labgrid devices need the labgrid client: {INSTALL_HINT}")
        self.coordinator = coordinator_address(coordinator, name)
        if not isinstance(tags, dict) or not tags:
            # An empty filter matches every place: a job would land on whatever board is free.
            raise ConfigError(f"device {name}: a labgrid device needs tags that pick its places (e.g. board: rpi5)")
        self.tags = {str(k): str(v) for k, v in tags.items()}
        if not host_key:
            raise ConfigError(f"device {name}: a labgrid device needs host_key: the boards' SSH public key, or a "
                              "mapping of place name to key (labgrid does not vouch for a board's key)")
        self.host_keys = host_key
        self.user, self.identity = user, Path(identity).expanduser() if identity else None
        self.python_argv, self.workdir = list(python or ["python3"]), workdir
        self.wait_s, self.service, self.connect_timeout_s = float(wait_s), service, float(connect_timeout_s)
        self.last_place: str | None = None
        self._facts: dict[tuple[str, tuple[str, ...]], dict] = {}
        # The SSH transport's constructor is what checks a key and the identity file; running it now turns an
        # inventory mistake into a ConfigError before any place is taken.
        pinned = {None: host_key} if isinstance(host_key, str) else dict(host_key)
        for place, key in pinned.items():
            self._ssh_to("unallocated", 22, user or "", key, place)

    def python(self) -> list[str]:
        return self.python_argv

    # ---- the job protocol ----

    async def open(self) -> Session:
        lease = await self.acquire()
        try:
            inner = await self._ssh(lease).open()
        except BaseException:
            await self.release(lease)
            raise
        self.last_place = lease.place
        return LabgridSession(self, lease, inner)

    def describe(self, packages: tuple[str, ...]) -> dict:
        return asyncio.run(self.adescribe(packages))

    async def adescribe(self, packages: tuple[str, ...]) -> dict:
        """What the board of the last job says of itself; asking takes that place again, briefly.

        run_job asks after the job's session has released the place, so the answer is remembered per place:
        pinning the same place (labgrid's `name` tag) keeps a report from describing a different board of the
        pool than the one that ran the job.
        """
        packages = tuple(packages)
        if (self.last_place, packages) not in self._facts:
            async with self.hold(self.last_place) as lease:
                facts = await self._ssh(lease).adescribe(packages)
            self.last_place = lease.place
            self._facts[(lease.place, packages)] = {
                **facts, "transport": self.kind, "coordinator": self.coordinator, "tags": dict(self.tags),
                "place": lease.place}
        return self._facts[(self.last_place, packages)]

    # ---- places ----

    @asynccontextmanager
    async def hold(self, place: str | None = None):
        """A place with our tags (or that very place) for the length of the block; released however it ends."""
        lease = await self.acquire(place)
        try:
            yield lease
        finally:
            await self.release(lease)

    async def acquire(self, place: str | None = None) -> Lease:
        """Reserves a place with our tags, waits up to wait_s for it, acquires it and reads its address."""
        pb = _labgrid().pb
        wanted = {**self.tags, **({"name": place} if place else {})}
        async with self._connected(subscribe=True) as client:
            candidates = _matching(client.places, wanted)
            if not candidates:
                raise ConfigError(f"{self.label}: no place on labgrid coordinator {self.coordinator} has tags "
                                  f"{_tags(wanted)} (places there: {_inventory(client.places)})")
            self._check_keys_cover(candidates)
            token = await self._reserve(client, wanted)
            allocated = None
            try:
                allocated = await self._wait_for_allocation(client, token, wanted, candidates)
                await self._call(client.stub.AcquirePlace(pb.AcquirePlaceRequest(placename=allocated),
                                                          timeout=RPC_TIMEOUT_S), f"acquiring place {allocated}")
                # The place's acquired resources reach us as an update; the sync makes sure it has arrived.
                try:
                    synced = await asyncio.wait_for(client.sync_with_coordinator(), RPC_TIMEOUT_S)
                except asyncio.TimeoutError:
                    synced = False
                if not synced:
                    raise DeviceError(f"{self.label}: lost labgrid coordinator {self.coordinator} while acquiring "
                                      f"place {allocated}")
                return self._lease(client, allocated, token)
            except BaseException:
                # The acquire may have reached the coordinator even when its answer did not reach us.
                failure = await self._give_back(client, allocated, token)
                if failure:
                    self._warn_still_held(allocated, failure)
                raise

    async def release(self, lease: Lease) -> None:
        """Gives the place back and drops the reservation; a failure is a warning, never a lost result."""
        try:
            async with self._connected(subscribe=False) as client:
                failure = await self._give_back(client, lease.place, lease.token)
        except (DeviceError, asyncio.TimeoutError, OSError) as exc:
            failure = str(exc) or type(exc).__name__
        if failure:
            self._warn_still_held(lease.place, failure)

    # ---- the coordinator ----

    @asynccontextmanager
    async def _connected(self, subscribe: bool):
        labgrid = _labgrid()
        client = labgrid.client.ClientSession(self.coordinator, asyncio.get_running_loop())
        # grpc shares one TCP connection among a process's channels to the same address, and the coordinator keys
        # a client by its connection (it refuses a second session on one, and acquires in the name of the
        # connection's session): jobs on several labgrid devices at once each need a connection of their own.
        await client.channel.close()
        client.channel = labgrid.grpc.aio.insecure_channel(self.coordinator,
                                                           options=[("grpc.use_local_subchannel_pool", 1)])
        client.stub = labgrid.pb_grpc.CoordinatorStub(client.channel)
        started = False
        try:
            await self._reach(client.channel, labgrid.grpc)
            if subscribe:
                # The place and resource lists arrive before the answer to start()'s sync, so they are complete
                # when it returns.
                started = True
                try:
                    await asyncio.wait_for(client.start(), RPC_TIMEOUT_S)
                except asyncio.TimeoutError:
                    raise DeviceError(f"{self.label}: labgrid coordinator {self.coordinator} accepted the "
                                      f"connection but sent no place list within {RPC_TIMEOUT_S:.0f} s") from None
                except labgrid.client.Error:
                    raise DeviceError(f"{self.label}: labgrid coordinator {self.coordinator} closed the session "
                                      "(is it labgrid 24 or later?)") from None
            yield client
        finally:
            if started:
                # Stopping a session whose stream already broke can trip labgrid's internal assertions; closing
                # the channel below is what frees the connection either way.
                with contextlib.suppress(Exception):
                    await client.stop()
            await client.close()

    async def _reach(self, channel, grpc) -> None:
        """Fails at once when nothing listens, and after connect_timeout_s when nothing answers at all."""
        connectivity = grpc.ChannelConnectivity

        async def ready() -> bool:
            state = channel.get_state(try_to_connect=True)
            while state is not connectivity.READY:
                if state in (connectivity.TRANSIENT_FAILURE, connectivity.SHUTDOWN):
                    return False
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
            return True

        try:
            reached = await asyncio.wait_for(ready(), self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise DeviceError(f"{self.label}: labgrid coordinator {self.coordinator} did not answer within "
                              f"{self.connect_timeout_s:.0f} s") from None
        if not reached:
            raise DeviceError(f"{self.label}: cannot reach labgrid coordinator {self.coordinator} (is "
                              "labgrid-coordinator running there, and is the address right?)")

    async def _call(self, pending, doing: str, invalid_is_ours: bool = False):
        grpc = _labgrid().grpc
        try:
            return await pending
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeviceError(f"{self.label}: labgrid coordinator {self.coordinator} did not answer "
                                  f"{doing} within {RPC_TIMEOUT_S:.0f} s") from None
            if invalid_is_ours and exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                raise ConfigError(f"{self.label}: labgrid coordinator {self.coordinator} refused {doing}: "
                                  f"{exc.details()}") from None
            raise DeviceError(f"{self.label}: labgrid coordinator {self.coordinator} refused {doing}: "
                              f"{exc.details() or exc.code().name}") from None

    async def _reserve(self, client, wanted: dict[str, str]) -> str:
        pb = _labgrid().pb
        request = pb.CreateReservationRequest(filters={"main": pb.Reservation.Filter(filter=wanted)})
        # The coordinator holds tag syntax (its TAG_KEY/TAG_VAL); a tag it refuses is the inventory's to fix.
        response = await self._call(client.stub.CreateReservation(request, timeout=RPC_TIMEOUT_S),
                                    f"a reservation for tags {_tags(wanted)}", invalid_is_ours=True)
        return response.reservation.token

    async def _wait_for_allocation(self, client, token: str, wanted: dict[str, str], candidates: dict) -> str:
        labgrid = _labgrid()
        common, pb = labgrid.common, labgrid.pb
        states = common.ReservationState
        deadline = time.monotonic() + self.wait_s
        while True:
            response = await self._call(client.stub.PollReservation(pb.PollReservationRequest(token=token),
                                                                    timeout=RPC_TIMEOUT_S), "a reservation poll")
            reservation = common.Reservation.from_pb2(response.reservation)
            if reservation.state in (states.allocated, states.acquired):
                return reservation.allocations["main"][0]
            if reservation.state is not states.waiting:
                raise DeviceError(f"{self.label}: labgrid coordinator {self.coordinator} ended our reservation for "
                                  f"tags {_tags(wanted)} ({reservation.state.name})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceTimeout(f"{self.label}: no place with tags {_tags(wanted)} came free within "
                                    f"{self.wait_s:.0f} s ({self._occupancy(client, candidates)})")
            await asyncio.sleep(min(POLL_S, left))

    def _lease(self, client, place_name: str, token: str) -> Lease:
        place = client.places[place_name]
        services = {}
        for exporter, group, cls, resource_name in place.acquired_resources:
            if cls != "NetworkService":
                continue
            match = place.getmatch((exporter, group, cls, resource_name))
            shown = (match.rename if match is not None and match.rename else resource_name)
            services[shown] = (f"{exporter}/{group}/{resource_name}",
                               client.resources.get(exporter, {}).get(group, {}).get(resource_name))
        if not services:
            raise DeviceError(f"{self.label}: place {place_name} has no NetworkService resource (is its exporter "
                              "running, and does the place match the board's NetworkService?)")
        if self.service is not None:
            if self.service not in services:
                raise DeviceError(f"{self.label}: place {place_name} has no NetworkService named {self.service} "
                                  f"(it has {', '.join(sorted(services))})")
            path, entry = services[self.service]
        elif len(services) > 1:
            raise DeviceError(f"{self.label}: place {place_name} has several NetworkService resources "
                              f"({', '.join(sorted(services))}); name the board's one with `service`")
        else:
            path, entry = next(iter(services.values()))
        if entry is None:
            raise DeviceError(f"{self.label}: place {place_name}'s NetworkService {path} is gone (its exporter "
                              "disconnected?)")
        if not entry.avail:
            raise DeviceError(f"{self.label}: the exporter reports place {place_name}'s NetworkService {path} as "
                              "unavailable")
        if entry.extra.get("proxy_required"):
            # labgrid's own tools would tunnel through the exporter host; our SSH goes straight to the address.
            raise DeviceError(f"{self.label}: place {place_name}'s NetworkService {path} is reachable only through "
                              f"its exporter {entry.extra.get('proxy') or ''} (isolated exporter or a link-local "
                              "address); edge-deploy connects to the board directly")
        args = entry.args
        try:
            host, port = str(args["address"]), int(args.get("port") or 22)
        except (KeyError, TypeError, ValueError):
            raise DeviceError(f"{self.label}: place {place_name}'s NetworkService {path} names no usable "
                              f"address and port ({args})") from None
        return Lease(place_name, host, port, self.user or str(args.get("username") or ""), token)

    async def _give_back(self, client, place: str | None, token: str) -> str | None:
        """Releases the place if we hold it and drops the reservation; the reason if either failed, else None."""
        labgrid = _labgrid()
        pb, grpc = labgrid.pb, labgrid.grpc
        me = f"{client.gethostname()}/{client.getuser()}"
        failure = None
        if place is not None:
            try:
                # fromuser: a no-op for a place we do not hold, so a cleanup never takes a board from someone.
                await client.stub.ReleasePlace(pb.ReleasePlaceRequest(placename=place, fromuser=me),
                                               timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                failure = exc.details() or exc.code().name
        try:
            await client.stub.CancelReservation(pb.CancelReservationRequest(token=token), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            # Harmless: a reservation nobody polls expires within a minute, and then the place is free again.
            pass
        return failure

    def _warn_still_held(self, place: str | None, reason: str) -> None:
        if place is None:
            return  # only a waiting reservation was left, and it expires by itself within a minute
        warnings.warn(f"{self.label}: could not release labgrid place {place} ({reason}); free it with "
                      f"`labgrid-client -x {self.coordinator} -p {place} release`", stacklevel=3)

    def _occupancy(self, client, candidates: dict) -> str:
        me = f"{client.gethostname()}/{client.getuser()}"
        said = []
        for name in sorted(candidates):
            place = client.places.get(name, candidates[name])
            if place.acquired:
                holder = f"acquired by {place.acquired}" + (" (this user: a run that died?)"
                                                            if place.acquired == me else "")
            elif place.reservation:
                holder = "reserved for another job"
            else:
                holder = "free"
            said.append(f"{name} {holder}")
        return ", ".join(said)

    # ---- SSH ----

    def _check_keys_cover(self, candidates: dict) -> None:
        if isinstance(self.host_keys, str):
            return
        if not set(candidates) & set(self.host_keys):
            raise ConfigError(f"{self.label}: host_key pins keys for {', '.join(sorted(self.host_keys))}, but the "
                              f"places with tags {_tags(self.tags)} are {', '.join(sorted(candidates))}")

    def _ssh(self, lease: Lease):
        if isinstance(self.host_keys, str):
            key = self.host_keys
        else:
            key = self.host_keys.get(lease.place)
            if not key:
                raise ConfigError(f"{self.label}: labgrid lent place {lease.place}, whose host key the inventory "
                                  f"does not pin (host_key lists {', '.join(sorted(self.host_keys))})")
        return self._ssh_to(lease.host, lease.port, lease.user, key, lease.place)

    def _ssh_to(self, host: str, port: int, user: str, key: str, place: str | None = None):
        from edge_deploy.targets.transports.ssh import SshTransport

        label = f"{self.label} ({place})" if place else self.label
        return SshTransport(label, host, port, user or None, key, self.identity, self.python_argv, self.workdir)


class LabgridSession(Session):
    """The SSH session to the lent board; closing it gives the place back."""

    def __init__(self, transport: LabgridTransport, lease: Lease, inner: Session):
        self.transport, self.lease, self.inner = transport, lease, inner

    async def push(self, job_dir: Path) -> str:
        return await self.inner.push(job_dir)

    async def execute(self, argv: list[str], remote_dir: str, timeout: float) -> Execution:
        return await self.inner.execute(argv, remote_dir, timeout)

    async def pull(self, remote_dir: str, names: list[str], job_dir: Path) -> None:
        await self.inner.pull(remote_dir, names, job_dir)

    async def clean(self, remote_dir: str) -> None:
        await self.inner.clean(remote_dir)

    async def close(self) -> None:
        try:
            await self.inner.close()
        finally:
            await self.transport.release(self.lease)


def _matching(places: dict, wanted: dict[str, str]) -> dict:
    """The places the coordinator's scheduler would consider: their tags, plus `name`, include every wanted one."""
    return {name: place for name, place in places.items()
            if wanted.items() <= {**place.tags, "name": name}.items()}


def _tags(tags: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(tags.items()))


def _inventory(places: dict, shown: int = 8) -> str:
    if not places:
        return "none"
    names = sorted(places)
    listed = [f"{name} [{_tags(places[name].tags)}]" if places[name].tags else name for name in names[:shown]]
    rest = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(listed) + rest

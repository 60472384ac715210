"""Do the machines of a several-box run see each other? Checked before `accelerate launch`, within a stated timeout.

A wrong MAIN_PROCESS_IP, a closed port or a machine that never starts otherwise shows as a silent wait (torch's
rendezvous waits 600 s, NCCL's first collective 10 minutes more). Here machine rank 0 serves a torch.distributed
TCPStore on MAIN_PROCESS_PORT; every other machine connects to MAIN_PROCESS_IP:MAIN_PROCESS_PORT (the store's
client retries until the timeout), says which rank it is, and waits for rank 0's go. Rank 0 closes the store
once all have arrived, freeing the port for accelerate's own rendezvous. A failure is one UserError line naming the
address and port tried and what to check.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

from hvtune.errors import UserError

DEFAULT_TIMEOUT_S = 600  # torch's static rendezvous default: machines start minutes apart (image pulls, caches)
_POLL_S = 0.5
_GO = "hvtune/go"


@dataclass(frozen=True)
class Machines:
    """The several-box settings, accelerate's names: NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT."""

    count: int
    rank: int
    address: str
    port: int
    timeout_s: float = DEFAULT_TIMEOUT_S

    def where(self) -> str:
        return f"{self.address}:{self.port} (MAIN_PROCESS_IP:MAIN_PROCESS_PORT)"


def machine_problem(count: int, rank: int, address: str, port: int) -> str | None:
    """The one line a bad combination gives at start, or None."""
    if count < 1:
        return f"NUM_MACHINES={count} must be 1 or more"
    if not 0 <= rank < count:
        return f"MACHINE_RANK={rank} must be between 0 and {count - 1} (NUM_MACHINES={count}): 0 on the main machine"
    if count > 1 and not address:
        return f"NUM_MACHINES={count} needs MAIN_PROCESS_IP (the address of machine rank 0, reachable from the others)"
    if not 1 <= port <= 65535:
        return f"MAIN_PROCESS_PORT={port} is not a port number (1-65535)"
    return None


def machines_from_environment(flags: dict[str, str] | None = None) -> Machines:
    """Machines from accelerate's variables (and HVTUNE_RENDEZVOUS_TIMEOUT); `flags` (same names) win."""
    import os

    values = {**os.environ, **(flags or {})}

    def number(name: str, default: str, kind: type = int):
        text = (values.get(name) or default).strip()
        try:
            return kind(text)
        except ValueError:
            raise UserError(f"{name}={text} is not a number") from None

    machines = Machines(
        count=number("NUM_MACHINES", "1"),
        rank=number("MACHINE_RANK", "0"),
        address=(values.get("MAIN_PROCESS_IP") or "").strip(),
        port=number("MAIN_PROCESS_PORT", "29500"),
        timeout_s=number("HVTUNE_RENDEZVOUS_TIMEOUT", str(DEFAULT_TIMEOUT_S), float),
    )
    if machines.timeout_s <= 0:
        raise UserError(f"HVTUNE_RENDEZVOUS_TIMEOUT={machines.timeout_s:g} must be a positive number of seconds")
    return machines


def _arrived_key(rank: int) -> str:
    return f"hvtune/arrived/{rank}"


def _serve(m: Machines) -> list[str]:
    """Rank 0: wait for every other rank, then say go. Returns the hosts that arrived, in rank order."""
    from torch.distributed import DistError, TCPStore

    try:
        socket.socket().bind((m.address, 0))
    except OSError:
        print(
            f"notice: MAIN_PROCESS_IP={m.address} is not an address of this machine: right only behind NAT or a port "
            "forward; the other machines must reach this one there",
            file=sys.stderr,
        )
    try:
        store = TCPStore("0.0.0.0", m.port, m.count, True, timedelta(seconds=m.timeout_s), wait_for_workers=False)
    except (DistError, RuntimeError) as e:
        raise UserError(
            f"machine rank 0 cannot listen on port {m.port} (MAIN_PROCESS_PORT): {_first_line(e)}; another run may "
            "hold it: stop it, or set another MAIN_PROCESS_PORT on every machine"
        ) from None
    deadline = time.monotonic() + m.timeout_s
    missing = list(range(1, m.count))
    while missing and time.monotonic() < deadline:
        missing = [r for r in missing if not store.check([_arrived_key(r)])]
        if missing:
            time.sleep(_POLL_S)
    if missing:
        store.set(_GO, "abort")
        ranks = ", ".join(str(r) for r in missing)
        raise UserError(
            f"machine rank 0 waited {m.timeout_s:g} s on port {m.port} (MAIN_PROCESS_PORT) and machine rank(s) "
            f"{ranks} of NUM_MACHINES={m.count} never connected: start them with MAIN_PROCESS_IP set to this "
            f"machine's private address ({m.address} now) and MAIN_PROCESS_PORT={m.port}, and open TCP port {m.port} "
            f"to them (from each: nc -vz {m.address} {m.port}); HVTUNE_RENDEZVOUS_TIMEOUT sets the wait"
        )
    hosts = [socket.gethostname()] + [store.get(_arrived_key(r)).decode() for r in range(1, m.count)]
    store.set(_GO, "go")
    left = [f"hvtune/left/{r}" for r in range(1, m.count)]
    # keep the store up until every machine has read the go, then free the port for accelerate; a machine that
    # left early fails accelerate's own rendezvous, within the same timeout
    with contextlib.suppress(DistError, RuntimeError):
        store.wait(left, timedelta(seconds=min(60.0, m.timeout_s)))
    del store
    return hosts


def _reach(m: Machines, deadline: float) -> None:
    """A plain TCP connect to rank 0, retried until the deadline: a refused or unanswered connect is waited out
    exactly (torch's store client retries past its own timeout, by up to one more timeout)."""
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((m.address, m.port), timeout=max(0.1, min(5.0, left))):
                return
        except OSError as e:
            if time.monotonic() + 1.0 >= deadline:
                raise _unreachable(m, e.strerror or type(e).__name__) from None
            time.sleep(1.0)


def _unreachable(m: Machines, why: str) -> UserError:
    return UserError(
        f"machine rank {m.rank} could not reach machine rank 0 at {m.where()} within {m.timeout_s:g} s ({why}): "
        f"check that machine 0 is started, that MAIN_PROCESS_IP is its private address as this machine sees it, and "
        f"that TCP port {m.port} is open between them (nc -vz {m.address} {m.port}); HVTUNE_RENDEZVOUS_TIMEOUT sets "
        "the wait"
    )


def _join(m: Machines) -> None:
    """Rank > 0: connect to rank 0 (retrying until the timeout), announce this machine, wait for the go."""
    from torch.distributed import DistError, TCPStore

    deadline = time.monotonic() + m.timeout_s
    _reach(m, deadline)
    try:  # something answers there; is it rank 0's store (not a proxy, not another service on that port)?
        left = timedelta(seconds=max(1.0, deadline - time.monotonic()))
        store = TCPStore(m.address, m.port, m.count, False, left)
    except (DistError, RuntimeError) as e:
        raise _unreachable(m, f"something answers there but it is not hvtune's check: {_first_line(e)[:100]}") from None
    if store.add(_arrived_key(m.rank) + "/count", 1) > 1:
        raise UserError(
            f"another machine already joined {m.where()} as MACHINE_RANK={m.rank}: give each machine its own rank, "
            f"0 to {m.count - 1}"
        )
    store.set(_arrived_key(m.rank), socket.gethostname())
    try:
        go = store.get(_GO).decode()
    except (DistError, RuntimeError):
        go = "lost"
    if go != "go":
        raise UserError(
            f"machine rank 0 at {m.where()} stopped waiting before every machine arrived: see its log; start all "
            f"{m.count} machines within HVTUNE_RENDEZVOUS_TIMEOUT ({m.timeout_s:g} s) of each other"
        )
    store.set(f"hvtune/left/{m.rank}", "1")


def check_rendezvous(m: Machines) -> str:
    """Every machine reaches machine rank 0 within m.timeout_s, or one line saying which did not and why."""
    problem = machine_problem(m.count, m.rank, m.address, m.port)
    if problem:
        raise UserError(problem)
    if m.count == 1:
        return "one machine: nothing to check"
    if m.rank == 0:
        hosts = _serve(m)
        return f"all {m.count} machines reached {m.where()}: {', '.join(hosts)}"
    _join(m)
    return f"machine rank {m.rank} reached machine rank 0 at {m.where()}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

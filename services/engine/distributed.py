"""One stage over several processes (hosts): jax.distributed, and process 0 leading the others in lockstep.

    group = process_group(args)           # --coordinator-address/--num-processes/--process-id or env; None: one process
    initialize(group)                     # before any device is touched (server.load_setup does both)
    leader = Leader.open(on_lost=...)     # process 0: serves gRPC, sends every program call to the others
    follow(programs, params)              # every other process: runs each call it is sent, until process 0 goes

A multi-process stage is one SPMD program over every process's devices, and such a program
runs only when every process launches it with the same inputs. Only process 0 hears requests,
so each device program it compiles or calls (`programs.Programs.get`, the one seam) is first
sent to the followers over a TCP side channel, as (name, function, batched, inputs or their
shapes); each follower compiles and runs the same program from its own `Programs`, with its
own shards of the params (each process loads the checkpoint the same way). Inputs become
global arrays on every process from identical host copies, and outputs are replicated, so
process 0 gets every result whole without another collective.

Why a side channel and not collectives for the metadata: a collective launched when a peer is
already dead waits for ever (gloo, measured: still blocked after 3 minutes, not even SIGTERM
ends it), and jax.distributed's own error path terminates every process when one dies. So
`initialize` turns on jax's recoverability (process 0 survives a dead follower) and death is
seen on the side channel: a closed connection (a killed process) at once, a silent one (a
lost host) after HEARTBEAT_TIMEOUT_S. Then process 0 calls `on_lost` (the server reports
NOT_SERVING) and every later call raises FollowerLost before launching anything. A call in
flight when a follower dies also ends with FollowerLost: gloo fails the collective once the
peer's connection resets (measured, on loopback); should it block instead (a host that
vanished without a reset), its caller is released when the death is seen, and that program
keeps the devices until the processes are restarted together (jax.distributed has no
re-join). A follower whose process 0 goes exits at once.

The channel carries pickles (inputs and the program's function): it must be as private as
the coordinator's address, which jax.distributed already trusts with the whole job.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pickle
import queue
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from sdmesh.services.engine.errors import FollowerLost
from sdmesh.services.inputs.errors import InvalidRequest

log = logging.getLogger("sdmesh.distributed")

HEARTBEAT_S = 0.5  # each side sends one this often, whatever else it is doing
HEARTBEAT_TIMEOUT_S = 10.0  # silence this long means the other process (or its host) is gone
LOSS_GRACE_S = 2.0  # after a failed program, how long to wait for the side channel to report a follower's death
CONNECT_TIMEOUT_S = 300.0  # followers load their weights before they connect; so may process 0
LEADER_KEY = "sdmesh/leader-port"  # in jax.distributed's key-value store: where process 0 listens
HEARTBEAT, COMPILE, CALL, STOP, HELLO = b"H", b"P", b"C", b"S", b"O"  # frame kinds
_FRAME = struct.Struct("!cQ")  # kind, payload length


# --- which processes: flags, then environment -----------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    coordinator_address: str
    num_processes: int | None  # None: from the cluster's environment (SLURM, Open MPI, ...), as jax detects it
    process_id: int | None


def process_group(args: Any, environ: dict[str, str] | None = None) -> ProcessGroup | None:
    """The processes of this stage from --coordinator-address/--num-processes/--process-id, else the
    JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID environment; None: a one-process stage."""
    env = os.environ if environ is None else environ

    def given(flag: str, var: str, kind: type) -> Any:
        value = getattr(args, flag, None)
        if value is None and env.get(var):
            try:
                value = kind(env[var])
            except ValueError:
                raise InvalidRequest(f"{var}={env[var]!r} is not a valid {kind.__name__}") from None
        return value

    address = given("coordinator_address", "JAX_COORDINATOR_ADDRESS", str)
    count = given("num_processes", "JAX_NUM_PROCESSES", int)
    index = given("process_id", "JAX_PROCESS_ID", int)
    if address is None:
        if count not in (None, 1) or index not in (None, 0):
            raise InvalidRequest(
                "--num-processes/--process-id need --coordinator-address HOST:PORT (process 0's address "
                "and a free port), or JAX_COORDINATOR_ADDRESS"
            )
        return None
    if count is not None and index is not None and not 0 <= index < count:
        raise InvalidRequest(f"--process-id {index} must be from 0 to --num-processes − 1 = {count - 1}")
    return ProcessGroup(address, count, index)


def initialize(group: ProcessGroup, heartbeat_timeout_s: int = 10) -> None:
    """jax.distributed for `group`; call before anything touches a device. CPU collectives go over gloo."""
    # Process 0 must outlive a dead follower to report NOT_SERVING: without recoverability the
    # coordination service terminates every process when one stops heart-beating.
    jax.config.update("jax_enable_recoverability", True)
    # jax's preemption service catches SIGTERM; the server's own handler must get it to stop cleanly.
    jax.config.update("jax_enable_preemption_service", False)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # no other CPU collectives cross processes
    try:
        jax.distributed.initialize(
            group.coordinator_address,
            group.num_processes,
            group.process_id,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    except (ValueError, TypeError) as e:  # jax's messages about missing or inconsistent numbers
        raise InvalidRequest(
            f"cannot start a multi-process stage ({e}); give --coordinator-address, --num-processes and --process-id"
        ) from None


def is_multi_process() -> bool:
    return jax.process_count() > 1


def is_follower() -> bool:
    """A process of a multi-process stage other than process 0 (which serves gRPC and leads)."""
    return jax.process_index() != 0


def _state() -> Any:
    """jax.distributed's state: the coordinator's address and its client, whose key-value store we use.
    jax has no public API for either (multihost_utils reads the same object)."""
    from jax._src import distributed as jd

    return jd.global_state


# --- inputs and outputs of one program call across processes ----------------------------


def abstract(args: Any, shardings: Any) -> Any:
    """What to lower a program with: shapes, dtypes and shardings only (no process holds the others' data)."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), args, shardings)


def to_global(args: Any, shardings: Any) -> Any:
    """Global arrays from host copies that every process holds alike; arrays already placed stay (the params)."""

    def one(a: Any, s: Any) -> jax.Array:
        if isinstance(a, jax.Array) and a.sharding == s:
            return a
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree_util.tree_map(one, args, shardings)


def local(out: Any) -> Any:
    """A replicated output as an array on this process's first device: later work on it stays local
    (a jnp op on a global array would be a program the followers never run)."""
    return jax.tree_util.tree_map(lambda a: a.addressable_data(0), out)


def host_inputs(args: Sequence[Any]) -> tuple:
    """The inputs other than the params as numpy, to send (a replicated or local array reads whole)."""
    return tuple(jax.tree_util.tree_map(np.asarray, a) for a in args)


def program_call(
    program: Callable, in_shardings: Any, lockstep: Leader | None, name: str, fn: Callable, batched: tuple[int, ...]
) -> Callable:
    """The callable `Programs.get` returns on a multi-process mesh: run here, or (process 0) through `lockstep`."""

    def run(*args: Any) -> Any:
        out = program(*to_global(args, in_shardings))
        return local(jax.block_until_ready(out))

    return run if lockstep is None else functools.partial(lockstep.call, name, fn, batched, run)


# --- the side channel: length-prefixed frames over TCP ------------------------------------


def send_frame(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_FRAME.pack(kind, len(payload)) + payload)


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    """(kind, payload); raises ConnectionError when the other side has closed."""
    kind, size = _FRAME.unpack(_recv_exactly(sock, _FRAME.size))
    return kind, _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other process closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _heartbeat(sock: socket.socket, lock: threading.Lock, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            with lock:
                send_frame(sock, HEARTBEAT)
        except OSError:
            return  # the reader sees the same failure and says so


class _Peer:
    """One follower as process 0 sees it: a socket, its send lock, and a reader that notices its death."""

    def __init__(self, process: int, sock: socket.socket, stop: threading.Event, on_gone: Callable[[int, str], None]):
        self.process, self.sock, self.lock = process, sock, threading.Lock()
        sock.settimeout(HEARTBEAT_TIMEOUT_S)
        threading.Thread(target=self._read, args=(on_gone,), name=f"sdmesh-follower-{process}", daemon=True).start()
        threading.Thread(target=_heartbeat, args=(sock, self.lock, stop), daemon=True).start()

    def _read(self, on_gone: Callable[[int, str], None]) -> None:
        try:
            while True:
                recv_frame(self.sock)  # heartbeats only: their arrival is the news
        except TimeoutError:
            on_gone(self.process, f"silent for {HEARTBEAT_TIMEOUT_S:.0f}s")
        except OSError as e:
            on_gone(self.process, str(e) or type(e).__name__)

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        with self.lock:
            send_frame(self.sock, kind, payload)


class Leader:
    """Process 0's end: sends every program call to the followers, runs it, and watches them.

    `call` is what `Programs.lockstep` is set to. Calls run on one worker thread so that a call
    stuck in a collective with a dead follower still lets its caller go (with FollowerLost).
    """

    def __init__(self, on_lost: Callable[[str], None]):
        self._on_lost = on_lost
        self._peers: list[_Peer] = []
        self._stop, self._lost, self._guard = threading.Event(), threading.Event(), threading.Lock()
        self._why = "a follower process is gone"
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="sdmesh-lockstep")
        # Calls reach the followers in the order they run here (the worker takes them first in, first out):
        # two programs launched in different orders on two processes would wait on each other for ever.
        self._order = threading.Lock()

    @classmethod
    def open(cls, on_lost: Callable[[str], None], timeout_s: float = CONNECT_TIMEOUT_S) -> Leader:
        """Listen, tell the followers where (jax.distributed's key-value store), and wait for all of them.

        `on_lost(reason)` is called once, from a watcher thread, when a follower dies or goes silent.
        """
        leader, expected = cls(on_lost), jax.process_count() - 1
        ipv6 = socket.has_dualstack_ipv6()  # the coordinator's address, which followers dial, may be either
        listener = socket.create_server(
            ("", 0), family=socket.AF_INET6 if ipv6 else socket.AF_INET, dualstack_ipv6=ipv6
        )
        listener.settimeout(timeout_s)
        # a follower proves it read the key-value store, so a stray connection never takes a follower's place
        token = secrets.token_hex(16)
        _state().client.key_value_set(LEADER_KEY, f"{listener.getsockname()[1]} {token}")
        try:
            while len(leader._peers) < expected:
                sock, _ = listener.accept()
                sock.settimeout(HEARTBEAT_TIMEOUT_S)
                try:
                    kind, payload = recv_frame(sock)
                    process, given = payload.decode().split()
                except (OSError, ValueError, UnicodeDecodeError):
                    kind, given = b"", ""
                if kind != HELLO or not secrets.compare_digest(given, token):
                    sock.close()
                    continue
                leader._peers.append(_Peer(int(process), sock, leader._stop, leader._gone))
        except TimeoutError:
            raise FollowerLost(
                f"only {len(leader._peers)} of {expected} follower processes connected within "
                f"{timeout_s:.0f}s; start every process of the stage with the same --coordinator-address"
            ) from None
        finally:
            listener.close()
        log.warning("leading %d follower process(es)", expected)
        return leader

    @property
    def healthy(self) -> bool:
        return not self._lost.is_set()

    def _gone(self, process: int, reason: str) -> None:
        with self._guard:
            if self._stop.is_set() or self._lost.is_set():
                return
            self._why = f"follower process {process} is gone ({reason})"
            self._lost.set()
        log.error("%s: this stage stops serving; restart all its processes together", self._why)
        self._on_lost(self._why)

    def compile(self, name: str, fn: Callable, batched: tuple[int, ...], args: Sequence[Any]) -> None:
        """Have every follower compile what process 0 compiles now (shapes only), so they compile at once."""
        shapes = tuple(jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), a) for a in args[1:])
        with self._order:
            self._send(COMPILE, name, (name, fn, batched, shapes))

    def call(self, name: str, fn: Callable, batched: tuple[int, ...], run: Callable, params: Any, *args: Any) -> Any:
        """Send (name, fn, batched, inputs) to every follower, then run the same call here."""
        host = host_inputs(args)
        with self._order:
            self._send(CALL, name, (name, fn, batched, host))
            future = self._worker.submit(run, params, *host)
        while True:
            try:
                return future.result(timeout=0.05)
            except TimeoutError:
                if self._lost.is_set():  # the program may wait in a collective for the dead process for ever
                    raise FollowerLost(
                        f"{self._why} while program {name!r} ran; restart all of this stage's "
                        "processes (the devices may stay busy until then)"
                    ) from None
            except Exception as e:
                # a collective whose peer was killed can also fail at once (gloo: "Connection reset by peer");
                # the side channel sees the death at about the same moment, so give it a moment to say so
                if self._lost.wait(LOSS_GRACE_S):
                    raise FollowerLost(
                        f"{self._why} while program {name!r} ran ({type(e).__name__}); restart all "
                        "of this stage's processes"
                    ) from e
                raise

    def _send(self, kind: bytes, name: str, message: tuple) -> None:
        if self._lost.is_set():
            raise FollowerLost(f"{self._why}; restart all of this stage's processes")
        try:
            payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise TypeError(
                f"program {name!r}: its function must pickle (a module-level function or a "
                f"functools.partial of one) to run on a multi-process stage: {e}"
            ) from e
        for peer in self._peers:
            try:
                peer.send(kind, payload)
            except OSError as e:  # before any collective began: nothing is stuck
                self._gone(peer.process, str(e))
                raise FollowerLost(f"{self._why}; program {name!r} did not run") from e

    def close(self) -> None:
        """Tell the followers to exit (a clean stop), then close."""
        self._stop.set()
        for peer in self._peers:
            try:
                peer.send(STOP)
                peer.sock.close()
            except OSError:
                pass
        self._worker.shutdown(wait=False)


# --- the followers --------------------------------------------------------------------


def coordinator_host() -> str:
    """Process 0's host: it runs jax.distributed's coordinator, so the coordinator's address names it."""
    return _state().coordinator_address.rsplit(":", 1)[0].strip("[]")


def follow(programs: Any, params: Any, timeout_s: float = CONNECT_TIMEOUT_S) -> int:
    """Run every program call process 0 sends, with this process's params, until it stops us (returns 0).

    If process 0 dies, this process exits at once with status 1: it may be stuck in a collective
    with it, and nothing else here needs a clean end.
    """
    port, token = _state().client.blocking_key_value_get(LEADER_KEY, int(timeout_s * 1000)).split()
    port = int(port)
    sock = socket.create_connection((coordinator_host(), port), timeout=timeout_s)
    sock.settimeout(HEARTBEAT_TIMEOUT_S)
    lock, stop = threading.Lock(), threading.Event()
    with lock:
        send_frame(sock, HELLO, f"{jax.process_index()} {token}".encode())
    threading.Thread(target=_heartbeat, args=(sock, lock, stop), daemon=True).start()
    calls: queue.Queue = queue.Queue()
    threading.Thread(target=_read_calls, args=(sock, calls), name="sdmesh-leader", daemon=True).start()
    log.warning("process %d following process 0 at %s:%d", jax.process_index(), coordinator_host(), port)
    while True:
        kind, payload = calls.get()
        if kind == STOP:
            stop.set()
            sock.close()
            return 0
        name, fn, batched, inputs = pickle.loads(payload)  # for COMPILE, the inputs are only shapes
        program, _ = programs.get(name, fn, params, *inputs, batched=batched)
        if kind == CALL:
            program(params, *inputs)


def _read_calls(sock: socket.socket, calls: queue.Queue) -> None:
    try:
        while True:
            kind, payload = recv_frame(sock)
            if kind in (COMPILE, CALL, STOP):
                calls.put((kind, payload))
            if kind == STOP:
                return
    except (OSError, ValueError) as e:
        log.error("process 0 is gone (%s): exiting", e)
        logging.shutdown()
        os._exit(1)


# --- wiring for `sdmesh serve` ---------------------------------------------------------


def initialize_from_args(args: Any) -> bool:
    """Start jax.distributed when the flags or environment name several processes; True if they do.

    A stage over several processes must have a mesh over their devices: without mesh flags each
    process would run alone on one device and the followers would do nothing.
    """
    from sdmesh.services.engine import sharding

    group = process_group(args)
    if group is None:
        return False
    if sharding.mesh_config(args) is None:
        raise InvalidRequest(
            "a stage over several processes needs a mesh over all their devices: give "
            "--dcn-data-parallelism (the processes) and --ici-*-parallelism (each one's devices)"
        )
    initialize(group)
    return True

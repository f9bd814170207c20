"""`sdmesh up`: the whole stack on one machine, each service its own process on a loopback port.

    encoder ─┐
    denoiser × N ─┼─ gateway (the given port) ← clients
    decoder ─┘

Each child is `python -m sdmesh.client.cli serve SERVICE …`. The stages get free ports; the
gateway is told every replica's address. `Stack` starts them, waits until each reports
SERVING on grpc.health.v1, and stops them all: SIGTERM, then SIGKILL after a grace period.
With `metrics_base_port`, each child also serves its Prometheus metrics (`--metrics-port`): the gateway
on that port, the stages on the ports after it in order (0: free ports).
Children run in their own session (a terminal's Ctrl-C reaches only `sdmesh up`, which then
stops them in order) and, on Linux, get SIGTERM if `sdmesh up` itself dies: no orphans.

With `tls` (`sdmesh up --tls`: a throwaway CA and certificates, made by services/serving/tls.py) every hop is
mutual TLS: each stage serves with the server certificate and takes only clients whose certificate the CA
signed (`--tls-cert/--tls-key/--tls-client-ca`); the gateway serves the same way and presents the server
certificate to the stages (`--stage-tls-*`); metrics are https://. `wait_serving` checks health with the
client certificate, and `client_flags` are what a client gives (`sdmesh generate --server ADDR ...`).

Several models (`sdmesh up --model base=A --model inpaint=B`): each model gets its own denoisers; models whose text
encoders (with tokenizers), resp. VAEs, hold equal weights share one encoder, resp. decoder (the CLI hashes them:
`StackModel`). `plan` lays out the processes; the gateway serves the first model under --encoder/--denoiser/--decoder
and `--model-name`, each other one as `--route NAME denoiser=ADDRS [encoder=ADDRS] [decoder=ADDRS]`, naming only
the stages it does not share with the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

STAGES = ("encoder", "denoiser", "decoder")


@dataclasses.dataclass(frozen=True)
class StackModel:
    """One model of the stack: its name at the gateway, the --model its stages load, and content hashes of what its
    encoder (text encoder and tokenizer) and decoder (VAE) load: models with equal hashes share that process;
    "" shares with no other model."""

    name: str
    source: str
    encoder_weights: str = ""
    decoder_weights: str = ""


@dataclasses.dataclass(frozen=True)
class Pool:
    """Processes running one stage for some of the stack's models."""

    name: str  # "encoder", "denoiser", "denoiser-NAME", "decoder-NAME", …
    service: str  # "encoder", "denoiser" or "decoder"
    source: str  # the --model they load ("": the one the stack's serve_args name)
    models: tuple[str, ...]  # the names of the models it serves
    processes: tuple[str, ...]  # its processes' names, which their logs take too


# A model's name at the gateway: what requests and the --route flag carry.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][\w.+-]*$")


def short_name(source: str) -> str:
    """A checkpoint's short form, a model's default name: the last path component without .safetensors/.ckpt."""
    last = Path(source.rstrip("/")).name or source
    for suffix in (".safetensors", ".ckpt"):
        last = last.removesuffix(suffix)
    return last


def parse_models(values: Sequence[str]) -> list[tuple[str, str]]:
    """(name, source) for each `--model [NAME=]PATH_OR_ID`, the name defaulting to `short_name`; ValueError names
    a name that is not one or is given twice."""
    models: list[tuple[str, str]] = []
    for text in values:
        name, sep, source = text.partition("=")
        named = bool(sep and name and source and "/" not in name)
        if not named:  # a path or Hub id
            name, source = short_name(text), text
        if (named or len(values) > 1) and not _MODEL_NAME.match(name):  # one model alone needs no name
            raise ValueError(
                f"--model {text}: {name!r} is not a model name (letters, digits, '.', '_', '+', '-'): "
                "name it with --model NAME=PATH_OR_ID"
            )
        if any(name == known for known, _ in models):
            raise ValueError(f"two --model are named {name!r}: give one another name with --model NAME=PATH_OR_ID")
        models.append((name, source))
    return models


def plan(models: Sequence[StackModel], denoisers: int = 1) -> list[Pool]:
    """The stack's pools in start order: the encoders, each model's `denoisers` replicas, the decoders.

    One model: the processes `encoder`, `denoiser-0` … `denoiser-{N-1}`, `decoder`. Several: an encoder (resp.
    decoder) per distinct `encoder_weights` (resp. `decoder_weights`), named `encoder` when all share it, else
    `encoder-NAME` after the first model it serves, and `denoiser-NAME-i` for each model."""
    if not models:
        raise ValueError("a stack serves at least one model")
    if denoisers < 1:
        raise ValueError(f"denoisers must be at least 1, got {denoisers}")
    several = len(models) > 1

    def shared(service: str, key: str) -> list[Pool]:
        groups: dict[Any, list[StackModel]] = {}
        for m in models:
            groups.setdefault(getattr(m, key) or ("alone", m.name), []).append(m)
        pools = []
        for group in groups.values():
            name = service if len(groups) == 1 else f"{service}-{group[0].name}"
            pools.append(Pool(name, service, group[0].source, tuple(m.name for m in group), (name,)))
        return pools

    denoising = []
    for m in models:
        name = f"denoiser-{m.name}" if several else "denoiser"
        denoising.append(Pool(name, "denoiser", m.source, (m.name,), tuple(f"{name}-{i}" for i in range(denoisers))))
    return [*shared("encoder", "encoder_weights"), *denoising, *shared("decoder", "decoder_weights")]


def gateway_routing(pools: Sequence[Pool], models: Sequence[StackModel], addresses: Mapping[str, str]) -> list[str]:
    """The gateway's flags reaching the pools: --encoder/--denoiser/--decoder for the first model, --model-name
    for it (unless it is one model under its default name), and a --route for each other model, naming only the
    stages whose pool is not the first's. `addresses`: each process's HOST:PORT by name."""

    def pool(model: str, service: str) -> Pool:
        return next(p for p in pools if p.service == service and model in p.models)

    def replicas(p: Pool) -> str:
        return ",".join(addresses[name] for name in p.processes)

    first = models[0].name
    flags = [f for stage in STAGES for f in (f"--{stage}", replicas(pool(first, stage)))]
    if len(models) > 1 or first != short_name(models[0].source):  # else the gateway's default name is the same
        flags += ["--model-name", first]
    for m in models[1:]:
        own = [pool(m.name, s) for s in ("denoiser", "encoder", "decoder")]
        flags += ["--route", m.name, *(f"{p.service}={replicas(p)}" for p in own if p is not pool(first, p.service))]
    return flags


class StackCertificates(Protocol):
    """The PEM files of a TLS stack (services/serving/tls.py's LocalCertificates)."""

    directory: Path
    ca: Path
    server_cert: Path  # valid for the stack's host, usable as a server and as a client certificate
    server_key: Path
    client_cert: Path
    client_key: Path


def client_flags(certificates: StackCertificates) -> list[str]:
    """The flags a client gives to reach a TLS stack: `sdmesh generate --server ADDR` plus these."""
    return [
        "--tls-ca",
        str(certificates.ca),
        "--tls-cert",
        str(certificates.client_cert),
        "--tls-key",
        str(certificates.client_key),
    ]


class ChildDied(RuntimeError):
    """A service exited: the message names it, its exit status and where its log is."""


@dataclasses.dataclass
class Child:
    name: str  # "encoder", "denoiser-0", …, "gateway"
    service: str  # what `sdmesh serve` runs
    address: str
    argv: list[str]
    log: Path | None = None
    process: subprocess.Popen | None = None
    metrics: str | None = None  # HOST:PORT of its Prometheus endpoint, if it serves one
    models: tuple[str, ...] = ()  # the names of the models it serves (a stack of several)

    def describe_exit(self) -> str:
        code = self.process.returncode if self.process else None
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exited with status {code}"
        )
        where = f"; its log: {self.log}" if self.log else ""
        return f"{self.name} ({self.address}, pid {self.process.pid if self.process else '?'}) {how}{where}"


def free_port(host: str) -> int:
    """A port nothing listens on now (the OS picks it); the child binds it a moment later."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _parent_death_signal() -> Any:
    """A function for Popen's preexec_fn: the child gets SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG).

    libc is looked up here, in the parent: between fork and exec the child only makes the call.
    None where there is no prctl (not Linux): `Stack.stop` still stops every child on a normal exit.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _tls_args(tls: StackCertificates | None) -> tuple[list[str], list[str]]:
    """(`sdmesh serve` flags for a service's own port, the gateway's flags for its calls to the stages)."""
    if tls is None:
        return [], []
    own = ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key), "--tls-client-ca", str(tls.ca)]
    # the gateway is the stages' client: it presents the server certificate, which is valid for clientAuth too
    to_stages = ["--stage-tls-ca", str(tls.ca), "--stage-tls-cert", str(tls.server_cert)]
    return own, [*to_stages, "--stage-tls-key", str(tls.server_key)]


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


class Stack:
    """Encoder, `denoisers` denoiser replicas, decoder and gateway as child processes.

    serve_args: options every stage gets (model, runtime, --shapes …); gateway_args: the gateway's own.
    models: the models to serve, each stage's --model coming before serve_args (`plan`: how they share
    stages); None: the one model serve_args names.
    log_dir: write each child's output to log_dir/NAME.log (default: inherit this process's stdout/stderr).
    metrics_base_port: serve each child's metrics, the gateway's on this port and the stages' on the next ones
    (0: free ports); None: none.
    tls: serve every hop with mutual TLS from these certificates; None: plaintext.
    http_port: the gateway also serves its HTTP front there (0: a free port; None: no HTTP).
    drain_seconds: the children's --drain-seconds (pass the same in serve_args and gateway_args): how long
    `stop` lets each drain before it kills it.
    """

    def __init__(
        self,
        serve_args: list[str],
        *,
        host: str = "127.0.0.1",
        port: int = 50051,
        denoisers: int = 1,
        gateway_args: list[str] = (),
        log_dir: Path | None = None,
        drain_seconds: float = 30.0,
        metrics_base_port: int | None = None,
        tls: StackCertificates | None = None,
        http_port: int | None = None,
        models: Sequence[StackModel] | None = None,
    ):
        self.drain_seconds = drain_seconds
        if denoisers < 1:
            raise ValueError(f"denoisers must be at least 1, got {denoisers}")
        self.host, self.log_dir, self.tls = host, log_dir, tls
        own, to_stages = _tls_args(tls)
        self.models = list(models) if models else [StackModel("", "")]  # "": serve_args names the model
        self.pools = plan(self.models, denoisers)
        count = sum(len(p.processes) for p in self.pools)
        metrics = self._metrics_ports(metrics_base_port, count + 1)  # the gateway's first
        self.children: list[Child] = []
        for pool in self.pools:
            args = [*(["--model", pool.source] if pool.source else []), *serve_args, *own]
            for name in pool.processes:
                child = self._child(name, pool.service, free_port(host), args, metrics[len(self.children) + 1])
                self.children.append(dataclasses.replace(child, models=pool.models))
        routing = gateway_routing(self.pools, self.models, {c.name: c.address for c in self.children})
        gateway = [*routing, *own, *to_stages, *gateway_args]
        # the gateway's HTTP front (services/http): None: off; 0: a free port
        self.http_address = None
        if http_port is not None:
            http_port = http_port or free_port(host)
            gateway += ["--http-port", str(http_port)]
            self.http_address = f"{host}:{http_port}"
        self.children.append(self._child("gateway", "gateway", port or free_port(host), gateway, metrics[0]))
        self._logs: list[TextIO] = []

    def _metrics_ports(self, base: int | None, n: int) -> list[int | None]:
        if base is None:
            return [None] * n
        return [base + i for i in range(n)] if base else [free_port(self.host) for _ in range(n)]

    def _child(self, name: str, service: str, port: int, args: list[str], metrics_port: int | None = None) -> Child:
        argv = [
            sys.executable,
            "-m",
            "sdmesh.client.cli",
            "serve",
            service,
            "--host",
            self.host,
            "--port",
            str(port),
            *args,
        ]
        metrics = None
        if metrics_port is not None:
            argv += ["--metrics-port", str(metrics_port)]
            metrics = f"{self.host}:{metrics_port}"
        log = self.log_dir / f"{name}.log" if self.log_dir else None
        return Child(name, service, f"{self.host}:{port}", argv, log, metrics=metrics)

    @property
    def gateway(self) -> Child:
        return self.children[-1]

    @property
    def address(self) -> str:
        return self.gateway.address

    def start(self) -> Stack:
        env = dict(os.environ)
        # Several JAX processes may share one accelerator: none may take most of its memory up front.
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        on_parent_death = _parent_death_signal()
        for child in self.children:
            out: Any = None
            if child.log:
                out = child.log.open("w")
                self._logs.append(out)
            child.process = subprocess.Popen(
                child.argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=on_parent_death,
            )
        return self

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.process is not None and c.process.poll() is not None]

    def wait_serving(self, timeout: float) -> None:
        """Block until every child reports SERVING; ChildDied if one exits first, TimeoutError naming the laggards."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        waiting = {c.name: c for c in self.children}
        if self.tls is None:
            channels = {c.name: grpc.insecure_channel(c.address) for c in self.children}
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.tls.ca.read_bytes(),
                private_key=self.tls.client_key.read_bytes(),
                certificate_chain=self.tls.client_cert.read_bytes(),
            )
            channels = {c.name: grpc.secure_channel(c.address, credentials) for c in self.children}
        try:
            while waiting:
                for child in self.dead():
                    raise ChildDied(child.describe_exit())
                for name in list(waiting):
                    stub = health_pb2_grpc.HealthStub(channels[name])
                    try:
                        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            del waiting[name]
                    except grpc.RpcError:
                        pass  # not listening yet
                if waiting and time.monotonic() > deadline:
                    raise TimeoutError(f"not SERVING after {timeout:g}s: {', '.join(waiting)}")
                if waiting:
                    time.sleep(0.2)
        finally:
            for channel in channels.values():
                channel.close()

    def stop(self, grace: float | None = None) -> None:
        """Stop in the order that loses nothing: the gateway first (it admits nothing new and lets the requests it
        holds finish through the stages), then the stages (each drains what is left). SIGTERM, then SIGKILL
        after `grace` seconds (default: the drain time and 5 s more) for each of the two."""
        grace = self.drain_seconds + 5.0 if grace is None else grace
        gateway = [c for c in self.children if c.service == "gateway"]
        for group in (gateway, [c for c in self.children if c.service != "gateway"]):
            running = [c for c in group if c.process is not None and c.process.poll() is None]
            for child in running:
                child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for child in running:
                try:
                    child.process.wait(max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def stack_models(args: argparse.Namespace) -> list[StackModel]:
    """`sdmesh up`'s --model flags as models, without weight hashes (each then has its own encoder and decoder; the
    CLI adds the hashes that let models share them)."""
    values = args.model if isinstance(args.model, list) else [args.model]
    return [StackModel(name, source) for name, source in parse_models([str(v) for v in values])]


def serve_args(args: argparse.Namespace) -> list[str]:
    """The `sdmesh serve` options every stage gets, from `sdmesh up`'s (--model: the first model's)."""
    return ["--model", stack_models(args)[0].source, *stage_args(args)]


def stage_args(args: argparse.Namespace) -> list[str]:
    """`serve_args` without --model: what the stages of every model get."""
    out: list[str] = []
    for flag in (
        "revision",
        "variant",
        "unet_checkpoint",
        "config",
        "tokenizer",
        "prediction_type",
        "original_config",
        "weights_dtype",
        "activations_dtype",
        "precision",
        "attention",
        "jax_cache_dir",
        "shapes",
        "max_queue",
        "chunk_steps",
        "max_batch",
        "batch_wait_ms",
        "batching",
        "drain_seconds",
        "max_work",
        "max_side",
        "lora_dir",
        "max_adapters",
        "embeddings_dir",
    ):
        value = getattr(args, flag, None)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    for name, source in getattr(args, "controlnet", None) or ():  # the denoiser loads them; the others ignore them
        out += ["--controlnet", f"{name}={source}"]
    if getattr(args, "allow_pickle", False):
        out.append("--allow-pickle")
    if getattr(args, "no_jax_cache", False):
        out.append("--no-jax-cache")
    return out


def gateway_args(args: argparse.Namespace) -> list[str]:
    """The gateway's own `sdmesh serve` options, from `sdmesh up`'s."""
    out = ["--max-inflight", str(args.max_inflight), "--drain-seconds", str(args.drain_seconds)]
    for flag in ("api_keys", "max_work", "max_side"):
        value = getattr(args, flag, None)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    return out


def http_port(args: argparse.Namespace) -> int | None:
    """`sdmesh up`'s HTTP port: --http-port, else the gateway's port + 1000 (a free one when that is 0); None with
    --no-http."""
    if getattr(args, "no_http", False):
        return None
    if getattr(args, "http_port", None) is not None:
        return int(args.http_port)
    return args.port + 1000 if args.port else 0


def main(
    args: argparse.Namespace,
    certificates: StackCertificates | None = None,
    models: Sequence[StackModel] | None = None,
) -> int:
    """`sdmesh up`: start, wait for SERVING, print the gateway address, run until Ctrl-C/SIGTERM or a stage is gone.

    certificates: serve every hop with mutual TLS from these (`sdmesh up --tls` makes them); None: plaintext.
    models: the models to serve, with the weight hashes that let them share stages; None: args.model's, sharing
    nothing."""
    if args.max_queue is None:  # each stage can hold every request the gateway admits: none is refused downstream
        args.max_queue = args.max_inflight
    models = list(models) if models else stack_models(args)
    stack = Stack(
        stage_args(args),
        models=models,
        host=args.host,
        port=args.port,
        denoisers=args.denoisers,
        gateway_args=gateway_args(args),
        log_dir=args.log_dir,
        drain_seconds=args.drain_seconds,
        metrics_base_port=getattr(args, "metrics_base_port", None),
        tls=certificates,
        http_port=http_port(args),
    )
    # SIGTERM behaves as Ctrl-C: one path stops everything. SIGINT's handler is set too: a shell starts a
    # background job (`sdmesh up &` in a script) with SIGINT ignored, and Python then leaves it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reported: set[str] = set()
    try:
        stack.start()
        if len(models) == 1:
            print(f"starting {', '.join(c.name for c in stack.children)} (model {models[0].source}) ...",
                  file=sys.stderr)  # fmt: skip
        else:
            print(f"starting {', '.join(c.name for c in stack.children)} for the models "
                  f"{', '.join(f'{m.name} ({m.source})' for m in models)} ...", file=sys.stderr)  # fmt: skip
        try:
            stack.wait_serving(args.start_timeout)
        except (ChildDied, TimeoutError) as e:
            print(f"sdmesh up: {e}", file=sys.stderr)
            return 1
        scheme = "https" if certificates is not None else "http"
        tls_flags = f" {' '.join(client_flags(certificates))}" if certificates is not None else ""
        for c in stack.children:
            metrics = f"  metrics {scheme}://{c.metrics}/metrics" if c.metrics else ""
            serves = f"  serves {', '.join(c.models or [m.name for m in models])}" if len(models) > 1 else ""
            print(f"  {c.name:<12} {c.address}  pid {c.process.pid}{serves}{metrics}", file=sys.stderr)
        if any(c.metrics for c in stack.children):
            print(
                f"  live summary: sdmesh top {' '.join(c.metrics for c in stack.children if c.metrics)}{tls_flags}",
                file=sys.stderr,
            )
        if certificates is not None:
            print(
                f"  mutual TLS on every hop; certificates in {certificates.directory}; a client gives:\n"
                f"    sdmesh generate PROMPT --server {stack.address}{tls_flags}",
                file=sys.stderr,
            )
        if stack.http_address is not None:
            print(f"  page and HTTP API: {scheme}://{stack.http_address}/  (OpenAI: {scheme}://{stack.http_address}/v1,"
                  f" A1111: /sdapi/v1, API document: /docs)", file=sys.stderr)  # fmt: skip
        print(stack.address, flush=True)
        if stack.http_address is not None:
            print(f"http: {scheme}://{stack.http_address}", flush=True)
        print("serving; Ctrl-C stops the stack", file=sys.stderr)
        while True:
            for child in stack.dead():
                if child.name not in reported:
                    reported.add(child.name)
                    print(f"sdmesh up: {child.describe_exit()}", file=sys.stderr)
            pools = [(p.name, p.processes) for p in stack.pools] + [("gateway", ("gateway",))]
            lost = [name for name, processes in pools if all(n in reported for n in processes)]  # a stage gone
            if lost:
                print(f"sdmesh up: no {', '.join(lost)} left; stopping the stack", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping the stack", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the stopping
        stack.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

"""TLS and mutual TLS on every hop: a stage, the gateway's own port, its channels to the stages, the metrics
endpoints, `sdmesh health` and `sdmesh top`, and `sdmesh up --tls` end to end.

In-process tests use real `StageServer`s and the real gateway around tiny fakes (no model, no JAX), with
certificates from `make_local_certificates`; one process test starts `sdmesh up --tls` on the tiny checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from sdmesh.client import Client, GatewayError
from sdmesh.client.cli import build_parser
from sdmesh.client.cli import main as cli_main
from sdmesh.client.stages import TextEncoderClient, health_status
from sdmesh.services.inputs.contract import ModelFacts
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving import gateway, server, tls, wire
from sdmesh.services.serving.metrics import StageMetrics
from sdmesh.v1 import common_pb2, decoder_pb2_grpc, denoiser_pb2_grpc, text_encoder_pb2_grpc

HANDSHAKE_TIMEOUT = 5  # seconds: a refused handshake fails at once; this only bounds a hang


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tls.LocalCertificates:
    return tls.make_local_certificates(tmp_path_factory.mktemp("certs"), ["sdmesh.test"])


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory) -> tls.LocalCertificates:
    """Certificates from another CA: valid, but not ones our servers trust."""
    return tls.make_local_certificates(tmp_path_factory.mktemp("other"))


# --- tiny stages ---------------------------------------------------------------------


class InfoOnly:
    """A stage servicer that answers ModelInfo; the denoiser's reports model facts, as the gateway needs."""

    def __init__(self, service: str, facts: ModelFacts | None = None):
        self.service, self.facts = service, facts

    def ModelInfo(self, request, context):
        info = common_pb2.ModelInfo(service=self.service, model="fake")
        if self.facts is not None:
            info.model_facts.CopyFrom(wire.facts_to_proto(self.facts))
        return info


def fake_facts() -> ModelFacts:
    return ModelFacts(
        kind="text-to-image",
        vae_scale_factor=8,
        latent_channels=4,
        default_size=(32, 32),
        max_steps=1000,
        samplers=("ddim",),
        default_sampler="ddim",
        hidden_size=4,
        max_length=3,
        prediction_type="epsilon",
        extra_channels=0,
        class_labels_shape=None,
        max_noise_level=0,
    )


STAGE_KINDS = {
    "encoder": ("sdmesh.v1.TextEncoder", text_encoder_pb2_grpc.TextEncoderServicer,
                text_encoder_pb2_grpc.add_TextEncoderServicer_to_server),
    "denoiser": ("sdmesh.v1.Denoiser", denoiser_pb2_grpc.DenoiserServicer,
                 denoiser_pb2_grpc.add_DenoiserServicer_to_server),
    "decoder": ("sdmesh.v1.Decoder", decoder_pb2_grpc.DecoderServicer, decoder_pb2_grpc.add_DecoderServicer_to_server),
}  # fmt: skip


def start_stage(kind: str, server_tls: tls.ServerTLS | None) -> server.StageServer:
    """A real StageServer (health, reflection, the interceptor) around an InfoOnly servicer, warmed up."""
    name, base, add = STAGE_KINDS[kind]
    servicer = type(f"Fake{kind}", (InfoOnly, base), {})(name, fake_facts() if kind == "denoiser" else None)
    service = server.StageService(
        name=name,
        servicer=servicer,
        add_to_server=add,
        device_methods=frozenset(),
        warm_up=lambda: None,
        max_message_bytes=0,
    )
    credentials = server_tls.credentials() if server_tls else None
    running = server.StageServer(service, host="127.0.0.1", credentials=credentials).start()
    running.warm_up()
    return running


@pytest.fixture
def stages():
    started: list[server.StageServer] = []

    def start(kind: str, server_tls: tls.ServerTLS | None) -> server.StageServer:
        started.append(start_stage(kind, server_tls))
        return started[-1]

    yield start
    for s in started:
        s.stop(grace=0)


def mutual(certs: tls.LocalCertificates) -> tls.ServerTLS:
    return tls.server_tls(certs.server_cert, certs.server_key, certs.ca)


def client_credentials(certs: tls.LocalCertificates, *, cert: bool = True) -> grpc.ChannelCredentials:
    """Trust certs' CA and (if `cert`) present its client certificate."""
    return tls.channel_credentials(certs.ca, certs.client_cert if cert else None, certs.client_key if cert else None)


def refused(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The code a health check gets; the test expects the handshake to fail (UNAVAILABLE)."""
    with pytest.raises(grpc.RpcError) as e:
        health_status(address, timeout=HANDSHAKE_TIMEOUT, credentials=credentials)
    return e.value.code()


# --- certificates --------------------------------------------------------------------


def test_local_certificates_are_a_ca_a_server_and_client_certificate_and_private_keys(certs):
    assert {p.name for p in certs.directory.iterdir()} == set(tls.LOCAL_FILES.values())
    for key in (certs.server_key, certs.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    server_cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    client_cert = x509.load_pem_x509_certificate(certs.client_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (server_cert, client_cert):
        leaf.verify_directly_issued_by(ca)
        assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 8  # throwaway
    san = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "sdmesh.test"}  # the --host given too
    usages = server_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert list(client_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


# --- a stage -------------------------------------------------------------------------


def test_a_tls_stage_answers_over_tls_and_a_plaintext_client_fails_at_the_handshake(certs, other_certs, stages):
    stage = stages("encoder", tls.server_tls(certs.server_cert, certs.server_key))
    trusting = tls.channel_credentials(certs.ca)
    assert health_status(stage.address, credentials=trusting) == "SERVING"
    with grpc.secure_channel(stage.address, trusting) as channel:
        assert TextEncoderClient(channel).model_info(timeout=5).service == "sdmesh.v1.TextEncoder"
    assert refused(stage.address, None) == grpc.StatusCode.UNAVAILABLE
    # a client that trusts only another CA refuses the server's certificate
    assert refused(stage.address, tls.channel_credentials(other_certs.ca)) == grpc.StatusCode.UNAVAILABLE


def test_with_a_client_ca_only_clients_with_a_certificate_it_signed_get_in(certs, other_certs, stages):
    stage = stages("denoiser", mutual(certs))
    assert health_status(stage.address, credentials=client_credentials(certs)) == "SERVING"
    assert refused(stage.address, client_credentials(certs, cert=False)) == grpc.StatusCode.UNAVAILABLE
    # a certificate from another CA, though the client trusts ours
    from_elsewhere = tls.channel_credentials(certs.ca, other_certs.client_cert, other_certs.client_key)
    assert refused(stage.address, from_elsewhere) == grpc.StatusCode.UNAVAILABLE
    assert refused(stage.address, None) == grpc.StatusCode.UNAVAILABLE


# --- the gateway ---------------------------------------------------------------------


def gateway_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "gateway", *argv])


def start_gateway(stage_addresses: dict[str, str], stage_credentials, own: tls.ServerTLS | None):
    make = functools.partial(gateway.stage_channel, credentials=stage_credentials)
    pools = [gateway.ReplicaPool(kind, [stage_addresses[kind]], channel_factory=make) for kind in STAGE_KINDS]
    service = gateway.GatewayService(*pools)
    grpc_server, port = gateway.build_server(service, "127.0.0.1:0", credentials=own.credentials() if own else None)
    grpc_server.start()
    return f"127.0.0.1:{port}", grpc_server, pools


def test_the_gateways_stage_channels_are_mutually_authenticated(certs, stages):
    addresses = {kind: stages(kind, mutual(certs)).address for kind in STAGE_KINDS}
    own = tls.server_tls_from_args(
        gateway_args("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                     "--tls-client-ca", str(certs.ca))
    )  # fmt: skip
    flags = ["--stage-tls-ca", str(certs.ca)]
    with_cert = tls.stage_channel_credentials_from_args(
        gateway_args(*flags, "--stage-tls-cert", str(certs.server_cert), "--stage-tls-key", str(certs.server_key))
    )
    without_cert = tls.stage_channel_credentials_from_args(gateway_args(*flags))
    running = []
    try:
        address, *rest = start_gateway(addresses, with_cert, own)
        running.append(rest)
        # ModelInfo crosses the gateway → denoiser channel (the gateway asks the denoiser for the model's facts)
        with Client(address, credentials=client_credentials(certs)) as client:
            info = client.model_info(timeout=10)
        assert info.model == "fake" and info.model_facts.vae_scale_factor == 8
        with Client(address) as plaintext, pytest.raises(GatewayError) as e:
            plaintext.model_info(timeout=HANDSHAKE_TIMEOUT)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE

        address, *rest = start_gateway(addresses, without_cert, None)  # TLS to the stages, but no certificate
        running.append(rest)
        with Client(address) as client, pytest.raises(GatewayError) as e:
            client.model_info(timeout=10)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "denoiser" in e.value.message
    finally:
        for grpc_server, pools in running:
            grpc_server.stop(None).wait()
            for pool in pools:
                pool.close()


# --- metrics, health, flags ----------------------------------------------------------


def test_metrics_over_https_scrape_with_sdmesh_top(certs, capsys):
    metrics = StageMetrics("denoiser")
    port = metrics.serve_http(0, "127.0.0.1", tls=mutual(certs))
    client = ["--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]
    try:
        assert cli_main(["top", f"127.0.0.1:{port}", "--once", "--tls-ca", str(certs.ca), *client]) == 0
        out = capsys.readouterr().out
        assert "denoiser" in out.splitlines()[1] and f"127.0.0.1:{port}" in out
        # no client certificate: the endpoint requires one (--tls-client-ca)
        assert cli_main(["top", f"https://127.0.0.1:{port}", "--once", "--tls-ca", str(certs.ca)]) == 2
        assert "TLS" in capsys.readouterr().err
        assert cli_main(["top", f"127.0.0.1:{port}", "--once", "--timeout", "5"]) == 2  # plain http
        assert "https://" in capsys.readouterr().err
    finally:
        metrics.close()


def test_sdmesh_health_over_mutual_tls(certs, stages, capsys):
    stage = stages("decoder", mutual(certs))
    flags = ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]
    assert cli_main(["health", stage.address, *flags]) == 0 and capsys.readouterr().out.strip() == "SERVING"
    assert cli_main(["health", stage.address, "--timeout", "5"]) == 1
    assert capsys.readouterr().out.startswith("UNAVAILABLE")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert", "{missing}", "--tls-key", "{server_key}"], "--tls-cert {missing}: cannot read it"),
        (["--tls-cert", "{server_cert}"], "give --tls-cert and --tls-key together"),
        (["--tls-client-ca", "{ca}"], "--tls-client-ca checks clients' certificates, which needs TLS"),
        (["--tls-cert", "{server_cert}", "--tls-key", "{server_cert}"], "--tls-key {server_cert}: not a PEM private"),
        (["--tls-cert", "{server_cert}", "--tls-key", "{client_key}"], "is not the private key of --tls-cert"),
        (["--tls-cert", "{server_cert}", "--tls-key", "{server_key}", "--tls-client-ca", "{server_key}"],
         "--tls-client-ca {server_key}: not a PEM file holding a certificate"),
    ],
)  # fmt: skip
def test_bad_tls_flags_fail_at_start_naming_the_flag(certs, flags, message, capsys):
    paths = {"missing": str(certs.directory / "nope.pem"), **{k: str(getattr(certs, k)) for k in tls.LOCAL_FILES}}
    argv = [f.format(**paths) for f in flags]
    assert cli_main(["serve", "encoder", "--model", "/no/such/model", *argv]) == 2  # before any model is read
    assert message.format(**paths) in capsys.readouterr().err


def test_bad_stage_tls_flags_fail_at_start_naming_the_flag(certs, capsys):
    argv = ["serve", "gateway", "--stage-tls-ca", str(certs.ca), "--stage-tls-cert", str(certs.server_cert)]
    assert cli_main(argv) == 2
    assert "give --stage-tls-cert and --stage-tls-key together" in capsys.readouterr().err
    with pytest.raises(InvalidRequest, match="--tls-ca"):
        tls.channel_credentials(certs.directory / "nope.pem")
    assert cli_main(["up", "--tls-dir", str(certs.directory)]) == 2
    assert "add --tls" in capsys.readouterr().err


# --- `sdmesh up --tls` ---------------------------------------------------------------


@pytest.mark.processes
def test_sdmesh_up_tls_serves_a_generation_over_mutual_tls_on_every_hop(tiny_checkpoints, tmp_path, capsys):
    tls_dir, err = tmp_path / "tls", tmp_path / "up.err"
    with open(err, "w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sdmesh.client.cli", "up", "--model", str(tiny_checkpoints["sd2"]), "--port", "0",
             "--tls", "--tls-dir", str(tls_dir), "--log-dir", str(tmp_path / "logs"), "--metrics-base-port", "0",
             "--start-timeout", "240"],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
        try:
            address = process.stdout.readline().strip()
            printed = err.read_text()
            assert address, f"sdmesh up printed no address; its stderr:\n{printed}"
            certs = tls.LocalCertificates.at(tls_dir)

            # the printed client command works as printed
            hint = next(line for line in printed.splitlines() if "sdmesh generate PROMPT --server" in line)
            argv = shlex.split(hint.strip())[1:]
            argv[1] = "a lighthouse"
            out = tmp_path / "out"
            assert cli_main([*argv, "--steps", "2", "--seed", "3", "--output-dir", str(out), "--timeout", "60"]) == 0
            assert (out / "image_0.png").exists()
            with Client(address, credentials=client_credentials(certs), timeout=60) as client:
                assert client.generate("a cat", steps=2, seed=5).seed == 5
            with Client(address, timeout=HANDSHAKE_TIMEOUT) as plaintext, pytest.raises(GatewayError) as e:
                plaintext.generate("a cat", steps=2, seed=5)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE

            # every stage's own port is mutual TLS too, and its metrics https://
            lines = [line.split() for line in printed.splitlines() if line.startswith("  encoder ")]
            encoder = lines[0][1]
            assert health_status(encoder, credentials=client_credentials(certs)) == "SERVING"
            assert refused(encoder, client_credentials(certs, cert=False)) == grpc.StatusCode.UNAVAILABLE
            assert refused(encoder, None) == grpc.StatusCode.UNAVAILABLE
            top = next(line for line in printed.splitlines() if "live summary: sdmesh top" in line)
            capsys.readouterr()
            assert cli_main([*shlex.split(top.split(":", 1)[1])[1:], "--once"]) == 0
            assert "denoiser" in capsys.readouterr().out
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # `sdmesh up` stops the services it started
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def test_the_stack_certificate_protocol_matches_local_certificates(certs):
    from sdmesh.client import stack

    fields = {"directory", *tls.LOCAL_FILES}
    assert set(stack.StackCertificates.__annotations__) == fields
    assert stack.client_flags(certs)[::2] == ["--tls-ca", "--tls-cert", "--tls-key"]
    assert Path(stack.client_flags(certs)[1]) == certs.ca

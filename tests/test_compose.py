"""docker-compose.yml and the Dockerfile, checked without a Docker engine: every command is a real
`sdmesh` invocation, ports and addresses agree, and the gateway reaches every denoiser replica."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sdmesh.client.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"encoder": "encoder", "denoiser": "denoiser", "decoder": "decoder"}  # compose service → `sdmesh serve` name


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_image_runs_sdmesh_with_the_serve_extra():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert '".[serve]"' in dockerfile and "torch" not in dockerfile.split("FROM", 1)[1].lower()
    assert 'ENTRYPOINT ["sdmesh"]' in dockerfile


def test_four_services_from_one_image(services):
    assert set(services) == {"encoder", "denoiser", "decoder", "gateway"}
    assert {s["image"] for s in services.values()} == {"sdmesh:latest"}
    assert all(s["build"] == "." for s in services.values())


@pytest.mark.parametrize("name", ["encoder", "denoiser", "decoder", "gateway"])
def test_each_command_is_a_real_sdmesh_invocation(services, name, capsys):
    command = services[name]["command"]
    assert command[:2] == ["serve", STAGES.get(name, "gateway")]
    args = build_parser().parse_args(command)  # exits (fails the test) on an unknown option
    assert args.host == "0.0.0.0"
    with pytest.raises(SystemExit) as e:
        main([*command[:2], "--help"])
    assert e.value.code == 0 and "usage: sdmesh serve" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["encoder", "denoiser", "decoder", "gateway"])
def test_health_checks_probe_the_service_port_with_grpc_health(services, name):
    service = services[name]
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:3] == ["sdmesh", "health"]
    args = build_parser().parse_args(test[2:])
    assert args.address == f"127.0.0.1:{option(service['command'], '--port')}"


def test_the_gateway_addresses_agree_with_the_stage_ports(services):
    gateway = services["gateway"]["command"]
    for name in STAGES:
        host_port = option(gateway, f"--{name}").removeprefix("dns:///")
        assert host_port == f"{name}:{option(services[name]['command'], '--port')}"
    grpc_port, http_port = option(gateway, "--port"), option(gateway, "--http-port")
    assert services["gateway"]["ports"] == [f"{grpc_port}:{grpc_port}", f"{http_port}:{http_port}"]  # and the page
    assert set(services["gateway"]["depends_on"]) == set(STAGES)
    assert all(c == {"condition": "service_healthy"} for c in services["gateway"]["depends_on"].values())


def test_the_gateway_lists_every_denoiser_replica(services):
    # `--scale denoiser=N` makes N containers behind the DNS name `denoiser`; a dns:/// address is all of them.
    denoiser = services["denoiser"]
    assert (
        option(services["gateway"]["command"], "--denoiser")
        == f"dns:///denoiser:{option(denoiser['command'], '--port')}"
    )
    assert "container_name" not in denoiser and "ports" not in denoiser  # either would make --scale fail


def test_the_stages_queue_what_the_gateway_admits(services):
    inflight = int(option(services["gateway"]["command"], "--max-inflight"))
    for name in STAGES:
        assert int(option(services[name]["command"], "--max-queue")) >= inflight


def test_every_service_shares_the_model_volume(compose, services):
    assert "models" in compose["volumes"]
    for service in services.values():
        assert "models:/models" in service["volumes"]
        assert "SDMESH_MODEL" in service["environment"]

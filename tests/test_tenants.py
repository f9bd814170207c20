"""API keys, tenants and budgets at the gateway: who may call, how much each tenant may ask, what one request may.

Keys come from a file (one per line, with an optional tenant name and limits); a call without a
known key is UNAUTHENTICATED; a tenant past its requests in flight or its rate gets
RESOURCE_EXHAUSTED with a `retry-after`; the tenant travels to the denoiser, which shares its batch
fairly (tests/test_continuous_batching.py); metrics count requests and images by tenant. A request
past the server's work budget or largest side is INVALID_ARGUMENT naming the limit. Fake stages
behind a real gateway, in process (tests/test_gateway.py's).
"""

from __future__ import annotations

import threading

import grpc
import pytest
from conftest import wait_until
from test_gateway import FakeDenoiser

from sdmesh.client import Client, GatewayError
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving import gateway
from sdmesh.services.serving.tenants import QuotaExceeded, Tenants, TokenBucket, key_from_metadata

KEYS = """
# tenants of this gateway
sk-alpha acme inflight=1
sk-alpha-2 acme
sk-beta  beta rate=0.001 burst=2
sk-bare
"""


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(KEYS)
    return path


def test_the_keys_file_names_tenants_and_their_limits(keys_file):
    tenants = Tenants.from_file(keys_file, max_inflight=32)
    acme = tenants.authenticate([("authorization", "Bearer sk-alpha-2")])
    assert acme.name == "acme" and acme.inflight_limit == 1  # the tenant's limits, from its first line
    beta = tenants.authenticate([("x-api-key", "sk-beta")])
    assert beta.name == "beta" and beta.inflight_limit == 16 and beta.bucket.rate == 0.001  # half of max-inflight
    bare = tenants.authenticate([("authorization", "bearer sk-bare")])
    assert bare.name.startswith("key-") and "sk-bare" not in bare.name  # named by its hash, never by the key


@pytest.mark.parametrize(
    "line, message",
    [
        ("sk-a acme inflight=0", "inflight must be a positive whole number"),
        ("sk-a acme rate=fast", "rate must be a positive number"),
        ("sk-a acme colour=red", "expected KEY \\[TENANT\\]"),
        ("sk-a\nsk-a", "the same key is listed twice"),
        ("# nothing", "no keys in it"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_line(tmp_path, line, message):
    path = tmp_path / "keys.txt"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        Tenants.from_file(path, max_inflight=8)


def test_gateway_flags_turn_a_bad_keys_file_into_a_user_error(tmp_path):
    args = type("Args", (), {"api_keys": tmp_path / "missing.txt", "max_inflight": 8})()
    with pytest.raises(InvalidRequest, match="cannot read it"):
        gateway.tenants_from_args(args)


def test_unknown_and_missing_keys_are_unauthenticated(keys_file):
    tenants = Tenants.from_file(keys_file, max_inflight=8)
    for metadata in ([], [("authorization", "Bearer sk-nope")], [("authorization", "Basic sk-alpha")]):
        with pytest.raises(Exception, match="API key") as caught:
            tenants.authenticate(metadata)
        assert type(caught.value).__name__ == "Unauthenticated"
    assert key_from_metadata([("authorization", b"Bearer sk-alpha")]) == "sk-alpha"


def test_a_token_bucket_allows_its_burst_then_its_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # one token every half second
    now[0] += 0.5
    assert bucket.take() == 0.0


def test_an_open_gateway_serves_everyone_as_one_tenant(make_stack):
    stack = make_stack()
    assert stack.client.generate("a cat", steps=2, seed=1).images
    assert stack.service.tenants.required is False


def test_a_keyed_gateway_needs_a_key_on_every_rpc(make_stack, keys_file):
    stack = make_stack(tenants=Tenants.from_file(keys_file, max_inflight=16))
    for call in (lambda c: c.generate("a cat", steps=2, seed=1), lambda c: c.model_info()):
        with pytest.raises(GatewayError) as caught:
            call(stack.client)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in caught.value.message
        with Client(stack.address, api_key="sk-wrong") as wrong, pytest.raises(GatewayError) as caught:
            call(wrong)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(stack.address, api_key="sk-alpha") as good:
            assert call(good)


def test_the_tenant_reaches_the_denoiser(make_stack, keys_file):
    denoiser = FakeDenoiser()
    stack = make_stack([denoiser], tenants=Tenants.from_file(keys_file, max_inflight=16))
    with Client(stack.address, api_key="sk-beta") as client:
        client.generate("a cat", steps=2, seed=1)
    assert denoiser.requests[-1].tenant == "beta"


def test_a_tenant_past_its_requests_in_flight_is_refused_with_a_retry_hint(make_stack, keys_file):
    denoiser = FakeDenoiser(step_seconds=0.05)
    stack = make_stack([denoiser], tenants=Tenants.from_file(keys_file, max_inflight=16))
    with Client(stack.address, api_key="sk-alpha") as acme, Client(stack.address, api_key="sk-beta") as beta:
        running = threading.Thread(target=lambda: acme.generate("a slow cat", steps=40, seed=1))
        running.start()
        assert wait_until(lambda: denoiser.active == 1)
        # acme's other key: the same tenant, inflight=1
        with pytest.raises(GatewayError) as caught, Client(stack.address, api_key="sk-alpha-2") as again:
            again.generate("a cat", steps=2, seed=1)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "acme" in caught.value.message
        assert caught.value.retry_after == 1.0
        assert beta.generate("another tenant's cat", steps=2, seed=1).images  # other tenants are unaffected
        running.join(30)


def test_a_tenant_past_its_rate_is_told_when_to_retry(make_stack, keys_file):
    stack = make_stack(tenants=Tenants.from_file(keys_file, max_inflight=16))
    with Client(stack.address, api_key="sk-beta") as beta:
        for _ in range(2):  # its burst
            beta.generate("a cat", steps=1, seed=1)
        with pytest.raises(GatewayError) as caught:
            beta.generate("a cat", steps=1, seed=1)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests/s" in caught.value.message
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1


def test_metrics_count_requests_and_images_by_tenant(make_stack, keys_file):
    stack = make_stack(tenants=Tenants.from_file(keys_file, max_inflight=16))
    with Client(stack.address, api_key="sk-alpha") as acme:
        acme.generate("a cat", steps=1, seed=1, num_images=2)
    with pytest.raises(GatewayError):
        stack.client.generate("no key", steps=1, seed=1)
    registry = stack.service.metrics.registry
    ok = {"stage": "gateway", "tenant": "acme", "code": "OK"}
    # the gateway records a call as its stream closes, just after the client has its result
    assert wait_until(lambda: registry.get_sample_value("sdmesh_tenant_requests_total", ok) == 1)
    assert registry.get_sample_value("sdmesh_tenant_images_served_total", {"stage": "gateway", "tenant": "acme"}) == 2
    assert registry.get_sample_value("sdmesh_errors_total", {"stage": "gateway", "code": "UNAUTHENTICATED"}) == 1


def test_quota_is_released_when_a_request_ends(keys_file):
    tenants = Tenants.from_file(keys_file, max_inflight=16)
    acme = tenants.tenants["acme"]
    with tenants.admit(acme), pytest.raises(QuotaExceeded):
        tenants.acquire(acme)
    with tenants.admit(acme):  # free again
        pass


# --- the work budget ---------------------------------------------------------------------


def test_a_request_past_the_work_budget_is_invalid_argument_naming_the_limit(make_stack):
    stack = make_stack(max_work=100)
    with pytest.raises(GatewayError) as caught:
        stack.client.generate("a cat", steps=60, num_images=2, seed=1)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "120 image-steps" in caught.value.message and "--max-work" in caught.value.message
    assert stack.client.generate("a cat", steps=50, num_images=2, seed=1).images  # 100: within it


def test_a_side_past_the_largest_is_invalid_argument(make_stack):
    stack = make_stack(max_side=64)
    with pytest.raises(GatewayError) as caught:
        stack.client.generate("a cat", steps=1, height=128, width=32, seed=1)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "--max-side" in caught.value.message


def test_the_largest_request_the_contract_allows_is_refused_at_once_by_the_default_budget(make_stack):
    stack = make_stack()  # the fake model's native side is 32: it takes at most 256 a side by default
    with pytest.raises(GatewayError) as caught:
        stack.client.generate("a cat", steps=1000, num_images=64, height=4096, width=4096, seed=1, timeout=5)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "--max-side" in caught.value.message
    with pytest.raises(GatewayError) as caught:  # within the side, past the work
        stack.client.generate("a cat", steps=1000, num_images=8, height=64, width=64, seed=1, timeout=5)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "--max-work" in caught.value.message

"""sdmesh's light client: talks to a running gateway (or a stage) over gRPC; needs no JAX.

    from sdmesh.client import Client
    with Client("localhost:50051") as client:
        client.generate("an astronaut riding a horse", seed=0).images[0].save("out.png")

`Client`/`AsyncClient` call the gateway; `TextEncoderClient`, `DenoiserClient` and `DecoderClient`
call one stage each (numpy in and out).
"""

from sdmesh.client.client import AsyncClient, Client, Control, GatewayError, GenerateResult, Progress
from sdmesh.client.stages import DecoderClient, DenoiserClient, TextEncoderClient, wait_for_serving

__all__ = [
    "AsyncClient",
    "Client",
    "Control",
    "DecoderClient",
    "DenoiserClient",
    "GatewayError",
    "GenerateResult",
    "Progress",
    "TextEncoderClient",
    "wait_for_serving",
]

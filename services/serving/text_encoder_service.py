"""TextEncoder.Encode over gRPC: prompts → conditioning tensors, around `stages.TextEncoderStage`.

The prompts and, when asked, the negative prompts are encoded in ONE call of the stage
(prompts first), as the in-process stages do for `chain.generate`, so a gateway chaining the services
gets the in-process pipeline's numbers bit for bit.

Prompts take A1111's syntax (weights, BREAK, embeddings by name; `stages.TextEncoderStage`): each is tokenized
into 77-token chunks on the calling thread, where a bad prompt fails alone, and a request's texts are padded with
empty chunks to one length L, so its tensors are (P, L, D).

With --max-batch above 1, concurrent Encode calls share that call (`batching.Batcher`): each
request's texts are rows of one batch, every chunk of every text a row of one device call, padded
to a compiled bucket, and its texts come back to it with its own L and truncation notes. CLIP
encodes each chunk on its own, so a request's tensors do not depend on its batch-mates
(measured: tests/test_batching.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sdmesh.services.engine.stages import TextEncoderStage
from sdmesh.services.inputs import contract
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.inputs.tokenizer import PromptTokens, max_chunks
from sdmesh.services.serving import batching, server, wire
from sdmesh.services.serving.metrics import StageMetrics
from sdmesh.v1 import common_pb2, text_encoder_pb2, text_encoder_pb2_grpc
from sdmesh.v1.tensors import to_proto

MAX_PROMPTS = contract.MAX_IMAGES  # one row per prompt; the denoiser takes no more images than this


@dataclasses.dataclass(frozen=True)
class EncodeJob:
    prompts: list[str]
    negative_prompts: list[str]  # one per prompt when `unconditional`, else empty
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA name, text-encoder weight) for every text

    @property
    def unconditional(self) -> bool:
        return bool(self.negative_prompts)


def encode_job_from_proto(request: text_encoder_pb2.EncodeRequest) -> EncodeJob:
    """Check an EncodeRequest; raises InvalidRequest saying what to fix."""
    prompts, negatives = list(request.prompts), list(request.negative_prompts)
    contract.check_prompts(prompts, negatives)
    if negatives and not request.unconditional:
        raise InvalidRequest("negative_prompts are given but unconditional is false; set unconditional to encode them")
    if request.unconditional and not negatives:
        negatives = [""] * len(prompts)
    loras = contract.check_loras([wire.lora_choice(lora) for lora in request.loras])
    return EncodeJob(prompts, negatives, tuple((c.name, c.weight) for c in loras))


def encode_response_to_proto(job: EncodeJob, hidden: np.ndarray, removed: list[str]) -> text_encoder_pb2.EncodeResponse:
    """hidden (P [+ P], L, D): the prompts' rows then the negatives'; removed: per row, the truncated text."""
    p = len(job.prompts)
    response = text_encoder_pb2.EncodeResponse(cond=to_proto(hidden[:p]))
    if job.unconditional:
        response.uncond.CopyFrom(to_proto(hidden[p:]))
    for row, text in enumerate(removed):
        if text:
            response.truncated.add(prompt_index=row % p, removed_text=text, negative=row >= p)
    return response


class TextEncoderService(text_encoder_pb2_grpc.TextEncoderServicer):
    """max_batch: texts (rows: a prompt and its negative are two) per device call; 1 runs each call alone.
    batch_wait: seconds the oldest waiting call may wait for others to fill its batch.
    max_queue: calls that may wait (when batching; with max_batch 1 the server's DeviceQueue bounds them).
    metrics: where batches and device calls are recorded (the server records its RPCs there too)."""

    def __init__(
        self,
        stage: TextEncoderStage,
        model: str,
        *,
        max_batch: int = 1,
        batch_wait: float = 0.0,
        max_queue: int = contract.DEFAULT_MAX_QUEUE,
        metrics: StageMetrics | None = None,
    ):
        self.stage, self.model = stage, model
        self.metrics = metrics or StageMetrics("text_encoder")
        self.batcher = batching.Batcher(
            self.encode_rows,
            max_batch=max_batch,
            batch_wait=batch_wait,
            max_queue=max_queue,
            metrics=self.metrics,
            name="encoder",
        )

    def encode_rows(self, rows: list[PromptTokens]) -> tuple[list[np.ndarray], list[str]]:
        """One batch: (per text its hidden states (L, D) float32, per text the truncated text)."""
        hidden, _ = self.stage.encode_tokens(rows, self.batcher.buckets)
        return hidden, [row.removed_text for row in rows]

    def Encode(self, request, context):
        job = encode_job_from_proto(request)  # validated alone, first: a bad request must not fail a batch
        rows = self.stage.tokenize(job.prompts + job.negative_prompts)  # one L for the request's texts
        lease = self.stage.lease_loras(job.loras)  # held until the texts are encoded
        future = self.batcher.submit(self.stage.with_loras(rows, lease), is_active=context.is_active)
        hidden, removed = batching.wait(future, context.is_active)
        del lease
        return encode_response_to_proto(job, np.stack(hidden), list(removed))

    def ModelInfo(self, request, context):
        devices, mesh = server.device_facts(self.stage.mesh)
        return common_pb2.ModelInfo(
            service="TextEncoder",
            model=self.model,
            weights_dtype=self.stage.options.weights_dtype,
            activations_dtype=self.stage.options.activations_dtype,
            devices=devices,
            mesh=mesh,
            compiled_shapes=compiled_shapes(self.stage),
            model_facts=common_pb2.ModelFacts(
                max_length=self.stage.tokenizer.max_length, hidden_size=self.stage.hidden_size, max_images=MAX_PROMPTS
            ),
            batching=batching.info(self.batcher),
            adapters=[
                common_pb2.Adapter(
                    name=e.name, kind="embedding", rank=0 if e.vectors is None else len(e.vectors), error=e.error
                )
                for e in self.stage.embeddings
            ]
            + wire.lora_adapters_to_proto(self.stage.loras.info() if self.stage.loras else []),
        )

    def warm_up(self, batches: list[int]) -> None:
        """Compile encode for each batch of prompts with their negatives (classifier-free guidance), and each
        row count a batch is padded to."""
        for rows in warm_up_rows(batches, self.batcher.buckets):
            self.encode_rows(self.stage.tokenize(["warm-up"] * rows))

    def close(self) -> None:
        """Finish the calls waiting for the device, then stop batching."""
        self.batcher.stop()


def compiled_shapes(stage: TextEncoderStage) -> list[common_pb2.CompiledShape]:
    """The encoder's compiled programs: name and rows (77-token chunks) per call."""
    found = {(key[0], key[2][0][0]) for key in stage.programs.shapes}  # (name, treedef, (ids shape, dtype), …)
    return [common_pb2.CompiledShape(program=name, batch=rows) for name, rows in sorted(found)]


def warm_up_rows(batches: list[int], buckets: list[int]) -> list[int]:
    """Texts per device call to compile: each --shapes batch of prompts with its negatives, and every bucket."""
    return sorted({2 * b for b in batches} | set(buckets))


def stage_service(service: TextEncoderService, shapes: list[tuple[int, int, int]]) -> server.StageService:
    """shapes: (batch, height, width) to expect; the encoder reads only the batch, as prompts per call.

    Messages are sized for the most prompts a call may carry (MAX_PROMPTS, each with a negative) at the most chunks.
    """
    batches = sorted({b for b, _, _ in shapes})
    rows = 2 * MAX_PROMPTS
    chunk = service.stage.tokenizer.max_length
    length, width = max_chunks(chunk) * chunk, service.stage.hidden_size
    return server.StageService(
        name="sdmesh.v1.TextEncoder",
        servicer=service,
        add_to_server=text_encoder_pb2_grpc.add_TextEncoderServicer_to_server,
        device_methods=batching.device_methods(service.batcher, "Encode"),
        warm_up=lambda: service.warm_up(batches),
        max_message_bytes=max(rows * length * width * 4, rows * contract.MAX_PROMPT_CHARS * 4),
        metrics=service.metrics,
        stage=service.stage,
    )


def main(args: Any) -> int:
    # before loading: a typo should not cost a model load
    shapes = server.parse_shapes(args.shapes) or [(1, 0, 0)]
    batch = batching.options_from_args(args, max_rows=2 * MAX_PROMPTS)
    folder, options, load = server.load_setup(args)
    stage = TextEncoderStage.load(folder, options, load)
    service = TextEncoderService(stage, args.model, **batch)
    return server.serve(
        stage_service(service, shapes),
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        grace=args.drain_seconds,
        metrics_port=getattr(args, "metrics_port", None),
        tls=server.tls_from_args(args),
    )

"""rlhf.v1.PolicyService over gRPC: Generate, UpdateWeights and GetInfo on a PolicyEngine.

The servicer is registered before the model loads (health NOT_SERVING, calls UNAVAILABLE) and
gets its engine through `attach()` once loading is done, so a probe can tell "loading" from
"down".

The model work (loading, generate, the weight swap) runs on the servicer's one ComputeThread,
never on the gRPC worker threads (rlhf.compute: torch's OpenMP teams), one job at a time, so
each Generate sees one weight version. A weight upload is received and verified completely
(rlhf.weight_receiver.WeightAssembler) on the call's own thread, into a receive buffer the
engine hands out, while generation goes on; only the final swap (PolicyEngine.apply_weights)
is compute-thread work, and a broken or rejected upload never touches the served weights.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import grpc

from rlhf.compute import ComputeThread
from rlhf.errors import RpcError, check_caller, exhausted, handle_errors, invalid, unavailable
from rlhf.handlers import CONTROL, MethodLimits, MiB, add_service
from rlhf.protocol import POLICY_DESCRIPTOR, POLICY_SERVICE
from rlhf.server import Readiness, Registration
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from rlhf.weight_receiver import ChunkView, WeightAssembler, decode_chunk
from services.policy.config import PolicyServiceConfig
from services.policy.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    EngineLimits,
    PolicyEngine,
    SamplingParams,
)
from services.policy.validation import validate_request_id

log = logging.getLogger("rlhf.policy")

CHUNK_MESSAGE_BYTES = 16 * MiB
"""Largest WeightChunk message: the proto's 4 MiB of data, plus the first chunk's manifest (about
100 bytes per tensor), with room to spare."""
CONCURRENT_UPLOADS = 2
"""UpdateWeights streams at once: each holds a receive buffer the size of the model; two let a
retry start while a broken upload is still being torn down."""

_FINISH = {
    FINISH_STOP: policy_pb2.FINISH_REASON_STOP,
    FINISH_LENGTH: policy_pb2.FINISH_REASON_LENGTH,
}


def params_from_proto(params: policy_pb2.GenerationParams) -> SamplingParams:
    """The wire's knobs -> the engine's, keeping "unset" apart from "false"/0 where it matters."""
    return SamplingParams(
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=params.min_new_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        do_sample=params.do_sample if params.HasField("do_sample") else None,
        seed=params.seed if params.HasField("seed") else None,
        apply_chat_template=params.apply_chat_template,
    )


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """Serves one PolicyEngine; refuses calls with UNAVAILABLE until an engine is attached."""

    def __init__(
        self, engine: PolicyEngine | None = None, settings: PolicyServiceConfig | None = None
    ) -> None:
        """`settings`: the request limits (Generate's caps, the uploads' idle time and chunk
        count); without them, the engine's limits (else the defaults) and the default upload
        limits."""
        self.settings = settings or PolicyServiceConfig()
        if settings is None and engine is not None:
            self.limits = engine.limits
        else:
            self.limits = EngineLimits(
                max_new_tokens_cap=self.settings.max_new_tokens_cap,
                max_batch_size=self.settings.max_batch_size,
                max_prompt_chars=self.settings.max_prompt_chars,
            )
        self.readiness = Readiness()
        self.compute = ComputeThread("policy-compute")
        """Where the engine is built (`compute.run(PolicyEngine, ...)`) and does its work."""
        self._engine: PolicyEngine | None = None
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: PolicyEngine) -> None:
        """Hands over the loaded engine; from now on calls are served."""
        self._engine = engine
        self.readiness.set()

    @property
    def engine(self) -> PolicyEngine:
        if self._engine is None or not self.readiness.is_set():
            raise unavailable("model is still loading; retry when health reports SERVING")
        return self._engine

    @handle_errors
    def Generate(  # noqa: N802 - gRPC method name
        self, request: policy_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> policy_pb2.GenerateResponse:
        engine = self.engine
        validate_request_id(request.request_id)
        request_id = request.request_id or uuid.uuid4().hex[:16]
        started = time.monotonic()
        try:
            completions = self.compute.run(
                _generate, context, engine, list(request.prompts), params_from_proto(request.params)
            )
        except RpcError as err:
            log.warning(
                "generate refused",
                extra={"request_id": request_id, "code": err.code.name, "reason": err.message},
            )
            raise
        version = completions[0].weight_version
        reply = policy_pb2.GenerateResponse(
            weight_version=version, request_id=request_id, instance_id=engine.instance_id
        )
        for c in completions:
            reply.completions.append(
                policy_pb2.Completion(
                    prompt_token_ids=c.prompt_token_ids,
                    response_token_ids=c.response_token_ids,
                    response_logprobs=c.response_logprobs,
                    response_text=c.response_text,
                    finish_reason=_FINISH[c.finish_reason],
                    prompt_text=c.prompt_text,
                )
            )
        seconds = time.monotonic() - started
        tokens = sum(len(c.response_token_ids) for c in completions)
        log.info(
            "generated",
            extra={
                "request_id": request_id,
                "weight_version": version,
                "prompts": len(completions),
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            },
        )
        return reply

    @handle_errors
    def UpdateWeights(  # noqa: N802 - gRPC method name
        self,
        request_iterator: Iterator[policy_pb2.WeightChunk | ChunkView],
        context: grpc.ServicerContext,
    ) -> policy_pb2.UpdateWeightsResponse:
        engine = self.engine
        served = engine.weight_version
        assembler = WeightAssembler(engine.state_spec(), served, allocate=engine.receive_buffer)
        try:
            return self._update(engine, assembler, request_iterator, context)
        finally:
            engine.release_buffer(assembler.buffer)

    def _update(
        self,
        engine: PolicyEngine,
        assembler: WeightAssembler,
        request_iterator: Iterator[policy_pb2.WeightChunk | ChunkView],
        context: grpc.ServicerContext,
    ) -> policy_pb2.UpdateWeightsResponse:
        started = _receive(assembler, request_iterator, self.settings.max_upload_chunks)
        tensors = assembler.finish()
        if not context.is_active():
            raise RpcError(
                grpc.StatusCode.CANCELLED,
                f"the client went away; version {assembler.version} was not applied",
            )
        received = time.monotonic()
        count = self.compute.run(
            engine.apply_weights, tensors, assembler.version, backing=assembler.buffer
        )
        del tensors  # views into the receive buffer: served now, or the next upload's spare
        done = time.monotonic()
        seconds = done - (started or received)
        log.info(
            "weights updated",
            extra={
                "weight_version": assembler.version,
                "previous_version": assembler.served_version,
                "tensors": count,
                "bytes": assembler.received,
                "seconds": round(seconds, 3),
                "receive_s": round(received - (started or received), 3),
                "apply_s": round(done - received, 3),
                "mb_per_s": round(assembler.received / seconds / 1e6, 1) if seconds > 0 else None,
            },
        )
        return policy_pb2.UpdateWeightsResponse(
            version=assembler.version,
            bytes_received=assembler.received,
            tensors_updated=count,
            seconds=seconds,
            instance_id=engine.instance_id,
        )

    @handle_errors
    def GetInfo(  # noqa: N802 - gRPC method name
        self, request: common_pb2.GetInfoRequest, context: grpc.ServicerContext
    ) -> policy_pb2.PolicyInfo:
        info = self.engine.info()
        tok = info.tokenizer
        return policy_pb2.PolicyInfo(
            model=info.model,
            weight_version=info.weight_version,
            device=info.device,
            dtype=info.dtype,
            num_parameters=info.num_parameters,
            tokenizer=policy_pb2.TokenizerInfo(
                vocab_size=tok.vocab_size,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id,
                context_length=tok.context_length,
                has_chat_template=tok.has_chat_template,
            ),
            max_new_tokens_cap=info.limits.max_new_tokens_cap,
            max_batch_size=info.limits.max_batch_size,
            max_prompt_chars=info.limits.max_prompt_chars,
            instance_id=info.instance_id,
            engine=info.engine,
        )


def request_limits(servicer: PolicyServicer) -> dict[str, MethodLimits]:
    """Each method's request cap: Generate's follows from the servicer's limits (every prompt
    at max_prompt_chars, 4 bytes a character at most in UTF-8), a chunk from the proto's."""
    limits = servicer.limits
    prompt_bytes = 4 * limits.max_prompt_chars + 8  # + the field's tag and length
    return {
        "Generate": MethodLimits(max_bytes=limits.max_batch_size * prompt_bytes + 4096),
        "UpdateWeights": MethodLimits(
            max_bytes=CHUNK_MESSAGE_BYTES,
            idle_s=servicer.settings.upload_idle_s,
            max_concurrent=CONCURRENT_UPLOADS,
        ),
        "GetInfo": CONTROL,
    }


def add_policy_service(servicer: PolicyServicer, server: grpc.Server) -> None:
    """Registers the servicer with rlhf.handlers' self-decoding handlers. UpdateWeights' chunks
    are parsed by rlhf.weight_receiver.decode_chunk, which leaves their payload in the received
    message instead of copying it twice: the same wire format, a third less work per byte."""
    add_service(
        POLICY_DESCRIPTOR,
        servicer,
        server,
        request_limits(servicer),
        decoders={"UpdateWeights": decode_chunk},
    )


def servicers(servicer: PolicyServicer) -> list[Registration]:
    """What rlhf.server.run_service / build_server register for the policy service."""
    return [Registration(add_policy_service, servicer, POLICY_SERVICE)]


def _generate(
    context: grpc.ServicerContext,
    engine: PolicyEngine,
    prompts: list[str],
    params: SamplingParams,
) -> list:
    """Compute-thread work: generate, unless the caller gave up while the call was queued."""
    check_caller(context, "generation started")
    return engine.generate(prompts, params)


def _receive(
    assembler: WeightAssembler,
    request_iterator: Iterator[policy_pb2.WeightChunk | ChunkView],
    max_chunks: int,
) -> float | None:
    """Feeds the stream into the assembler; returns when its first chunk came (None: none).

    A stream the client breaks becomes CANCELLED; a chunk the assembler rejects its RpcError;
    both logged with the versions involved. Every chunk after the first must carry data, and a
    stream may have at most `max_chunks`, so an upload's length is bounded by its payload.
    """
    served = assembler.served_version
    started: float | None = None
    try:
        for index, chunk in enumerate(request_iterator):
            if started is None:
                started = time.monotonic()
            if index >= max_chunks:
                raise exhausted(
                    f"more than {max_chunks} chunks in one upload (--max-upload-chunks): "
                    "send bigger chunks"
                )
            assembler.feed(chunk)
            if index and not len(chunk.data):
                raise invalid(f"chunk {index} carries no data: every chunk after the first must")
    except grpc.RpcError:
        # The request iterator raises when the client cancels or its stream breaks.
        log.warning(
            "weight update broken by the client",
            extra={
                "weight_version": served,
                "new_version": assembler.version,
                "bytes_received": assembler.received,
            },
        )
        raise RpcError(
            grpc.StatusCode.CANCELLED,
            f"the UpdateWeights stream was broken by the client after "
            f"{assembler.received} bytes; version {assembler.version} was not applied and "
            f"version {served} keeps serving",
        ) from None
    except RpcError as err:
        log.warning(
            "weight update rejected",
            extra={
                "weight_version": served,
                "new_version": assembler.version,
                "code": err.code.name,
                "reason": err.message,
            },
        )
        raise
    return started

"""A typed client of the trainer's control API (TrainerService).

Every failed call raises `TrainerError`, which names the trainer's address, the status and the
trainer's own message, or says that nothing answers there: callers see no gRPC errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from rlhf.channels import open_channel
from rlhf.command_errors import CommandError
from rlhf.config.security import ClientConfig
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.orchestrator.rewards import EndpointSpec

T = TypeVar("T")
HINT = (
    "is `rlhf trainer serve` running there? (--trainer / RLHF_TRAINER; a trainer serving TLS "
    "also needs --tls-ca, --tls-cert, --tls-key)"
)
"""What to check when no trainer answers at an address."""
_UNREACHED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class TrainerError(CommandError):
    """A trainer call failed. `code` is the status's name (e.g. "NOT_FOUND"), `details` the
    trainer's message; the error's text is one line for the user."""

    def __init__(self, address: str, code: str, details: str, reached: bool = True) -> None:
        if reached:
            text = f"trainer at {address}: {code}: {details}"
        else:
            text = f"no trainer service answers at {address} ({code}): {HINT}"
        super().__init__(text)
        self.address = address
        self.code = code
        self.details = details


class TrainerClient:
    def __init__(
        self, address: str, timeout_s: float = 30.0, client: ClientConfig | None = None
    ) -> None:
        """`client`: TLS and token of the channel (default: plaintext, loopback only); TLS or
        token files that cannot work raise CommandError naming the flag."""
        self.address = address
        try:
            self.channel = open_channel(address, client)
        except ValueError as err:  # TlsConfigError, AuthConfigError
            raise CommandError(str(err)) from None
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)
        self.timeout_s = timeout_s

    def start(self, request: trainer_pb2.StartRunRequest) -> trainer_pb2.RunStatus:
        return self._call(lambda: self.stub.StartRun(request, timeout=self.timeout_s))

    def get(self, run_id: str = "") -> trainer_pb2.RunStatus:
        request = trainer_pb2.GetRunRequest(run_id=run_id)
        return self._call(lambda: self.stub.GetRun(request, timeout=self.timeout_s))

    def watch(self, run_id: str = "", from_step: int = 1) -> Iterator[trainer_pb2.StepMetrics]:
        """The WatchRun stream: STEP rows from from_step, PROGRESS messages, and a last END
        message with the run's terminal state."""
        # No deadline: a run is watched for as long as it goes on.
        request = trainer_pb2.WatchRunRequest(run_id=run_id, from_step=from_step)
        stream = self._call(lambda: self.stub.WatchRun(request))
        try:
            while True:
                message = self._call(lambda: next(stream, None))
                if message is None:
                    return
                yield message
        finally:
            stream.cancel()  # a caller that stops early ends the call at once

    def stop(self, run_id: str = "") -> trainer_pb2.RunStatus:
        """Asks the run to stop; answers at once (STOPPING). `watch` ends when it has. An empty
        run_id stops the latest run, named explicitly (the trainer refuses an empty one)."""
        request = trainer_pb2.StopRunRequest(run_id=run_id or self.get().run_id)
        return self._call(lambda: self.stub.StopRun(request, timeout=self.timeout_s))

    def swap(self, run_id: str, endpoints: list[str]) -> trainer_pb2.SetRewardEndpointsResponse:
        specs = [EndpointSpec.parse(e) for e in endpoints]
        request = trainer_pb2.SetRewardEndpointsRequest(
            run_id=run_id or self.get().run_id,  # the latest, named: the trainer needs a name
            rewards=[
                trainer_pb2.RewardEndpoint(address=s.address, weight=s.weight, name=s.name)
                for s in specs
            ],
        )
        return self._call(lambda: self.stub.SetRewardEndpoints(request, timeout=self.timeout_s))

    def close(self) -> None:
        self.channel.close()

    def _call(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
            reached = code not in _UNREACHED or self._answers()
            raise TrainerError(self.address, code.name, details, reached) from err

    def _answers(self) -> bool:
        """Whether a server answers at the address now (after UNAVAILABLE or a deadline: a
        trainer that is up said so itself, e.g. while shutting down)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=0.5)
        except grpc.FutureTimeoutError:
            return False
        return True

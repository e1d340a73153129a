"""A typed client of the trainer's control API (TrainerService)."""

from __future__ import annotations

from collections.abc import Iterator

from rlhf.channels import open_channel
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.orchestrator.rewards import EndpointSpec


class TrainerClient:
    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.channel = open_channel(address)
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)
        self.timeout_s = timeout_s

    def start(self, request: trainer_pb2.StartRunRequest) -> trainer_pb2.RunStatus:
        return self.stub.StartRun(request, timeout=self.timeout_s)

    def get(self, run_id: str = "") -> trainer_pb2.RunStatus:
        return self.stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id), timeout=self.timeout_s)

    def watch(self, run_id: str = "", from_step: int = 1) -> Iterator[trainer_pb2.StepMetrics]:
        # No deadline: a run is watched for as long as it goes on.
        request = trainer_pb2.WatchRunRequest(run_id=run_id, from_step=from_step)
        return self.stub.WatchRun(request)

    def stop(self, run_id: str = "", timeout_s: float = 900.0) -> trainer_pb2.RunStatus:
        # StopRun returns once the step in progress and the checkpoint are done.
        return self.stub.StopRun(trainer_pb2.StopRunRequest(run_id=run_id), timeout=timeout_s)

    def swap(self, run_id: str, endpoints: list[str]) -> trainer_pb2.SetRewardEndpointsResponse:
        specs = [EndpointSpec.parse(e) for e in endpoints]
        request = trainer_pb2.SetRewardEndpointsRequest(
            run_id=run_id,
            rewards=[
                trainer_pb2.RewardEndpoint(address=s.address, weight=s.weight, name=s.name)
                for s in specs
            ],
        )
        return self.stub.SetRewardEndpoints(request, timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()

"""`rlhf k8s render|apply|status|swap-reward`. Import-light: the `kubernetes` client and gRPC are
imported inside run()."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from rlhf.config import add_dataclass_arguments, from_args
from rlhf.config.security import ClientConfig
from rlhf.defaults import REWARD_PORT, TRAINER_PORT
from tools.k8s import manifests

FIELD_MANAGER = "rlhf"
PART_OF = "app.kubernetes.io/part-of=rlhf"
_Rendered = TypeVar("_Rendered")


def _add_overlay(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overlay",
        required=True,
        help="deploy/k8s/overlays/NAME: cpu, gpu, reward-swap, vllm or gpu-vllm",
    )


def _add_namespace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace", "-n", default="", help="namespace (default: the kubeconfig context's)"
    )


def _add_context(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", default=None, help="kubeconfig context (default: current)")


def _api_client(context: str | None) -> tuple[Any, str]:
    """An ApiClient from the kubeconfig (or the in-cluster service account) and its namespace."""
    from kubernetes import client, config

    try:
        config.load_kube_config(context=context)
        contexts, active = config.list_kube_config_contexts()
        if context:
            active = next(c for c in contexts if c["name"] == context)
        namespace = active.get("context", {}).get("namespace") or "default"
    except config.ConfigException:
        config.load_incluster_config()
        path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        with open(path) as f:
            namespace = f.read().strip()
    return client.ApiClient(), namespace


def _rendered(render: Callable[[str], _Rendered], overlay: str) -> _Rendered | None:
    """The overlay rendered (as text or objects), or None once a bad overlay's error has been
    printed."""
    try:
        return render(overlay)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return None


class Render:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        _add_overlay(parser)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        text = _rendered(manifests.render, args.overlay)
        if text is None:
            return 1
        sys.stdout.write(text)
        return 0


class Apply:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        _add_overlay(parser)
        _add_namespace(parser)
        _add_context(parser)
        parser.add_argument(
            "--force-conflicts",
            action="store_true",
            help="take over fields another manager owns (server-side apply's --force-conflicts)",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="server-side dry run: validate, change nothing"
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from kubernetes import dynamic
        from kubernetes.client.exceptions import ApiException

        objects = _rendered(manifests.render_objects, args.overlay)
        if objects is None:
            return 1
        api, namespace = _api_client(args.context)
        namespace = args.namespace or namespace
        dyn = dynamic.DynamicClient(api)
        extra: dict[str, Any] = {"field_manager": FIELD_MANAGER}
        if args.force_conflicts:
            extra["force_conflicts"] = True
        if args.dry_run:
            extra["dry_run"] = "All"
        failed = 0
        for obj in manifests.apply_order(manifests.with_namespace(objects, namespace)):
            resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            ns = obj["metadata"].get("namespace") if resource.namespaced else None
            try:
                resource.server_side_apply(body=obj, namespace=ns, **extra)
            except ApiException as err:
                failed += 1
                print(f"{manifests.key(obj)}: {err.status} {err.reason}", file=sys.stderr)
                continue
            suffix = " (dry run)" if args.dry_run else ""
            print(f"{manifests.key(obj)} serverside-applied in {namespace}{suffix}")
        return 1 if failed else 0


class Status:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        _add_namespace(parser)
        _add_context(parser)
        parser.add_argument(
            "--trainer",
            default="",
            help="trainer host:port (e.g. after "
            f"`kubectl port-forward svc/trainer {TRAINER_PORT}`): also show the run's step",
        )
        parser.add_argument("--run-id", default="", help="the run (default: the latest)")
        add_dataclass_arguments(parser, ClientConfig)  # the trainer's TLS and token

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from kubernetes import client

        api, namespace = _api_client(args.context)
        namespace = args.namespace or namespace
        pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=PART_OF)
        rows = manifests.pod_rows(pods.items)
        print(f"{'POD':<40} {'PHASE':<10} {'READY':<6} RESTARTS")
        for name, phase, ready, restarts in rows:
            print(f"{name:<40} {phase:<10} {ready:<6} {restarts}")
        if not rows:
            print(f"(no pods labelled {PART_OF} in {namespace})")
        if args.trainer:
            return _run_status(args.trainer, args.run_id, from_args(ClientConfig, args))
        return 0


def _run_status(address: str, run_id: str, security: ClientConfig) -> int:
    from rlhf.v1 import trainer_pb2
    from services.trainer.api.client import TrainerClient

    trainer = TrainerClient(address, timeout_s=10.0, client=security)
    try:
        status = trainer.get(run_id)  # a failure is a TrainerError: rlhf prints its one line
    finally:
        trainer.close()
    state = trainer_pb2.RunState.Name(status.state).removeprefix("RUN_STATE_")
    print(f"run {status.run_id}: {state}, step {status.step} / {status.total_steps}")
    for r in status.rewards:
        print(f"  reward {r.name} @ {r.address} x {r.weight:g}")
    return 0


class SwapReward:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "endpoints",
            nargs="+",
            metavar="[NAME@]ADDR[=WEIGHT]",
            help="reward sources as the trainer reaches them in the cluster, e.g. reward-b, "
            f"reward-b:{REWARD_PORT}=0.5, or dns:///reward-b for every replica behind a headless "
            f"Service (port default {REWARD_PORT})",
        )
        parser.add_argument(
            "--trainer",
            required=True,
            help=f"trainer host:port reachable from here (trainer:{TRAINER_PORT} in the cluster; "
            f"localhost:{TRAINER_PORT} through `kubectl port-forward svc/trainer {TRAINER_PORT}`)",
        )
        parser.add_argument("--run-id", default="", help="the run (default: the latest)")
        add_dataclass_arguments(parser, ClientConfig)  # the trainer's TLS and token

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from services.trainer.api.client import TrainerClient

        endpoints = [manifests.with_default_port(e) for e in args.endpoints]
        trainer = TrainerClient(args.trainer, client=from_args(ClientConfig, args))
        try:
            reply = trainer.swap(args.run_id, endpoints)  # TrainerError: rlhf prints it
        finally:
            trainer.close()
        names = ", ".join(f"{r.name} @ {r.address} x {r.weight:g}" for r in reply.rewards)
        print(f"rewards from step {reply.effective_from_step}: {names}")
        return 0

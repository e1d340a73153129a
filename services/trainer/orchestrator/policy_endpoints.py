"""What run.policy names: one policy service, a list of replicas, or a DNS name.

`HOST:PORT` is one service (GrpcPolicy); `HOST:PORT,HOST:PORT[,...]` and `dns:///HOST:PORT`
are replicas of one policy (policy_pool.PolicyPool). A DNS name stands for every address it
resolves to when it is resolved: a Kubernetes headless Service, a compose service name.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.defaults import DNS_SCHEME
from rlhf.logs import quote
from services.trainer.orchestrator.fanout import split_host_port


def _checked(address: str) -> None:
    """ValueError naming `address` as a policy address unless it is HOST:PORT, port 0 refused
    (a policy is always dialled; in-process reward sources use port 0 as a name)."""
    try:
        _, port = split_host_port(address)
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"policy address {quote(address)}: expected HOST:PORT")


@dataclass(frozen=True)
class PolicyEndpoints:
    """A run.policy spec, parsed: one address, a list of replicas, or a DNS name."""

    addresses: tuple[str, ...] = ()
    """The HOST:PORT addresses given (one: a single service; empty with `dns`)."""
    dns: str = ""
    """HOST:PORT of a dns:/// spec: every address HOST resolves to is a replica."""

    @classmethod
    def parse(cls, spec: str) -> PolicyEndpoints:
        """ValueError (naming the bad part) unless `spec` is one of the three forms."""
        if spec.startswith(DNS_SCHEME):
            target = spec.removeprefix(DNS_SCHEME)
            _checked(target)
            return cls(dns=target)
        addresses = tuple(spec.split(","))
        for address in addresses:
            _checked(address)
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"policy {quote(spec)}: an address is listed twice")
        return cls(addresses=addresses)

    @property
    def pooled(self) -> bool:
        """Whether a PolicyPool serves it (a list or a DNS name), not one GrpcPolicy."""
        return bool(self.dns) or len(self.addresses) > 1

    @property
    def allowed(self) -> list[str]:
        """The HOST:PORT addresses an allow-list checks (a DNS spec: its HOST:PORT)."""
        return [self.dns] if self.dns else list(self.addresses)

    def __str__(self) -> str:
        return DNS_SCHEME + self.dns if self.dns else ",".join(self.addresses)

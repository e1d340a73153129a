"""One replica of a PolicyPool as the pool knows it."""

from __future__ import annotations

from dataclasses import dataclass

from services.trainer.orchestrator.peers import PolicyTransport


@dataclass
class Replica:
    """One policy service of the pool, as the pool knows it."""

    address: str
    transport: PolicyTransport
    instance: str = ""
    """The instance last seen answering ("" until one answered)."""
    version: int = -1
    """The weight version that instance was last seen serving (-1: unknown)."""
    ours: bool = False
    """Whether that instance holds this run's weights (some version): a partial push is right
    for it only then."""
    reachable: bool = True
    attempted: int = -1
    """The last version sent to that instance (what it needed: everything, or the changed
    weights when it held ours): a push whose answer was lost may still have landed."""
    why: str = ""
    """Why it was last left out (for the log)."""
    served_run: bool = False
    """Whether it was ever ready in this run (a first admission is not a re-admission)."""

    def ready(self, version: int) -> bool:
        return self.reachable and self.ours and self.version == version

    def state(self, version: int) -> str:
        if not self.reachable:
            return "unreachable"
        return "ready" if self.ready(version) else "needs-weights"

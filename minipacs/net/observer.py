"""What the network layer tells whoever watches it (metrics), without knowing who that is."""

from __future__ import annotations


class Observer:
    """Receives association and DIMSE events; this base class ignores them all."""

    def association_accepted(self) -> None:
        """An association was established."""

    def association_rejected(self, reason: str) -> None:
        """An association was refused (A-ASSOCIATE-RJ), with a short reason."""

    def association_ended(self, received: int, sent: int) -> None:
        """An established association ended, after moving these many bytes each way."""

    def operation(self, name: str, status: int, seconds: float) -> None:
        """A DIMSE operation finished with its final status."""

"""What an algorithm designer plugs in: aggregation (server) policies, composed with `chain`."""

from engine.core.updates import Updates
from policies.base import Aggregator, chain

__all__ = ["Aggregator", "Updates", "chain"]

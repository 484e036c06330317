"""What an algorithm designer plugs in: aggregation (server) policies, composed with `chain`."""

from policies.base import Aggregator, Updates, chain

__all__ = ["Aggregator", "Updates", "chain"]

"""The protocol registry: every way a run can be organised, as a plugin.

A protocol is a declaration (engine/protocols/base.py `ProtocolSpec`): which config keys
select it, the parts (plugin kinds and world models) it consumes, and the runner that wires
its world, pools and round loop. Today's keys select it (`mode`, `server.mode`, `gossip.mode`,
a sampling consensus such as `consensus: modest`). A new protocol is a factory returning its
`ProtocolSpec`, in a module here, and one line below.
"""

from __future__ import annotations

from engine.core.config import ExperimentConfig
from engine.core.errors import ConfigError
from engine.core.plugins import Registry
from engine.protocols import federated, peers
from engine.protocols.base import ProtocolSpec, register_users
from policies.asynchronous import ServerRule
from policies.consensus import Consensus


def _is_protocol(factory) -> str | None:
    return None if callable(factory) else "is not a factory of a ProtocolSpec"


PROTOCOLS: Registry[ProtocolSpec] = Registry("protocol", {
    "sync": federated.sync_fl,
    "fedasync": federated.fedasync,
    "fedbuff": federated.fedbuff,
    "fedfix": federated.fedfix,
    "fedcompass": federated.fedcompass,
    "async": federated.async_fl,
    "sync_gossip": peers.sync_gossip,
    "async_gossip": peers.async_gossip,
    "modest": peers.modest,
}, check=_is_protocol)

# in registration order: the matrix's columns
ALL: list[ProtocolSpec] = [factory() for factory in PROTOCOLS.entries.values()]
register_users([p for p in ALL if p.example is not None])


def in_matrix() -> list[ProtocolSpec]:
    """The protocols with an example config: the compatibility matrix's columns."""
    return [p for p in ALL if p.example is not None]


def protocol_of(cfg: ExperimentConfig, server: ServerRule, consensus: Consensus) -> ProtocolSpec:
    """The protocol today's keys select; exactly one does (the asynchronous catch-all only
    when no named rule matches)."""
    chosen = [p for p in ALL if p.selects(cfg, server, consensus)]
    named = [p for p in chosen if p.example is not None]
    if len(named) == 1:
        return named[0]
    if not named and len(chosen) == 1:
        return chosen[0]
    found = ", ".join(p.label for p in chosen) or "none"
    raise ConfigError(f"mode={cfg.mode}: these keys select {found}; exactly one protocol must "
                      "match (see engine/protocols)")

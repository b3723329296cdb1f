"""Coordinator replicas: several coordinator processes serving one network.

PostgreSQL is the only source of truth; NATS carries messages between replicas:

- ``link``: one NATS connection per replica (reconnects forever, tells its users);
- ``bus``: the change-event bus over NATS (``loom.events.<type>``), same interface as the
  in-process :class:`loom.coordinator.bus.EventBus`;
- ``sessions``: which replica holds each agent's WebSocket (``agent_sessions``), with an
  epoch bumped on every (re)connect that fences a stale replica's writes;
- ``router``: commands for an agent held by another replica travel as NATS requests to
  ``loom.replica.<replica_id>.cmd``; the reply is the agent's acknowledgement.

The embedded default (``loom up`` on SQLite) is one process and uses none of the NATS
parts; it still records agent sessions (one upsert per handshake), so the fencing code
path is the same everywhere. docs/replicas.md explains the design.
"""

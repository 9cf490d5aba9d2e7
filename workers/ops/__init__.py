"""Operator tooling, not worker runtime: the `fleet` command (workers.ops.fleet) and the embedded nats-server
(workers.ops.broker)."""

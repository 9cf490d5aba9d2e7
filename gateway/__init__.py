"""The fleet's front door: one OpenAI-compatible HTTP endpoint for every model, forwarded over NATS.

`python -m gateway` (or `make gateway`) serves `/v1/models`, `/v1/chat/completions`, `/v1/completions` and
`/v1/embeddings` on GATEWAY_ADDR, plus `/health` and `/health/ready`. It holds no model and no state of its own:
what models exist comes from the monitor's discovery code (Feed + Registry, run in-process), and every request goes
to the model's public NATS subject, so it is queued in JetStream like any other caller's. Several gateways can run
behind one load balancer.
"""

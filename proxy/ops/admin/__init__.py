"""The admin endpoint: /metrics, /healthz, /readyz, /pool and a status page."""

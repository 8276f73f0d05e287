"""Operating a fleet: Prometheus metrics (metrics.py), operator logs (logs.py), the job a
thread works for (context.py) and the read-only status page (web/)."""

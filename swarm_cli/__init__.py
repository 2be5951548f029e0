"""`swarm`: the Swarm Portal command line, a client of the REST API and /v2 (no Django)."""

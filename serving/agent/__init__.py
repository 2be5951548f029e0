"""The worker agent (`swarm-worker`): runs on each GPU server. Never imports Django."""

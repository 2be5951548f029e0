"""What the portal and the worker share, with no Django: the inference protocol's datatypes and
signatures, model archives and their loading, pre/post-processing steps, and the agent messages.

Both distributions ship this package: swarm-portal (the web portal) and swarm-worker (agent and
replica server, `worker/pyproject.toml`). Nothing here imports Django, Celery, Channels or DRF, and
torch, onnx and onnxruntime are imported only inside the functions that need them.
"""

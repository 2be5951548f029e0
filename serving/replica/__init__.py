"""The replica server: one process serves one model version over the Open Inference Protocol v2.

Layout (transport -> protocol core -> model):
- `codec` and `datatypes`: the OIP REST codec, independent of any transport (numpy only);
  the gateway may reuse them.
- `batching` and `stats`: pure decision and bookkeeping modules (no torch, no asyncio).
- `runner`: loads the torch artifact and runs one forward pass on numpy arrays.
- `engine`: the asyncio side of the dynamic batcher and its one model worker thread.
- `app`: the plain ASGI application (routing, auth, responses).
- `server`: uvicorn, signals, drain; `__main__`: the command line.

Nothing here imports Django. This module imports nothing so that importing the codec
stays cheap.
"""

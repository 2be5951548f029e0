"""The inference gateway: Open Inference Protocol v2 under /v2, beside Django (no Django here)."""

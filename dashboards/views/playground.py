"""Playground: call a deployment from the browser with the portal session.

A tensor model gets a JSON request form for `/v2/models/NAME/infer`; a generative one
(hf_causal_lm) a chat that streams its answer (static/js/playground_chat.js). The page
learns which from `kinds`: {deployment name: "tensor" | "chat"}.
"""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from dashboards.views.common import viewer_page
from serving.models import Deployment

# Formats whose versions generate text: the page offers them a chat, not a tensor form.
CHAT_FORMATS = frozenset({"hf_causal_lm"})


def example_request(signature: dict[str, Any]) -> dict[str, Any]:
    """Return an OIP request of zeros shaped by the signature (variable dims set to 1)."""
    inputs = []
    for spec in signature.get("inputs", []):
        shape = [1 if dim == -1 else int(dim) for dim in spec.get("shape", [])]
        count = 1
        for dim in shape:
            count *= dim
        zero: Any = False if spec.get("datatype") == "BOOL" else (
            "" if spec.get("datatype") == "BYTES" else 0)
        inputs.append({"name": spec.get("name", ""), "datatype": spec.get("datatype", "FP32"),
                       "shape": shape, "data": [zero] * min(count, 4096)})
    return {"inputs": inputs}


@viewer_page
def playground(request: HttpRequest) -> HttpResponse:
    deployments = Deployment.objects.filter(deleting=False).select_related("version")
    examples = {d.name: json.dumps(example_request(d.version.served_signature), indent=2)
                for d in deployments}
    kinds = {d.name: "chat" if d.version.format in CHAT_FORMATS else "tensor"
             for d in deployments}
    return render(request, "dashboards/playground.html",
                  {"deployments": deployments, "examples": examples, "kinds": kinds,
                   "selected": request.GET.get("deployment", "")})

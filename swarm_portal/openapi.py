"""Keep /api/schema/ true: the error answers every operation can give, closed request bodies,
and the plain Django views DRF cannot see (artifact download, the agent API).

A drf-spectacular postprocessing hook (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]).
The agent's bodies are described from the same dataclasses the agent and the portal use
(swarm_protocol.agent_messages), so this file cannot drift from them.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from drf_spectacular.openapi import AutoSchema

from swarm_protocol import agent_messages as protocol

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {
    "type": "object",
    "description": "every refusal: a message for people, field details for 400s",
    "required": ["error"],
    "properties": {"error": {"type": "string"},
                   "fields": {"type": "object", "additionalProperties": True}},
}
# Status -> why; which operations can answer it is decided in _error_codes.
ERROR_REASONS = {
    "400": "the request is malformed (body, query string or a value out of bounds)",
    "401": "no valid credentials",
    "403": "these credentials may not do this",
    "404": "not found",
    "413": "the body is too large",
    "415": "the body is not JSON",
}
AGENT_TAG = ["agent"]
PORTAL_SECURITY = [{"knoxApiToken": []}, {"cookieAuth": []}]


class PortalAutoSchema(AutoSchema):
    """AutoSchema that documents a list action a view answers whole as a plain array.

    A view names those actions in `unpaged_actions`; spectacular would otherwise document
    every list action of a view with a paginator as paged.
    """

    def _get_paginator(self) -> Any:
        if getattr(self.view, "action", None) in getattr(self.view, "unpaged_actions", ()):
            return None
        return super()._get_paginator()


def postprocess_schema(result: dict[str, Any], generator: Any, request: Any,
                       public: bool) -> dict[str, Any]:
    """Add the error answers, close JSON request bodies, add the non-DRF paths."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    _close_request_bodies(result)
    result.setdefault("paths", {}).update(_extra_paths(schemas))
    schemes = result["components"].setdefault("securitySchemes", {})
    schemes.setdefault("nodeSecret", {"type": "http", "scheme": "bearer",
                                      "description": "a node's secret, from registration"})
    for path, item in result["paths"].items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "patch", "delete"):
                _add_error_responses(path, method, operation)
    return result


def _error_codes(path: str, method: str, operation: dict[str, Any]) -> list[str]:
    codes = ["400", "401", "403"]
    if "{" in path:
        codes.append("404")
    if "requestBody" in operation:
        codes += ["413", "415"]
    if path == protocol.REGISTER_PATH:  # authenticated by the join token in the body
        codes.remove("401")
    return codes


def _add_error_responses(path: str, method: str, operation: dict[str, Any]) -> None:
    responses = operation.setdefault("responses", {})
    for code in _error_codes(path, method, operation):
        documented = responses.setdefault(code, {"description": ERROR_REASONS[code]})
        documented["content"] = {"application/json": {"schema": ERROR_REF}}


def _close_request_bodies(result: dict[str, Any]) -> None:
    """Mark JSON request components closed: StrictFieldsMixin refuses unknown keys."""
    schemas = result["components"]["schemas"]
    for item in result.get("paths", {}).values():
        for operation in item.values():
            content = operation.get("requestBody", {}).get("content", {}) if isinstance(
                operation, dict) else {}
            ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
            name = ref.rsplit("/", 1)[-1]
            if name in schemas and schemas[name].get("type") == "object":
                schemas[name]["additionalProperties"] = False


# --- paths DRF does not know -------------------------------------------------------------

def _json_body(ref_name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{ref_name}"}}}}


def _json_answer(description: str, ref_name: str | None = None) -> dict[str, Any]:
    if ref_name is None:
        return {"description": description}
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{ref_name}"}}}}


def _octet_stream(description: str) -> dict[str, Any]:
    return {"description": description, "headers": {
        "X-Artifact-SHA256": {"schema": {"type": "string"}},
        "Content-Length": {"schema": {"type": "integer"}}},
        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}}}


def _extra_paths(schemas: dict[str, Any]) -> dict[str, Any]:
    for message in (protocol.RegisterRequest, protocol.RegisterResponse,
                    protocol.HeartbeatRequest, protocol.HeartbeatResponse):
        message_schema(message, schemas)
    node = [{"nodeSecret": []}]
    version_number = {"name": "number", "in": "path", "required": True,
                      "schema": {"type": "integer", "minimum": 0, "maximum": 999_999_999}}
    model_name = {"name": "model_name", "in": "path", "required": True,
                  "schema": {"type": "string"}}
    sha256 = {"name": "sha256", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/api/models/{model_name}/versions/{number}/artifact": {"get": {
            "operationId": "models_versions_artifact_retrieve", "tags": ["models"],
            "security": PORTAL_SECURITY,
            "summary": "Download a version's artifact (streamed; sha256 in a header)",
            "parameters": [model_name, version_number],
            "responses": {"200": _octet_stream("the artifact file")}}},
        protocol.REGISTER_PATH: {"post": {
            "operationId": "agent_register", "tags": AGENT_TAG, "security": [],
            "summary": "A worker joins with a join token; answers its node secret once",
            "requestBody": _json_body("RegisterRequest"),
            "responses": {"201": _json_answer("registered", "RegisterResponse")}}},
        protocol.HEARTBEAT_PATH: {"post": {
            "operationId": "agent_heartbeat", "tags": AGENT_TAG, "security": node,
            "summary": "A worker's devices and replicas in; the replicas it should run out",
            "requestBody": _json_body("HeartbeatRequest"),
            "responses": {"200": _json_answer("what to run", "HeartbeatResponse")}}},
        protocol.DEREGISTER_PATH: {"post": {
            "operationId": "agent_deregister", "tags": AGENT_TAG, "security": node,
            "summary": "A worker leaves: the node goes offline",
            "responses": {"204": _json_answer("gone")}}},
        protocol.ARTIFACT_PATH: {"get": {
            "operationId": "agent_artifact", "tags": AGENT_TAG, "security": node,
            "summary": "A worker downloads an artifact by its sha256",
            "parameters": [sha256],
            "responses": {"200": _octet_stream("the artifact file")}}},
    }


def message_schema(message: type, schemas: dict[str, Any]) -> dict[str, Any]:
    """Register the JSON schema of a protocol dataclass (and nested ones); return its $ref."""
    name = message.__name__
    if name not in schemas:
        hints = typing.get_type_hints(message)
        properties, required = {}, []
        schemas[name] = {"type": "object", "properties": properties}
        for spec in dataclasses.fields(message):
            properties[spec.name] = _type_schema(hints[spec.name], spec.metadata, schemas)
            if spec.default is dataclasses.MISSING and (
                    spec.default_factory is dataclasses.MISSING):
                required.append(spec.name)
        if required:
            schemas[name]["required"] = required
    return {"$ref": f"#/components/schemas/{name}"}


def _type_schema(hint: Any, limits: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if type(None) in typing.get_args(hint):  # Optional[X]
        return {**_type_schema(args[0], limits, schemas), "nullable": True}
    origin = typing.get_origin(hint)
    if origin is list:
        item = args[0] if args else Any
        items = (message_schema(item, schemas) if dataclasses.is_dataclass(item)
                 else _type_schema(item, {"max_chars": limits.get("item_max_chars")}, schemas))
        return _bounded({"type": "array", "items": items},
                        maxItems=limits.get("max_items") or protocol.MAX_LIST_ITEMS)
    if origin is dict:
        return {"type": "object", "additionalProperties": True}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return _bounded({"type": "integer"}, minimum=_given(limits, "minimum", protocol.INT64_MIN),
                        maximum=_given(limits, "maximum", protocol.INT64_MAX))
    if hint is float:  # a float field is bounded only where its metadata says so
        return _bounded({"type": "number"}, minimum=limits.get("minimum"),
                        maximum=limits.get("maximum"))
    if hint is str:
        return _bounded({"type": "string"},
                        maxLength=limits.get("max_chars") or protocol.MAX_TEXT_CHARS)
    return {}


def _given(limits: Any, name: str, default: int) -> int:
    """Return the field's own bound, or the one protocol.from_dict applies to every field."""
    value = limits.get(name)
    return default if value is None else value


def _bounded(schema: dict[str, Any], **bounds: Any) -> dict[str, Any]:
    return {**schema, **{key: value for key, value in bounds.items() if value is not None}}

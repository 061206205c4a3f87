"""OpenAPI request-body schemas of the endpoints (documentation only: server.validation does the checking)."""

from __future__ import annotations

from typing import Any

__all__ = ["body", "COLLECTION", "UPSERT", "SEARCH", "GET", "DELETE", "SCROLL"]

_VECTOR = {"type": "array", "items": {"type": "number"}, "description": "dim finite numbers"}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9223372036854775807}}
_CONDITION = {
    "type": "object",
    "description": "payload equality ({key, match: {value}} or {key, match: {any: [...]}}) or {has_id: [...]}",
    "properties": {
        "key": {"type": "string", "description": "payload key, dotted for nested objects"},
        "match": {"type": "object", "properties": {"value": {}, "any": {"type": "array"}}},
        "has_id": _IDS,
    },
}
_FILTER = {
    "type": "object",
    "properties": {p: {"type": "array", "items": _CONDITION} for p in ("must", "should", "must_not")},
}

COLLECTION: dict[str, Any] = {
    "type": "object",
    "required": ["name", "dim"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "dim": {"type": "integer", "minimum": 2},
        "metric": {"type": "string", "enum": ["ip", "cosine", "l2"], "default": "ip"},
        "bits": {"type": "integer", "minimum": 1, "maximum": 9, "default": 4},
        "codec": {"type": "string", "enum": ["prod", "mse"], "default": "prod"},
        "rerank": {"type": "integer", "minimum": 0, "default": 4},
        "seed": {"type": "integer", "minimum": 0, "default": 0},
    },
    "example": {"name": "docs", "dim": 4, "metric": "cosine", "bits": 4, "codec": "prod", "rerank": 4},
}
UPSERT: dict[str, Any] = {
    "type": "object",
    "required": ["points"],
    "properties": {"points": {"type": "array", "items": {
        "type": "object", "required": ["id", "vector"],
        "properties": {"id": _IDS["items"], "vector": _VECTOR, "payload": {"type": ["object", "null"]}},
    }}},
    "example": {"points": [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4], "payload": {"color": "red"}}]},
}
SEARCH: dict[str, Any] = {
    "type": "object",
    "required": ["k"],
    "properties": {
        "vector": _VECTOR,
        "vectors": {"type": "array", "items": _VECTOR},
        "k": {"type": "integer", "minimum": 1},
        "rerank": {"type": "integer", "minimum": 0},
        "with_payload": {"type": "boolean", "default": False},
        "with_vector": {"type": "boolean", "default": False},
        "filter": _FILTER,
    },
    "example": {"vector": [0.1, 0.2, 0.3, 0.4], "k": 3, "with_payload": True,
                "filter": {"must": [{"key": "color", "match": {"value": "red"}}]}},
}
GET: dict[str, Any] = {
    "type": "object", "required": ["ids"],
    "properties": {"ids": _IDS, "with_payload": {"type": "boolean", "default": True},
                   "with_vector": {"type": "boolean", "default": False}},
    "example": {"ids": [1, 2], "with_vector": False},
}
DELETE: dict[str, Any] = {"type": "object", "required": ["ids"], "properties": {"ids": _IDS}, "example": {"ids": [1]}}
SCROLL: dict[str, Any] = {
    "type": "object",
    "properties": {"offset": _IDS["items"], "limit": {"type": "integer", "minimum": 1, "default": 10},
                   "with_payload": {"type": "boolean", "default": True},
                   "with_vector": {"type": "boolean", "default": False}, "filter": _FILTER},
    "example": {"limit": 100},
}


def body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` declaring a required JSON request body with ``schema``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

"""OpenAPI request-body schemas of the Qdrant routes (documentation only: server.requests does the checking)."""

from __future__ import annotations

from typing import Any

__all__ = ["body", "CREATE", "UPSERT", "QUERY", "SEARCH", "RETRIEVE", "SELECTOR", "SCROLL", "COUNT", "SET_PAYLOAD",
           "DELETE_PAYLOAD", "BATCH"]

_VECTOR = {"type": "array", "items": {"type": "number"}, "description": "size finite numbers"}
_ID = {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 4611686018427387903},
                 {"type": "string", "format": "uuid"}], "description": "an integer below 2^62 or a UUID"}
_IDS = {"type": "array", "items": _ID}
_FILTER = {
    "type": "object",
    "description": "Qdrant filter: must / should / must_not / min_should of field conditions ({key, match: {value | any "
                   "| except}}, {key, range: {lt, gt, gte, lte}}, {key, is_empty | is_null: bool}), {has_id: [...]}, "
                   "{is_empty: {key}}, {is_null: {key}} or nested filters",
    "properties": {p: {"type": "array", "items": {"type": "object"}} for p in ("must", "should", "must_not")},
}
_WITH_PAYLOAD = {"description": "true / false, a list of keys, {include: [...]} or {exclude: [...]}"}
_PARAMS = {"type": "object", "description": "quantization.oversampling: rescoring factor; quantization.rescore: false "
                                            "for codes only; exact / quantization.ignore: exact scores; hnsw_ef: nprobe "
                                            "of an ivf collection",
           "properties": {"hnsw_ef": {"type": "integer"}, "exact": {"type": "boolean"},
                          "quantization": {"type": "object"}}}

CREATE: dict[str, Any] = {
    "type": "object", "required": ["vectors"],
    "properties": {
        "vectors": {"type": "object", "required": ["size", "distance"],
                    "properties": {"size": {"type": "integer", "minimum": 2},
                                   "distance": {"type": "string", "enum": ["Cosine", "Dot", "Euclid"]}}},
        "metadata": {"type": "object", "description": "collection metadata; its 'tqindex' object sets bits (1-8 mse, "
                                                      "1-9 prod), codec (mse / prod), rerank, seed and index "
                                                      "({type: flat} or {type: ivf, nlist, nprobe, train_at})"},
    },
    "example": {"vectors": {"size": 4, "distance": "Cosine"},
                "metadata": {"tqindex": {"bits": 4, "codec": "mse", "rerank": 4}}},
}
UPSERT: dict[str, Any] = {
    "type": "object",
    "properties": {"points": {"type": "array", "items": {
        "type": "object", "required": ["id", "vector"],
        "properties": {"id": _ID, "vector": _VECTOR, "payload": {"type": ["object", "null"]}}}},
        "batch": {"type": "object", "properties": {"ids": _IDS, "vectors": {"type": "array", "items": _VECTOR},
                                                   "payloads": {"type": "array"}}}},
    "example": {"points": [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4], "payload": {"color": "red"}}]},
}
QUERY: dict[str, Any] = {
    "type": "object", "required": ["query"],
    "properties": {"query": {"description": "a vector, or {nearest: vector}"}, "limit": {"type": "integer"},
                   "offset": {"type": "integer"}, "filter": _FILTER, "params": _PARAMS,
                   "score_threshold": {"type": "number"}, "with_payload": _WITH_PAYLOAD,
                   "with_vector": {"type": "boolean"}},
    "example": {"query": [0.1, 0.2, 0.3, 0.4], "limit": 3, "with_payload": True,
                "filter": {"must": [{"key": "color", "match": {"value": "red"}}]}},
}
SEARCH: dict[str, Any] = {
    "type": "object", "required": ["vector", "limit"],
    "properties": {"vector": _VECTOR, "limit": {"type": "integer"}, "offset": {"type": "integer"}, "filter": _FILTER,
                   "params": _PARAMS, "score_threshold": {"type": "number"}, "with_payload": _WITH_PAYLOAD,
                   "with_vector": {"type": "boolean"}},
    "example": {"vector": [0.1, 0.2, 0.3, 0.4], "limit": 3},
}
BATCH: dict[str, Any] = {"type": "object", "required": ["searches"],
                         "properties": {"searches": {"type": "array", "items": {"type": "object"}}}}
RETRIEVE: dict[str, Any] = {
    "type": "object", "required": ["ids"],
    "properties": {"ids": _IDS, "with_payload": _WITH_PAYLOAD, "with_vector": {"type": "boolean"}},
    "example": {"ids": [1, 2], "with_vector": False},
}
SELECTOR: dict[str, Any] = {"type": "object", "properties": {"points": _IDS, "filter": _FILTER},
                            "description": "points or filter", "example": {"points": [1]}}
SCROLL: dict[str, Any] = {
    "type": "object",
    "properties": {"offset": _ID, "limit": {"type": "integer", "minimum": 1, "default": 10}, "filter": _FILTER,
                   "with_payload": _WITH_PAYLOAD, "with_vector": {"type": "boolean"}},
    "example": {"limit": 100},
}
COUNT: dict[str, Any] = {"type": "object", "properties": {"filter": _FILTER, "exact": {"type": "boolean"}},
                         "example": {"exact": True}}
SET_PAYLOAD: dict[str, Any] = {"type": "object", "required": ["payload"],
                               "properties": {"payload": {"type": "object"}, "points": _IDS, "filter": _FILTER},
                               "example": {"payload": {"color": "green"}, "points": [1]}}
DELETE_PAYLOAD: dict[str, Any] = {"type": "object", "required": ["keys"],
                                  "properties": {"keys": {"type": "array", "items": {"type": "string"}},
                                                 "points": _IDS, "filter": _FILTER},
                                  "example": {"keys": ["color"], "points": [1]}}


def body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` declaring a required JSON request body with ``schema``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

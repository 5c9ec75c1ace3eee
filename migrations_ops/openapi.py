"""The console's HTTP API described in OpenAPI 3.1 (served at ``GET /api/openapi.json``).

Written by hand next to the views (migrations_ops/api.py); a test checks that every URL under
/api/ is described here and that the document is valid OpenAPI.
"""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}
BEARER_OR_SESSION = [{"bearerToken": []}, {"staffSession": []}]
SESSION_ONLY = [{"staffSession": []}]


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


COMMON_ERRORS = {
    "400": _error(
        "Refused input (code invalid_request): a NUL character in the address, or a request "
        "the console refuses, such as no reason. A body that is not one JSON object, nests "
        "deeper than 8 levels or holds a NUL or a lone surrogate in a string (invalid_json), "
        "or is over DATA_UPLOAD_MAX_MEMORY_SIZE (body_too_large). Any other request Django "
        "refuses as malformed (bad_request)."
    ),
    "401": _error(
        "No credentials, a malformed Authorization header, or an unknown or revoked "
        "token (codes not_authenticated, invalid_token)."
    ),
    "403": _error(
        "Authenticated, but not allowed: a staff user without the permission, or a "
        "token not scoped to the target (code forbidden)."
    ),
    "405": _error("Another HTTP method than the one listed (code method_not_allowed)."),
    "500": _error("The console failed to answer (code server_error)."),
}
TARGET_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The target's name.",
    "schema": {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$"},
}
OPERATION_ID = {
    "name": "operation_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}
REASON_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"reason": {"type": "string"}}}
        }
    },
}

LOCK = {
    "type": "object",
    "description": "The lock as last observed.",
    "properties": {
        "state": {"type": "string", "enum": ["free", "held", "stale", "unknown"]},
        "held": {"type": ["boolean", "null"]},
        "holder": {"type": ["string", "null"]},
        "rows": {"type": "array"},
        "since": {"type": ["string", "null"], "format": "date-time"},
        "since_source": {"type": ["string", "null"]},
        "age_seconds": {"type": ["number", "null"]},
        "stale": {"type": ["boolean", "null"]},
        "lock_timeout_seconds": {"type": "integer"},
        "observed_at": {"type": ["string", "null"], "format": "date-time"},
        "error": {"type": ["string", "null"]},
    },
}
TARGET_STATUS = {
    "type": "object",
    "required": ["name", "reachable", "lock", "read_at", "reading_age_seconds"],
    "properties": {
        "name": {"type": "string"},
        "environment": {"type": "string"},
        "convention": {"type": "string"},
        "dialect": {"type": "string"},
        "reachable": {"type": "boolean"},
        "error": {"type": ["string", "null"]},
        "lock": {"$ref": "#/components/schemas/Lock"},
        "applied_migrations": {"type": ["array", "null"], "items": {"type": "object"}},
        "read_at": {
            "type": "string",
            "format": "date-time",
            "description": "When the console read this target.",
        },
        "reading_age_seconds": {
            "type": "number",
            "description": "How old the reading was when answered (at most the answer's "
            "max_age_seconds, unless another request was reading the target at that moment).",
        },
    },
}
FLAGS = {
    "type": "object",
    "required": ["target", "flags", "stage", "changed_at"],
    "properties": {
        "target": {"type": "string"},
        "flags": {
            "type": "object",
            "properties": {
                "AUTO_MIGRATE": {"type": "boolean"},
                "MIGRATION_DRY_RUN": {"type": "boolean"},
                "MIGRATION_MAX_RETRIES": {"type": "integer", "minimum": 0, "maximum": 10},
                "MIGRATION_LOCK_TIMEOUT": {"type": "integer", "minimum": 1, "maximum": 86400},
                "MIGRATION_CACHE_TTL": {"type": "integer", "minimum": 1, "maximum": 86400},
                "EMERGENCY_BYPASS": {"type": "boolean"},
            },
        },
        "stage": {"type": "string", "enum": ["normal", "disabled", "dry_run", "limited"]},
        "changed_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "When a flag last changed (null: never since registration).",
        },
        "change_reason": {"type": ["string", "null"]},
    },
}
CHECK = {
    "type": "object",
    "required": ["check", "status", "message"],
    "properties": {
        "check": {
            "type": "string",
            "enum": ["lock_unknown", "lock_held", "lock_stale", "failure_rate", "retry_rate"],
        },
        "status": {"type": "string", "enum": ["warning", "critical"]},
        "message": {"type": "string"},
    },
}
HEALTH_STATE = {"type": "string", "enum": ["ok", "warning", "critical"]}
HEALTH = {
    "type": "object",
    "required": ["status", "targets"],
    "properties": {
        "status": HEALTH_STATE,
        "checked_at": {"type": "string", "format": "date-time"},
        "thresholds": {"type": "object"},
        "workers": {
            "type": "object",
            "description": "critical when no worker of the task queue was seen within "
            "WORKER_SEEN_WITHIN seconds (never with tasks run in-process)",
            "required": ["status", "in_process", "alive", "last_seen_at", "message"],
            "properties": {
                "status": HEALTH_STATE,
                "in_process": {"type": "boolean"},
                "queue": {"type": "string"},
                "seen_within_seconds": {"type": "integer"},
                "alive": {"type": "integer", "description": "workers seen alive"},
                "last_seen_at": {"type": ["string", "null"], "format": "date-time"},
                "last_seen_seconds": {"type": ["number", "null"]},
                "message": {"type": "string"},
            },
        },
        "targets": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "status", "checks"],
                "properties": {
                    "name": {"type": "string"},
                    "environment": {"type": "string"},
                    "status": HEALTH_STATE,
                    "checks": {"type": "array", "items": {"$ref": "#/components/schemas/Check"}},
                    "lock": {"$ref": "#/components/schemas/Lock"},
                    "reading_age_seconds": {"type": ["number", "null"]},
                    "migrations_24h": {"type": "integer"},
                    "failure_rate": {"type": ["number", "null"]},
                    "retry_rate": {"type": ["number", "null"]},
                    "open_incidents": {"type": "integer"},
                },
            },
        },
    },
}
OPERATION = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "kind": {"type": "string"},
        "target": {"type": "string"},
        "status": {"type": "string"},
        "finished": {"type": "boolean"},
        "requested_by": {"type": "string"},
        "door": {"type": "string"},
        "reason": {"type": "string"},
        "incident": {"type": ["integer", "null"]},
        "requested_at": {"type": ["string", "null"], "format": "date-time"},
        "started_at": {"type": ["string", "null"], "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time"},
        "error": {"type": ["string", "null"]},
        "result": {"type": "object"},
        "log": {"type": "array", "items": {"type": "string"}},
    },
}
OPERATION_ANSWER = {
    "type": "object",
    "properties": {"operation": {"$ref": "#/components/schemas/Operation"}},
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Migration operations console API",
            "version": "1",
            "description": "Read-only endpoints for applications and monitors (API token or "
            "staff session), and the operations on-call engineers drive (staff session). "
            'Every error is JSON: {"error": {"code": "...", "message": "..."}}.',
        },
        "servers": [{"url": "/"}],
        "security": BEARER_OR_SESSION,
        "paths": {
            "/api/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "security": [],
                    "responses": {"200": {"description": "The OpenAPI document."}},
                }
            },
            "/api/migrations/status": {
                "get": {
                    "summary": "Each target's lock and applied migrations",
                    "operationId": "migrationsStatus",
                    "description": "Served from a reading of each target at most STATUS_MAX_AGE "
                    "seconds old (max_age_seconds in the answer); live=1 reads every target now. "
                    "A token sees its own targets only.",
                    "parameters": [
                        {
                            "name": "target",
                            "in": "query",
                            "description": "One target only, by name.",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "live",
                            "in": "query",
                            "description": "1 to read every target now.",
                            "schema": {"type": "string", "enum": ["0", "1", "true", "false"]},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            "The targets' status.",
                            {
                                "type": "object",
                                "properties": {
                                    "checked_at": {"type": "string", "format": "date-time"},
                                    "max_age_seconds": {"type": "number"},
                                    "targets": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/TargetStatus"},
                                    },
                                },
                            },
                        ),
                        "404": _error("No target of that name (code unknown_target)."),
                        **COMMON_ERRORS,
                    },
                }
            },
            "/api/migrations/health": {
                "get": {
                    "summary": "ok / warning / critical by the runbook's alert thresholds",
                    "operationId": "migrationsHealth",
                    "description": "Per target and overall; each failing check named. A token "
                    "sees (and is judged on) its own targets only.",
                    "responses": {
                        "200": _json("ok or warning.", {"$ref": "#/components/schemas/Health"}),
                        "503": _json(
                            "critical: at least one target fails a critical check, or no "
                            "worker has been seen within WORKER_SEEN_WITHIN seconds.",
                            {"$ref": "#/components/schemas/Health"},
                        ),
                        **COMMON_ERRORS,
                    },
                }
            },
            "/api/targets/{name}/flags": {
                "get": {
                    "summary": "The runtime flags a target's auto-migrator obeys",
                    "operationId": "targetFlags",
                    "parameters": [
                        TARGET_NAME,
                        {
                            "name": "If-None-Match",
                            "in": "header",
                            "description": "The ETag of the flags held: 304 if unchanged.",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            **_json("The flags.", {"$ref": "#/components/schemas/Flags"}),
                            "headers": {
                                "ETag": {"schema": {"type": "string"}},
                                "Cache-Control": {
                                    "description": "private, max-age=MIGRATION_CACHE_TTL",
                                    "schema": {"type": "string"},
                                },
                            },
                        },
                        "304": {"description": "Unchanged since the ETag sent."},
                        "404": _error("No target of that name (code unknown_target)."),
                        **COMMON_ERRORS,
                    },
                }
            },
            "/api/targets/{name}/force-unlock": {
                "post": {
                    "summary": "Request the release of a target's migration lock",
                    "operationId": "forceUnlock",
                    "security": SESSION_ONLY,
                    "parameters": [TARGET_NAME],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["reason"],
                                    "properties": {
                                        "reason": {"type": "string"},
                                        "release_fresh": {"type": "boolean"},
                                        "confirm_name": {"type": "string"},
                                        "incident": {"type": "integer"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": _json(
                            "Requested: poll the operation's url.",
                            {
                                "type": "object",
                                "properties": {
                                    "operation": {"$ref": "#/components/schemas/Operation"},
                                    "url": {"type": "string"},
                                    "warning": {"type": ["string", "null"]},
                                },
                            },
                        ),
                        "404": _error("Unknown target or incident."),
                        "409": _error("Refused in the target's present state (code conflict)."),
                        "503": _error("The target cannot be read (code target_unavailable)."),
                        **COMMON_ERRORS,
                    },
                }
            },
            "/api/operations/{operation_id}": {
                "get": {
                    "summary": "One operation, its status and log",
                    "operationId": "operation",
                    "security": SESSION_ONLY,
                    "parameters": [OPERATION_ID],
                    "responses": {
                        "200": _json("The operation.", OPERATION_ANSWER),
                        "404": _error("No such operation (code unknown_operation)."),
                        **COMMON_ERRORS,
                    },
                }
            },
            **{
                f"/api/operations/{{operation_id}}/{decision}": {
                    "post": {
                        "summary": f"{decision.capitalize()} an operation awaiting approval",
                        "operationId": f"{decision}Operation",
                        "security": SESSION_ONLY,
                        "parameters": [OPERATION_ID],
                        "requestBody": REASON_BODY,
                        "responses": {
                            "200": _json("The operation, decided.", OPERATION_ANSWER),
                            "404": _error("No such operation (code unknown_operation)."),
                            "409": _error("Not awaiting approval, or your own request."),
                            **COMMON_ERRORS,
                        },
                    }
                }
                for decision in ("approve", "reject")
            },
            "/metrics": {
                "get": {
                    "summary": "The console's figures in Prometheus's text format",
                    "operationId": "metrics",
                    "description": "A token sees the series of its own targets only.",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **COMMON_ERRORS,
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearerToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An application's API token (read-only, scoped to targets): "
                    "created in the admin or with `ops token create`.",
                },
                "staffSession": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "sessionid",
                    "description": "A logged-in console user (staff, with the permission the "
                    "endpoint needs); POSTs also need the CSRF token.",
                },
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string", "examples": ["unknown_target"]},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "Lock": LOCK,
                "TargetStatus": TARGET_STATUS,
                "Flags": FLAGS,
                "Check": CHECK,
                "Health": HEALTH,
                "Operation": OPERATION,
            },
        },
    }

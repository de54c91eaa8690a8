"""One declaration per API operation, and everything derived from it.

An `Operation` names its method, path, permission, summary and the pydantic models of its
query, body and response. From that one declaration the route is registered with the guard
(web/guard.py), the query string and body are validated, the handler's answer is serialized,
and the OpenAPI 3.1 operation is written: the document cannot say what the handler does not.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast, get_args, get_origin

from aiohttp import web
from pydantic import BaseModel, Field, ValidationError
from pydantic.json_schema import models_json_schema

from gateway.access import Permission, Principal
from web.guard import PRINCIPAL, Routes
from web.problem_details import MEDIA_TYPE, ProblemResponse

log = logging.getLogger(__name__)

Q = TypeVar("Q", bound=BaseModel)
B = TypeVar("B", bound=BaseModel)
BODY_LIMIT = 64 * 1024
REF = "#/components/schemas/{model}"


class NoQuery(BaseModel):
    model_config = {"extra": "forbid"}


class NoBody(BaseModel):
    model_config = {"extra": "forbid"}


class Problem(BaseModel):
    """An error, as RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None
    code: str | None = Field(
        default=None,
        description="Why a request was refused, stable across releases and languages"
        " (`user.taken`, `queue.no_retry`, `action.expiry_past`); the `detail` may be reworded.",
    )


@dataclass(frozen=True)
class Binary:
    """A response of bytes in one media type (a PDF, a message as .eml), not JSON."""

    media_type: str
    description: str


@dataclass(frozen=True)
class File:
    """What a handler of a `Binary` operation returns: the bytes and the name to save them as."""

    data: bytes
    filename: str


@dataclass(frozen=True)
class Call(Generic[Q, B]):
    """What a handler gets: who asks, the path's values, the validated query and body."""

    principal: Principal
    path: dict[str, str]
    query: Q
    body: B


@dataclass(frozen=True)
class Operation(Generic[Q, B]):
    method: str
    path: str
    needs: Permission
    summary: str
    handler: Callable[[Call[Q, B]], Awaitable[BaseModel | File | None]]
    query: type[Q]
    body: type[B]
    response: type[BaseModel] | Binary | None  # None: 204 No Content
    status: int = 200
    errors: tuple[int, ...] = ()  # beyond 400, 401, 403 that every operation may answer

    @property
    def operation_id(self) -> str:
        return self.handler.__name__

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.path)

    def register(self, routes: Routes) -> None:
        routes.api(self.method, self.path, self._handle, self.needs)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = _validate(self.query, _query_values(self.query, request), "query")
        body: B = (
            await _read_body(self.body, request) if self.body is not NoBody else cast(B, NoBody())
        )
        call = Call(request[PRINCIPAL], dict(request.match_info), query, body)
        result = await self.handler(call)
        if self.response is None:
            return web.Response(status=204)
        if isinstance(self.response, Binary):
            assert isinstance(result, File)
            return web.Response(
                status=self.status,
                body=result.data,
                content_type=self.response.media_type,
                headers={
                    "Content-Disposition": f'attachment; filename="{result.filename}"',
                    "X-Content-Type-Options": "nosniff",
                },
            )
        assert isinstance(result, self.response)
        return web.Response(
            status=self.status,
            body=result.model_dump_json().encode(),
            content_type="application/json",
        )


def _is_list(annotation: Any) -> bool:
    if get_origin(annotation) is list:
        return True
    return any(_is_list(arg) for arg in get_args(annotation))


def _query_values(model: type[BaseModel], request: web.Request) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in request.query:
        if name in values:
            continue
        field = model.model_fields.get(name)
        every = request.query.getall(name)
        if field is not None and _is_list(field.annotation):
            values[name] = every
        elif len(every) > 1:
            raise ProblemResponse(
                400,
                f"The query parameter '{name}' may be given once.",
                errors=[{"parameter": name, "message": "given more than once"}],
            )
        else:
            values[name] = every[0]
    return values


def _validate(model: type[Q], data: Any, where: str) -> Q:
    """Query values are strings to convert; a body is validated as JSON, strictly."""
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {
                "parameter" if where == "query" else "field": ".".join(str(p) for p in e["loc"])
                or "(body)",
                "message": e["msg"],
            }
            for e in exc.errors(include_url=False, include_input=False)
        ]
        names = ", ".join(str(e.get("parameter", e.get("field"))) for e in errors)
        status = 400 if where == "query" else 422
        raise ProblemResponse(status, f"Invalid {where}: {names}.", errors=errors) from exc


async def _read_body(model: type[B], request: web.Request) -> B:
    if request.content_type != "application/json":
        raise ProblemResponse(415, "Send the body as application/json.")
    if request.content_length is not None and request.content_length > BODY_LIMIT:
        raise ProblemResponse(413, "The body is too large.")
    raw = await request.content.read(BODY_LIMIT + 1)
    if len(raw) > BODY_LIMIT:
        raise ProblemResponse(413, "The body is too large.")
    try:
        json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProblemResponse(400, f"The body is not valid JSON: {exc}.") from exc
    return _validate(model, raw, "body")


# -- the OpenAPI document --------------------------------------------------------------------

_PROBLEM_TEXT = {
    400: "The query or the body is malformed.",
    401: "No API key, or one that is unknown or revoked.",
    403: "The key or user lacks the permission this operation needs.",
    404: "Not found (or outside what the caller may see).",
    409: "The request conflicts with the current state.",
    413: "The body is too large.",
    415: "The body is not application/json.",
    422: "The body is JSON but not what this operation takes.",
    503: "The relay cannot do this now (a missing key file, say); the operator must act.",
}


def openapi(operations: Iterable[Operation[Any, Any]], title: str, version: str) -> dict[str, Any]:
    ops = list(operations)
    models: set[type[BaseModel]] = {Problem}
    for op in ops:
        models.add(op.query)
        if op.body is not NoBody:
            models.add(op.body)
        if isinstance(op.response, type):
            models.add(op.response)
    ordered = sorted(models, key=lambda m: m.__name__)
    refs, top = models_json_schema(
        [(m, "validation") for m in ordered if m is not NoQuery], ref_template=REF
    )
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs, schemas)
    for op in ops:  # query models are spelled out as parameters, not kept as components
        schemas.pop(op.query.__name__, None)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or has a value; pydantic's `X | None` says null too."""
    choices = [c for c in schema.get("anyOf", ()) if c != {"type": "null"}]
    if len(choices) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**choices[0], **rest}


def _operation(
    op: Operation[Any, Any], refs: dict[Any, Any], schemas: dict[str, Any]
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in op.path_params
    ]
    if op.query is not NoQuery:
        query_schema = schemas[op.query.__name__]
        required = set(query_schema.get("required", ()))
        for name, spelled in query_schema.get("properties", {}).items():
            prop = _without_null(spelled)
            parameter = {"name": name, "in": "query", "required": name in required, "schema": prop}
            if prop.get("type") == "array":
                parameter.update(style="form", explode=True)
            if "description" in prop:
                parameter["description"] = prop["description"]
            parameters.append(parameter)
    responses: dict[str, Any] = {}
    if op.response is None:
        responses[str(op.status if op.status != 200 else 204)] = {"description": "Done."}
    elif isinstance(op.response, Binary):
        media = op.response.media_type
        responses[str(op.status)] = {
            "description": op.response.description,
            "content": {media: {"schema": {"type": "string", "contentMediaType": media}}},
        }
    else:
        responses[str(op.status)] = {
            "description": op.response.__doc__ or "The result.",
            "content": {"application/json": {"schema": refs[(op.response, "validation")]}},
        }
    codes = {400, 401, 403, *op.errors}
    if op.body is not NoBody:
        codes |= {413, 415, 422}
    for code in sorted(codes):
        responses[str(code)] = {
            "description": _PROBLEM_TEXT[code],
            "content": {MEDIA_TYPE: {"schema": {"$ref": REF.format(model="Problem")}}},
        }
    operation: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "x-permission": op.needs.value,
        "parameters": parameters,
        "responses": responses,
    }
    if op.body is not NoBody:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
        }
    return operation

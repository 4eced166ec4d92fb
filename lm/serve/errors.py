"""Every error the API answers, in OpenAI's shape: a refused request (:class:`BadRequest`, 4xx), FastAPI's own
errors (a body it cannot decode or validate: 400; an unknown route: 404), and a request no model replica
could answer (:class:`Unavailable`: 503 with Retry-After, lm.serve.failover). Never a 5xx for bad input."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lm.serve.schemas import error_body


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_=type_, param=param, code=code)


class Unavailable(Exception):
    """No model replica could answer (the one serving the request died, and no other took it over)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def refused(result: dict, generation: bool = True) -> BadRequest:
    """The 400 of a request the model deployment refused (its result holds ``error`` and maybe ``param``;
    a generation request names a param only when it exceeds the context)."""
    code = (result["code"] if "code" in result
            else "context_length_exceeded" if generation and result.get("param") else None)
    return BadRequest(400, result["error"], param=result.get("param"), code=code)


async def _bad_request(_request: Request, err: BadRequest) -> JSONResponse:
    return JSONResponse(err.body, status_code=err.status)


async def _unavailable(_request: Request, err: Unavailable) -> JSONResponse:
    body = error_body(str(err), type_="service_unavailable", code="replica_unavailable")
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(err.retry_after_s)})


async def _http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (a body it cannot decode, an unknown route or method) in OpenAI's shape."""
    body = error_body(str(err.detail), code="not_found" if err.status_code == 404 else None)
    return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))


async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else f"invalid request body: {first.get('msg')}"
    return JSONResponse(error_body(message, param=param), status_code=400)


def install(api: FastAPI) -> None:
    api.add_exception_handler(BadRequest, _bad_request)
    api.add_exception_handler(Unavailable, _unavailable)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _invalid)

"""The console's routes on the ingress (lm.serve.app's ``Api`` inherits :class:`ConsoleRoutes`;
:func:`add_routes` registers them on its FastAPI app before Serve turns the class into routes).

- ``GET /console/`` and its two assets: the static page (no build step, no CDN, no inline script), with a
  strict Content-Security-Policy. The page itself is public; every data call it makes needs a key.
- The playground calls the API's own routes (``/v1/completions``, ``/v1/chat/completions``, ``/v1/feedback``).
- ``GET /v1/console/whoami``: the key's name and role (any key).
- The operators' view (role ``operator`` in the key file, lm.serve.auth; else 403 in OpenAI's error shape):
  ``GET /v1/console/registry``, ``/v1/console/versions/{id}/report``, ``/v1/console/versions/{id}/plots/{png}``,
  ``/v1/console/iterations``, ``/v1/console/stats``, ``/v1/console/training``, and
  ``POST /v1/console/rollback`` (what ``lm registry rollback`` does; refused with 409 when production is not
  the version the operator confirmed), logged with the key's name, never the key.

Every ``/v1/console/`` call passes the same gate as the API (lm.serve.gate: key, limits, body size; counted
under route ``console``) and the route's ``_admit``. The routes are left out of the OpenAPI schema (the API's).
(No ``from __future__ import annotations``: FastAPI reads the parameters' types after Serve rewrites them.)
"""

import asyncio
import functools
import logging
from importlib import resources

from fastapi import FastAPI, Path, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from lm.config import join_uri
from lm.registry import Registry, RegistryError, Version
from lm.serve import schemas
from lm.serve.auth import OPERATOR, Grant, grant_of
from lm.serve.console import views
from lm.serve.errors import BadRequest
from lm.serve.gate import Gate
from lm.serve.model_server import REGISTRY

audit = logging.getLogger("ray.serve")  # the replica's own log file (Serve's logger)

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
ASSETS = {"index.html": "text/html; charset=utf-8", "console.js": "text/javascript; charset=utf-8",
          "console.css": "text/css; charset=utf-8"}
VERSION_ID = r"^v[0-9]{6}$"


@functools.cache
def asset(name: str) -> bytes:
    """One of the page's files, shipped as package data (lm/serve/console/static/)."""
    return (resources.files("lm.serve.console") / "static" / name).read_bytes()


class RollbackRequest(BaseModel):
    model_config = ConfigDict(**schemas.STRICT)
    production: str = Field(pattern=VERSION_ID, description="The production version the operator confirmed rolling "
                                                            "back (409 when production is another one by now).")
    reason: str = Field("", max_length=500)


def _forbidden() -> BadRequest:
    return BadRequest(403, "the operators' view needs an API key with the operator role (serve.api_keys_file: "
                           "role: operator)", type_="permission_error", code="operator_role_required")


def _not_found(err: Exception) -> BadRequest:
    return BadRequest(404, str(err), code="not_found")


class ConsoleRoutes:
    """The console's routes, as methods of the ingress (lm.serve.app.Api: its cfg, store, stats, model)."""

    # -------------------------------------------------------------------------------- the page

    async def console_redirect(self) -> RedirectResponse:
        return RedirectResponse("console/", status_code=308)

    async def console_page(self) -> Response:
        return Response(asset("index.html"), media_type=ASSETS["index.html"], headers=PAGE_HEADERS)

    async def console_asset(self, name: str) -> Response:
        if name not in ASSETS or name == "index.html":
            raise BadRequest(404, f"the console has no file {name!r}", code="not_found")
        return Response(asset(name), media_type=ASSETS[name], headers=PAGE_HEADERS)

    # ---------------------------------------------------------------------------------- checks

    async def _operator(self, request: Request) -> Grant:
        """The operator's grant, after the same checks as every API call (``_admit``); 403 without the role."""
        await self._admit(request)
        grant = grant_of(request.headers.get("authorization"), Gate.grants)
        if grant is None or grant.role != OPERATOR:
            raise _forbidden()
        return grant

    def _registry(self) -> Registry:
        return Registry(self.store, self.cfg.registry_uri)

    async def _version(self, ref: str) -> Version:
        try:
            return await asyncio.to_thread(self._registry().get, ref)
        except RegistryError as err:
            raise _not_found(err) from None

    # ---------------------------------------------------------------------------------- routes

    async def console_whoami(self, request: Request) -> dict:
        await self._admit(request)
        grant = grant_of(request.headers.get("authorization"), Gate.grants)
        name, role = (grant.name, grant.role) if grant else ("anonymous (auth is off)", "user")
        return {"object": "console.key", "name": name, "role": role, "model": self.sc.model_name,
                "rag": self.sc.rag, "feedback": self.feedback is not None}

    async def console_registry(self, request: Request) -> dict:
        await self._operator(request)
        return await asyncio.to_thread(views.registry_view, self._registry())

    async def console_report(self, request: Request, vid: str = Path(pattern=VERSION_ID)) -> dict:
        await self._operator(request)
        return await asyncio.to_thread(views.report_view, self.store, await self._version(vid))

    async def console_plot(self, request: Request, vid: str = Path(pattern=VERSION_ID),
                           name: str = Path(pattern=views.PLOT.pattern)) -> Response:
        await self._operator(request)
        version = await self._version(vid)
        try:
            png = await asyncio.to_thread(views.plot_bytes, self.store, version, name)
        except views.NotFound as err:
            raise _not_found(err) from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    async def console_iterations(self, request: Request) -> dict:
        await self._operator(request)
        return {"iterations": await asyncio.to_thread(views.iterations_view, self.store, self.cfg.registry_uri)}

    async def _served(self) -> Version:
        """The version this server serves: the registry's (``serve.model=registry:<ref>``), or its model
        directory as a version outside the registry (id ``-``)."""
        model = self.sc.model or join_uri(self.cfg.run_uri, "model")
        if model.startswith(REGISTRY):
            return await self._version(model[len(REGISTRY):])
        return Version(id="-", model_uri=model)

    async def console_training(self, request: Request) -> dict:
        await self._operator(request)
        version = await self._served()
        cache = self.__dict__.setdefault("_curves", {})  # a run's curves do not change once it has a model
        if (version.id, version.model_uri) not in cache:
            cache[version.id, version.model_uri] = await asyncio.to_thread(views.training_view, self.store, version)
        return cache[version.id, version.model_uri]

    async def console_stats(self, request: Request) -> dict:
        await self._operator(request)
        info = self.local.info() if self.local is not None else await self.model.info.remote()
        serving = {"version": info.get("version"), "model_uri": info.get("model_uri")}
        return {**self.stats.snapshot(), "serving": serving,
                "replicas": await asyncio.to_thread(_replicas, self.sc.app_name)}

    async def console_rollback(self, request: Request, body: RollbackRequest) -> dict:
        grant = await self._operator(request)
        reg = self._registry()
        reason = f"console, key {grant.name}" + (f": {body.reason}" if body.reason else "")

        def roll() -> dict:
            current = reg.state()["aliases"].get("production")
            if current != body.production:
                raise BadRequest(409, f"production is {current}, not {body.production}: reload and confirm again",
                                 param="production", code="conflict")
            return reg.rollback(reason=reason)  # what `lm registry rollback` does

        try:
            state = await asyncio.to_thread(roll)
        except RegistryError as err:
            raise BadRequest(409, str(err), code="conflict") from None
        aliases = state["aliases"]
        _log_action("console: operator action rollback by key %s: production %s -> %s (%s)", grant.name,
                    body.production, aliases.get("production"), body.reason or "no reason given")
        return {"object": "registry.rollback", "rolled_back": body.production,
                "production": aliases.get("production"), "previous": aliases.get("previous")}


def _log_action(message: str, *args) -> None:
    """An operator action in the replica's log (named by the key's name, never the key), written now: Serve
    buffers its log lines (RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE, lm.serve.app.REPLICA_ENV)."""
    audit.info(message, *args)
    for handler in audit.handlers:
        handler.flush()


def _replicas(app_name: str) -> dict[str, dict[str, int]]:
    """Replicas per deployment and state, from Serve's controller ({} if it cannot be asked)."""
    from ray import serve
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    try:
        app = serve.status().applications.get(app_name)
    except (RayServeException, RayError) as err:  # the controller is unreachable: the other numbers still show
        audit.warning("console: no replica counts from Serve's controller: %s", err)
        return {}
    return {name: dict(d.replica_states) for name, d in app.deployments.items()} if app else {}


def add_routes(api: FastAPI) -> None:
    """Register the console's routes on the ingress's app (before ``serve.ingress`` reads them)."""
    c, hidden = ConsoleRoutes, {"include_in_schema": False}
    api.add_api_route("/console", c.console_redirect, methods=["GET"], **hidden)
    api.add_api_route("/console/", c.console_page, methods=["GET"], **hidden)
    api.add_api_route("/console/{name}", c.console_asset, methods=["GET"], **hidden)
    for path, endpoint in (("whoami", c.console_whoami), ("registry", c.console_registry),
                           ("versions/{vid}/report", c.console_report), ("versions/{vid}/plots/{name}", c.console_plot),
                           ("iterations", c.console_iterations), ("training", c.console_training),
                           ("stats", c.console_stats)):
        api.add_api_route(f"/v1/console/{path}", endpoint, methods=["GET"], **hidden)
    api.add_api_route("/v1/console/rollback", c.console_rollback, methods=["POST"], **hidden)

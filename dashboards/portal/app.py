"""The web portal and its JSON API (``pilotlab serve``; docs/portal.md).

Who may see what is decided by the database, not here: each request authenticates its token
(``storage.access.authenticate``) and runs its reads inside ``storage.access.scoped(conn,
principal)``, which for a startup switches to that startup's role, whose row-level security
leaves only its own experiments, devices, rejections, alerts and KPIs. The lab (a principal
without a startup) sees every pilot. An experiment the role cannot see is a 404, whether it
belongs to another startup or does not exist.

Pages: a token logs in (a form; the session is a signed cookie, ``itsdangerous`` through
Starlette's SessionMiddleware, secret from the settings); the live parts of a page are
fragments htmx polls (vendored in ``static/``: no build chain, no CDN). API: the same reads
under ``/api``, bearer token, OpenAPI at ``/docs`` and ``/openapi.json``.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Protocol

import psycopg
from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from psycopg_pool import ConnectionPool
from starlette.middleware.sessions import SessionMiddleware

from dashboards import report
from dashboards.portal import views
from dashboards.portal.settings import PortalSettings
from pilotlab.credentials import SECRET_FILE, load_or_create_secret
from storage import access as storage_access
from storage import portal_queries as q
from storage.access import Principal
from storage.queries import AlertEpisode

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "pilotlab_portal"


class Access(Protocol):
    """What the app needs of ``storage.access``: the database decides what a principal sees."""

    def authenticate(self, conn: psycopg.Connection, token: str) -> Principal | None: ...

    def scoped(self, conn: psycopg.Connection, principal: Principal) -> contextlib.AbstractContextManager: ...


class NotSignedIn(Exception):
    """No valid token in the session (pages) — the login page answers."""


@dataclass(frozen=True)
class PilotOverview:
    """A pilot as the overview and ``GET /api/experiments`` show it."""

    experiment: q.ExperimentSummary
    impacts: list[views.ImpactView] = field(default_factory=list)


@dataclass(frozen=True)
class Whoami:
    startup: str | None
    lab: bool


def credentials_secret(settings: PortalSettings) -> bytes | None:
    """The lab's secret device passwords derive from: PILOTLAB_CREDENTIALS_SECRET (as
    ``pilotlab credentials files`` takes it), or the embedded stack's secret file."""
    if settings.credentials_secret is not None:
        return settings.credentials_secret.get_secret_value().encode()
    if settings.portal_credentials_dir is not None:
        path = settings.portal_credentials_dir / SECRET_FILE
        if path.exists():
            return load_or_create_secret(path)
    return None


def create_app(
    settings: PortalSettings,
    access: Access | None = None,
    pool: ConnectionPool | None = None,
) -> FastAPI:
    """The ASGI app. ``access``: the module deciding who sees what (``storage.access``);
    ``pool``: connections as the portal's role (default: a pool on ``settings.database_url``,
    opened with the app and closed with it)."""
    access = access or storage_access
    own_pool = pool is None
    pool = pool or ConnectionPool(
        settings.database_url, min_size=1, max_size=settings.portal_pool_size, open=False, name="portal"
    )
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(pct=views.pct, when=views.when, excerpt=views.excerpt)
    templates.env.globals.update(refresh_s=settings.portal_refresh_s)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        if own_pool:
            pool.open(wait=True, timeout=30)
        try:
            yield
        finally:
            if own_pool:
                pool.close()

    app = FastAPI(
        title="pilotlab portal",
        summary="Pilots, devices, rejections, alerts and impact of the city lab's technology pilots.",
        description="Authenticate with `Authorization: Bearer TOKEN` (a token from `pilotlab access grant`). "
        "A startup's token sees only its own experiments; another startup's experiment is a 404.",
        version="1",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN: the portal serves nothing from
        # outside, so the schema is at /openapi.json and a server-rendered list at /api
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.portal_session_secret.get_secret_value(),
        session_cookie=SESSION_COOKIE,
        max_age=settings.portal_session_max_age_s,
        same_site="lax",
        https_only=settings.portal_https_only,
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @contextlib.contextmanager
    def scope(token: str | None) -> Iterator[tuple[psycopg.Connection, Principal] | None]:
        """A connection whose reads see what the token's principal may see; None: no such token."""
        if not token:
            yield None
            return
        with pool.connection() as conn:
            principal = access.authenticate(conn, token)
            if principal is None:
                yield None
                return
            with access.scoped(conn, principal):
                yield conn, principal

    # --- reads shared by the pages and the API -------------------------------------------------

    def overview(conn: psycopg.Connection, summary: q.ExperimentSummary) -> PilotOverview:
        return PilotOverview(summary, [views.impact_view(r) for r in q.impacts(conn, summary.experiment_id)])

    def visible(conn: psycopg.Connection, experiment_id: str) -> q.ExperimentSummary:
        s = q.experiment_summary(conn, experiment_id)
        if s is None:
            raise HTTPException(404, f"no experiment {experiment_id!r}")
        return s

    def credentials(conn: psycopg.Connection, experiment_id: str) -> list[views.DeviceCredential] | None:
        secret, broker = credentials_secret(settings), settings.device_broker_url
        if secret is None or broker is None:
            return None
        return views.device_credentials(experiment_id, [d.device_id for d in q.device_health(conn, experiment_id)],
                                        secret, broker)

    # --- API --------------------------------------------------------------------------------------

    bearer = HTTPBearer(auto_error=False, description="a token from `pilotlab access grant`")

    def api_scope(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]):
        with scope(cred.credentials if cred else None) as scoped:
            if scoped is None:
                raise HTTPException(
                    401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
                )
            yield scoped

    Scoped = Annotated[tuple[psycopg.Connection, Principal], Depends(api_scope)]

    @app.get("/api/whoami", tags=["api"])
    def api_whoami(s: Scoped) -> Whoami:
        return Whoami(s[1].startup, s[1].startup is None)

    @app.get("/api/experiments", tags=["api"])
    def api_experiments(s: Scoped) -> list[PilotOverview]:
        """Every pilot the token may see, with its impact verdicts."""
        return [overview(s[0], e) for e in q.experiment_summaries(s[0])]

    @app.get("/api/experiments/{experiment_id}", tags=["api"])
    def api_experiment(experiment_id: str, s: Scoped) -> PilotOverview:
        return overview(s[0], visible(s[0], experiment_id))

    @app.get("/api/experiments/{experiment_id}/devices", tags=["api"])
    def api_devices(experiment_id: str, s: Scoped) -> list[q.DeviceHealth]:
        visible(s[0], experiment_id)
        return q.device_health(s[0], experiment_id)

    @app.get("/api/experiments/{experiment_id}/rejections", tags=["api"])
    def api_rejections(
        experiment_id: str, s: Scoped, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[q.Rejection]:
        """The newest rejections, with the reason code sent to the device and the payload's start."""
        visible(s[0], experiment_id)
        return q.recent_rejections(s[0], experiment_id, limit)

    @app.get("/api/experiments/{experiment_id}/alerts", tags=["api"])
    def api_alerts(experiment_id: str, s: Scoped) -> list[AlertEpisode]:
        visible(s[0], experiment_id)
        return q.alerts(s[0], experiment_id)

    @app.get("/api/experiments/{experiment_id}/impact", tags=["api"])
    def api_impact(experiment_id: str, s: Scoped) -> list[views.ImpactView]:
        """Each impact KPI: verdict, estimate and 95% interval (text and numbers), warnings, details."""
        visible(s[0], experiment_id)
        return [views.impact_view(r) for r in q.impacts(s[0], experiment_id)]

    @app.get("/api/experiments/{experiment_id}/credentials", tags=["api"])
    def api_credentials(experiment_id: str, s: Scoped) -> list[views.DeviceCredential]:
        """Each device's MQTT account, topics and broker (503 when this portal has no lab secret)."""
        visible(s[0], experiment_id)
        creds = credentials(s[0], experiment_id)
        if creds is None:
            raise HTTPException(503, "this portal is not configured to show device credentials")
        return creds

    # --- pages ------------------------------------------------------------------------------------

    def page_scope(request: Request):
        with scope(request.session.get("token")) as scoped:
            if scoped is None:
                raise NotSignedIn
            yield scoped

    PageScoped = Annotated[tuple[psycopg.Connection, Principal], Depends(page_scope)]

    @app.exception_handler(NotSignedIn)
    async def _not_signed_in(request: Request, _exc: NotSignedIn) -> Response:
        request.session.clear()
        if request.headers.get("HX-Request"):  # a poll after logout or revocation: the whole page goes
            return Response(status_code=200, headers={"HX-Redirect": "/login"})
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/") or request.url.path.startswith("/openapi"):
            return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
        return templates.TemplateResponse(
            request, "error.html", {"status": exc.status_code, "detail": exc.detail, "principal": None},
            status_code=exc.status_code,
        )

    def render(request: Request, name: str, principal: Principal | None, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request, name, {"principal": principal, "now": datetime.now(UTC), **ctx}
        )

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request) -> HTMLResponse:
        return render(request, "login.html", None, error=None)

    @app.post("/login", include_in_schema=False)
    def login(request: Request, token: Annotated[str, Form()]) -> Response:
        token = token.strip()
        with scope(token) as scoped:
            if scoped is None:
                resp = render(request, "login.html", None, error="That token is not valid (or was revoked).")
                resp.status_code = 401
                return resp
        request.session.clear()
        request.session["token"] = token
        return RedirectResponse("/", status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(request: Request, s: PageScoped) -> HTMLResponse:
        pilots = [overview(s[0], e) for e in q.experiment_summaries(s[0])]
        return render(request, "overview.html", s[1], pilots=pilots)

    @app.get("/fragments/overview", response_class=HTMLResponse, include_in_schema=False)
    def home_fragment(request: Request, s: PageScoped) -> HTMLResponse:
        pilots = [overview(s[0], e) for e in q.experiment_summaries(s[0])]
        return render(request, "_overview_rows.html", s[1], pilots=pilots)

    def live(conn: psycopg.Connection, experiment_id: str) -> dict[str, Any]:
        return {
            "devices": q.device_health(conn, experiment_id),
            "rejections": q.recent_rejections(conn, experiment_id, 20),
            "alerts": q.alerts(conn, experiment_id),
        }

    @app.get("/experiments/{experiment_id}", response_class=HTMLResponse, include_in_schema=False)
    def experiment_page(request: Request, experiment_id: str, s: PageScoped) -> HTMLResponse:
        pilot = overview(s[0], visible(s[0], experiment_id))
        return render(
            request, "experiment.html", s[1], pilot=pilot, credentials=credentials(s[0], experiment_id),
            **live(s[0], experiment_id),
        )

    @app.get("/experiments/{experiment_id}/live", response_class=HTMLResponse, include_in_schema=False)
    def experiment_live(request: Request, experiment_id: str, s: PageScoped) -> HTMLResponse:
        pilot = overview(s[0], visible(s[0], experiment_id))
        return render(request, "_live.html", s[1], pilot=pilot, **live(s[0], experiment_id))

    @app.get("/experiments/{experiment_id}/report", response_class=HTMLResponse, include_in_schema=False)
    def experiment_report(experiment_id: str, s: PageScoped) -> HTMLResponse:
        """The self-contained impact report (``pilotlab report``), read with the principal's role."""
        visible(s[0], experiment_id)
        return HTMLResponse(report.render(report.load(s[0], experiment_id)))

    @app.get("/api", response_class=HTMLResponse, include_in_schema=False)
    def api_index(request: Request) -> HTMLResponse:
        """The API's endpoints, from its OpenAPI schema."""
        paths = [
            (path, method.upper(), op.get("summary", ""), op.get("description", ""))
            for path, ops in app.openapi()["paths"].items()
            for method, op in ops.items()
        ]
        return render(request, "api.html", None, paths=paths, info=app.openapi()["info"])

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app

"""The console's ASGI application (Starlette): pages, sign-in, roles, CSRF and security headers.

Every page is rendered on the server (Jinja2, autoescaped); the one script (``static/console.js``) only
adds conveniences. Every request that changes something is a POST carrying the session's CSRF token; every
view of a study or image and every action is an ``audit_events`` row with the account and the client
address. URLs carry database ids only, never a UID, name or accession number.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from screener.core import audit
from screener.core.config import ConsoleConfig
from screener.core.db.models import DeliveryChannel
from screener.core.errors import ScreenerError
from screener.core.logs import get_logger
from screener.ops.console import accounts, admin, dashboard, studies
from screener.ops.console.accounts import Role
from screener.ops.console.plots import bar_chart
from screener.ops.console.sessions import (
    COOKIE_NAME,
    SignedIn,
    csrf_matches,
    end_session,
    find_session,
    purge_expired,
    start_session,
)

log = get_logger("screener.console")

HERE = Path(__file__).parent
LOGIN_COOKIE = "screener_console_login"
CSRF_FIELD = "csrf_token"

LOGIN_OK = "console.login"
LOGIN_FAILED = "console.login_failed"
LOGIN_LOCKED = "console.login_locked"
LOGOUT = "console.logout"
DENIED = "console.denied"
CSRF_REFUSED = "console.csrf_refused"
DELIVERIES_RETRIED = "console.deliveries_retried"
MODEL_PROMOTE = "console.model_promote"
MODEL_ROLLBACK = "console.model_rollback"
USER_CHANGED = "console.user_changed"

CHANNELS: tuple[str, ...] = tuple(c.value for c in DeliveryChannel)  # deliveries.channel

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

MESSAGES = {
    "review": "Your review was recorded.",
    "retried": "Deliveries re-driven.",
    "user": "Account updated.",
}


@dataclass(frozen=True)
class ConsoleContext:
    """What the console needs: its settings, the database, where spooled images are, and a few settings
    of other units it shows (results mode, the decoder's pixel limit, the settings file for the trainer)."""

    settings: ConsoleConfig
    engine: Engine
    spool_root: Path | None
    results_mode: str = "live"
    max_pixels: int = 100_000_000
    config_source: str | None = None

    @property
    def tls(self) -> bool:
        return self.settings.tls.enabled


class SecurityHeaders:
    """Adds CSP (no inline script or style, frame-ancestors none), nosniff, no-referrer, no caching of
    pages (they may hold PHI) and HSTS under TLS to every response."""

    def __init__(self, app: ASGIApp, tls: bool) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                extra = [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
                    (b"cache-control", b"public, max-age=3600" if static else b"no-store"),
                ]
                if self.tls:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers + extra
            await send(message)

        await self.app(scope, receive, add_headers)


def _client(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


Handler = Callable[[Request, SignedIn], Awaitable[Response]]


def build_app(ctx: ConsoleContext) -> ASGIApp:
    """The console application over ``ctx``."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["role_allows"] = accounts.allows

    def db() -> Session:
        return Session(ctx.engine)

    def _audit(action: str, actor: str, subject: str, detail: dict[str, Any]) -> None:
        with db() as session, session.begin():
            audit.record(session, action, actor=actor, subject=subject, detail=detail)

    def page(
        request: Request, name: str, user: SignedIn | None, status: int = 200, **values: Any
    ) -> Response:
        values.update(
            user=user,
            csrf=user.csrf_token if user else None,
            message=MESSAGES.get(request.query_params.get("done", "")),
        )
        return templates.TemplateResponse(request, name, values, status_code=status)

    async def refuse(request: Request, user: SignedIn | None, status: int, text: str) -> Response:
        return page(request, "error.html", user, status=status, status_code=status, text=text)

    def requires(role: Role) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
        def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                token = request.cookies.get(COOKIE_NAME)

                def lookup() -> SignedIn | None:
                    with db() as session:
                        return find_session(session, token)

                user = await run_in_threadpool(lookup)
                if user is None:
                    if request.method == "GET":
                        return RedirectResponse("/login", status_code=303)
                    return await refuse(request, None, 401, "Your session has ended: sign in again.")
                if not accounts.allows(user.role, role):
                    await run_in_threadpool(
                        _audit,
                        DENIED,
                        f"console:{user.name}",
                        request.url.path[:128],
                        {"from": _client(request), "role": user.role, "needed": role.value},
                    )
                    return await refuse(
                        request,
                        user,
                        403,
                        f"This page needs the {role.value} role; your account is {user.role}.",
                    )
                if request.method == "POST":
                    form = await request.form()
                    if not csrf_matches(user.csrf_token, _field(form, CSRF_FIELD)):
                        await run_in_threadpool(
                            _audit,
                            CSRF_REFUSED,
                            f"console:{user.name}",
                            request.url.path[:128],
                            {"from": _client(request)},
                        )
                        log.warning("console.csrf_refused", user=user.name, path=request.url.path)
                        return await refuse(
                            request,
                            user,
                            403,
                            "The form's security token is missing or stale: reload the page.",
                        )
                return await handler(request, user)

            return endpoint

        return wrap

    # --- sign-in ------------------------------------------------------------------------------------------

    async def login_page(request: Request) -> Response:
        return _login_form(request, None, 200)

    def _login_form(request: Request, error: str | None, status: int) -> Response:
        nonce = secrets.token_urlsafe(32)
        response = templates.TemplateResponse(
            request,
            "login.html",
            {"user": None, "csrf": nonce, "error": error, "message": None},
            status_code=status,
        )
        response.set_cookie(
            LOGIN_COOKIE, nonce, max_age=1800, httponly=True, samesite="strict", secure=ctx.tls, path="/login"
        )
        return response

    async def login(request: Request) -> Response:
        form = await request.form()
        if not csrf_matches(
            request.cookies.get(LOGIN_COOKIE, ""), _field(form, CSRF_FIELD)
        ) or not request.cookies.get(LOGIN_COOKIE):
            return _login_form(request, "The sign-in form expired: try again.", 403)
        name = (_field(form, "name") or "").strip()[:64]
        password = _field(form, "password") or ""
        client = _client(request)

        def check() -> tuple[accounts.Login, str | None, SignedIn | None]:
            with db() as session, session.begin():
                outcome = accounts.authenticate(
                    session,
                    name,
                    password,
                    max_failures=ctx.settings.max_failed_logins,
                    lockout=timedelta(minutes=ctx.settings.lockout_minutes),
                )
                token, signed = None, None
                known = outcome.user is not None
                if outcome.outcome is accounts.LoginOutcome.OK and outcome.user is not None:
                    purge_expired(session)  # sessions of everyone whose sign-in has ended
                    token, signed = start_session(session, outcome.user, client, ctx.settings.session_hours)
                    action = LOGIN_OK
                elif outcome.outcome is accounts.LoginOutcome.LOCKED:
                    action = LOGIN_LOCKED
                else:
                    action = LOGIN_FAILED
                audit.record(
                    session,
                    action,
                    actor=f"console:{name}" if known else "console:unknown",
                    subject=name if known else "unknown account",
                    detail={"from": client, "outcome": outcome.outcome.value},
                )
                return outcome, token, signed

        outcome, token, signed = await run_in_threadpool(check)
        if outcome.outcome is accounts.LoginOutcome.LOCKED:
            log.warning("console.login_locked", user=name)
            return _login_form(
                request,
                "This account is locked after repeated wrong passwords: try later, or ask an admin.",
                403,
            )
        if outcome.outcome is accounts.LoginOutcome.DISABLED:
            return _login_form(request, "This account is disabled: ask an admin.", 403)
        if token is None or signed is None:
            log.info("console.login_failed", known=outcome.user is not None)
            return _login_form(request, "Wrong name or password.", 401)
        log.info("console.login", user=signed.name, role=signed.role)
        target = "/studies" if accounts.allows(signed.role, Role.REVIEWER) else "/dashboard"
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE_NAME,
            token,
            max_age=int(ctx.settings.session_hours * 3600),
            httponly=True,
            samesite="strict",
            secure=ctx.tls,
            path="/",
        )
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    @requires(Role.VIEWER)
    async def logout(request: Request, user: SignedIn) -> Response:
        def end() -> None:
            with db() as session, session.begin():
                end_session(session, user.session_id)
                audit.record(
                    session,
                    LOGOUT,
                    actor=f"console:{user.name}",
                    subject=user.name,
                    detail={"from": _client(request)},
                )

        await run_in_threadpool(end)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE_NAME, path="/")
        return response

    async def home(request: Request) -> Response:
        return RedirectResponse("/dashboard", status_code=303)

    # --- dashboard ----------------------------------------------------------------------------------------

    def _hours(request: Request) -> int:
        try:
            hours = int(request.query_params.get("hours", "24"))
        except ValueError:
            hours = 24
        return hours if hours in dashboard.WINDOWS_HOURS else 24

    @requires(Role.VIEWER)
    async def dashboard_page(request: Request, user: SignedIn) -> Response:
        hours = _hours(request)
        data = await run_in_threadpool(
            dashboard.collect_dashboard, ctx.engine, window_hours=hours, results_mode=ctx.results_mode
        )
        charts = {
            "received": bar_chart(
                f"Instances received per {data.bucket}",
                [(k[5:] if data.bucket == "hour" else k, v) for k, v in data.received_per_bucket],
            ),
            "verdicts": bar_chart("Verdicts", list(data.verdicts.items())),
            "statuses": bar_chart(
                "Instances by status", [(k, v) for k, v in data.status["instances"].items() if k != "total"]
            ),
        }
        return page(request, "dashboard.html", user, d=data, charts=charts, windows=dashboard.WINDOWS_HOURS)

    @requires(Role.VIEWER)
    async def dashboard_json(request: Request, user: SignedIn) -> Response:
        data = await run_in_threadpool(
            dashboard.collect_dashboard,
            ctx.engine,
            window_hours=_hours(request),
            results_mode=ctx.results_mode,
        )
        return JSONResponse(data.as_dict())

    @requires(Role.VIEWER)
    async def site_page(request: Request, user: SignedIn) -> Response:
        figures = await run_in_threadpool(dashboard.collect_site, ctx.engine, ctx.spool_root)
        return page(request, "site.html", user, f=figures)

    @requires(Role.VIEWER)
    async def site_plot(request: Request, user: SignedIn) -> Response:
        which = request.path_params["which"]
        if which not in ("site-performance", "drift"):
            return await refuse(request, user, 404, "No such plot.")

        def draw() -> bytes:
            with tempfile.TemporaryDirectory(prefix="screener-console-") as tmp:
                out = Path(tmp) / "plot.png"
                dashboard.site_plot(ctx.engine, ctx.spool_root, which, out)
                return out.read_bytes()

        try:
            png = await run_in_threadpool(draw)
        except ScreenerError as exc:
            return await refuse(request, user, 409, f"No plot: {exc}")
        return Response(png, media_type="image/png")

    # --- worklist and review ------------------------------------------------------------------------------

    @requires(Role.REVIEWER)
    async def worklist_page(request: Request, user: SignedIn) -> Response:
        q = request.query_params
        verdict = q.get("verdict") or None
        model = q.get("model") or None
        flt = studies.WorklistFilter(
            verdict=verdict if verdict in studies.verdict_choices() else None,
            day_from=_date(q.get("from")),
            day_to=_date(q.get("to")),
            model=model[:64] if model else None,
            unreviewed=q.get("unreviewed") == "1",
            page=_int(q.get("page"), 1),
        )
        found = await run_in_threadpool(studies.worklist, ctx.engine, flt)
        versions = await run_in_threadpool(studies.model_versions, ctx.engine)
        return page(
            request,
            "worklist.html",
            user,
            w=found,
            flt=flt,
            verdicts=studies.verdict_choices(),
            versions=versions,
            query={k: v for k, v in q.items() if k != "page"},
        )

    @requires(Role.REVIEWER)
    async def study_page(request: Request, user: SignedIn) -> Response:
        return await _study(request, user, None, 200)

    async def _study(request: Request, user: SignedIn, error: str | None, status: int) -> Response:
        study_id = _int(request.path_params.get("study_id"), 0)
        view = await run_in_threadpool(studies.study_view, ctx.engine, study_id, ctx.spool_root)
        if view is None:
            return await refuse(request, user, 404, "No such study.")
        await run_in_threadpool(
            _audit,
            studies.STUDY_VIEWED,
            f"console:{user.name}",
            view.uid,
            {"from": _client(request), "study_id": view.id},
        )
        return page(
            request,
            "study.html",
            user,
            status=status,
            s=view,
            classes=tuple(view.probabilities) or studies.classes(),
            error=error,
        )

    @requires(Role.REVIEWER)
    async def study_image(request: Request, user: SignedIn) -> Response:
        study_id = _int(request.path_params.get("study_id"), 0)
        instance_id = _int(request.path_params.get("instance_id"), 0)

        def render() -> tuple[str | None, bytes | None, str | None]:
            from screener.core.db.models import Instance, Study

            with db() as session:
                inst = session.get(Instance, instance_id)
                if inst is None or inst.study_id != study_id or inst.spool_deleted_at is not None:
                    return None, None, "no such image"
                study = session.get(Study, study_id)
                uid = study.study_instance_uid if study is not None else ""
                spool_name = inst.spool_name
            if ctx.spool_root is None:
                return uid, None, "no spool configured"
            try:
                png = studies.render_instance_png(ctx.spool_root / spool_name, max_pixels=ctx.max_pixels)
            except (ScreenerError, OSError, ValueError) as exc:
                return uid, None, type(exc).__name__
            with db() as session, session.begin():
                audit.record(
                    session,
                    studies.IMAGE_VIEWED,
                    actor=f"console:{user.name}",
                    subject=uid,
                    detail={"from": _client(request), "study_id": study_id, "instance_id": instance_id},
                )
            return uid, png, None

        _, png, problem = await run_in_threadpool(render)
        if png is None:
            return Response(f"image unavailable: {problem}", status_code=404, media_type="text/plain")
        return Response(png, media_type="image/png")

    @requires(Role.REVIEWER)
    async def study_heatmap(request: Request, user: SignedIn) -> Response:
        study_id = _int(request.path_params.get("study_id"), 0)
        instance_id = _int(request.path_params.get("instance_id"), 0)

        def render() -> bytes | None:
            found = studies.heatmap_of(ctx.engine, study_id, instance_id)
            if found is None or ctx.spool_root is None:
                return None
            uid, spool_name, stored = found
            try:
                png = studies.render_heatmap_png(
                    ctx.spool_root / spool_name, stored, max_pixels=ctx.max_pixels
                )
            except (ScreenerError, OSError, ValueError):
                return None
            _audit(
                studies.IMAGE_VIEWED,
                f"console:{user.name}",
                uid,
                {"from": _client(request), "study_id": study_id, "instance_id": instance_id, "heatmap": True},
            )
            return png

        png = await run_in_threadpool(render)
        if png is None:
            return Response("no heatmap for this image", status_code=404, media_type="text/plain")
        return Response(png, media_type="image/png")

    @requires(Role.REVIEWER)
    async def review(request: Request, user: SignedIn) -> Response:
        study_id = _int(request.path_params.get("study_id"), 0)
        form = await request.form()

        def save() -> None:
            with db() as session, session.begin():
                studies.record_review(
                    session,
                    study_id,
                    reviewer=user.name,
                    decision=_field(form, "decision") or "",
                    correct_class=_field(form, "correct_class") or None,
                    comment=_field(form, "comment"),
                    client=_client(request),
                )

        try:
            await run_in_threadpool(save)
        except studies.ReviewError as exc:
            return await _study(request, user, str(exc), 400)
        log.info("console.review", user=user.name, study_id=study_id)
        return RedirectResponse(f"/studies/{study_id}?done=review", status_code=303)

    # --- admin --------------------------------------------------------------------------------------------

    @requires(Role.ADMIN)
    async def deliveries_page(request: Request, user: SignedIn) -> Response:
        status = request.query_params.get("status") or None
        if status not in (None, "pending", "sent", "failed", "dead"):
            status = None
        channel = request.query_params.get("channel") or None
        if channel not in (None, *CHANNELS):
            channel = None

        def load() -> list[dict[str, Any]]:
            from screener.results.sender import list_deliveries

            with db() as session:
                return [
                    {
                        "id": d.id,
                        "channel": d.channel,
                        "study_result_id": d.study_result_id,
                        "destination": d.destination,
                        "object": d.object_kind,
                        "status": str(getattr(d.status, "value", d.status)),
                        "attempts": d.attempts,
                        "next_attempt_at": d.next_attempt_at,
                        "last_error": d.last_error,
                    }
                    for d in list_deliveries(session, status, channel=channel)
                ]

        rows = await run_in_threadpool(load)
        return page(
            request, "deliveries.html", user, rows=rows, shown=status, channel=channel, channels=CHANNELS
        )

    @requires(Role.ADMIN)
    async def deliveries_retry(request: Request, user: SignedIn) -> Response:
        form = await request.form()
        dead = _field(form, "dead") == "1"
        channel = _field(form, "channel") or None
        if channel not in (None, *CHANNELS):
            return await refuse(request, user, 400, f"Unknown channel: choose one of {', '.join(CHANNELS)}.")
        ids = [_int(v, 0) for v in form.getlist("id") if isinstance(v, str)]
        ids = [i for i in ids if i > 0]

        def retry() -> int:
            from screener.results.sender import retry_deliveries

            with db() as session, session.begin():
                count = retry_deliveries(session, ids, dead, channel=channel)
                audit.record(
                    session,
                    DELIVERIES_RETRIED,
                    actor=f"console:{user.name}",
                    subject="dead" if dead else ",".join(map(str, ids))[:128] or "none",
                    detail={
                        "from": _client(request),
                        "ids": ids,
                        "dead": dead,
                        "channel": channel,
                        "count": count,
                    },
                )
                return count

        if not ids and not dead:
            return await refuse(request, user, 400, "Choose deliveries to retry, or retry every dead one.")
        await run_in_threadpool(retry)
        return RedirectResponse("/admin/deliveries?done=retried", status_code=303)

    @requires(Role.ADMIN)
    async def models_page(request: Request, user: SignedIn) -> Response:
        return await _models(request, user, None)

    async def _models(request: Request, user: SignedIn, result: admin.CommandResult | None) -> Response:
        def load() -> list[dict[str, Any]]:
            import json as _json

            from screener.model.registry import list_versions

            with db() as session:
                out = []
                for r in list_versions(session):
                    card = _json.loads(r.card_json)
                    metrics = card.get("metrics", {}) if isinstance(card.get("metrics"), dict) else {}
                    out.append(
                        {
                            "version": r.version,
                            "status": str(getattr(r.status, "value", r.status)),
                            "architectures": r.architectures,
                            "created_at": r.created_at,
                            "activated_at": r.activated_at,
                            "figures": {
                                k: metrics[k]
                                for k in dashboard.CARD_FIGURES
                                if isinstance(metrics.get(k), int | float)
                            },
                            "int8": isinstance(card.get("int8"), dict) and card["int8"].get("passed") is True,
                        }
                    )
                return out

        rows = await run_in_threadpool(load)
        return page(request, "models.html", user, rows=rows, result=result)

    @requires(Role.ADMIN)
    async def models_action(request: Request, user: SignedIn) -> Response:
        form = await request.form()
        action = request.path_params["action"]
        version = (_field(form, "version") or "").strip()[:64]
        if action not in ("promote", "rollback") or (action == "promote" and not version):
            return await refuse(request, user, 400, "Choose a model version to promote.")
        force = _field(form, "force") == "1"
        try:
            if action == "promote":
                result = await run_in_threadpool(admin.promote, version, ctx.config_source, force=force)
            else:
                result = await run_in_threadpool(admin.rollback, ctx.config_source)
        except admin.AdminError as exc:
            return await refuse(request, user, 500, str(exc))
        await run_in_threadpool(
            _audit,
            MODEL_PROMOTE if action == "promote" else MODEL_ROLLBACK,
            f"console:{user.name}",
            version or "active",
            {"from": _client(request), "exit_code": result.exit_code, "force": force},
        )
        return await _models(request, user, result)

    @requires(Role.ADMIN)
    async def users_page(request: Request, user: SignedIn) -> Response:
        return await _users(request, user, None, 200)

    async def _users(request: Request, user: SignedIn, error: str | None, status: int) -> Response:
        def load() -> list[dict[str, Any]]:
            with db() as session:
                return [
                    {
                        "name": u.name,
                        "role": u.role,
                        "disabled": u.disabled,
                        "locked_until": u.locked_until,
                        "last_login_at": u.last_login_at,
                    }
                    for u in accounts.list_users(session)
                ]

        rows = await run_in_threadpool(load)
        return page(
            request, "users.html", user, status=status, rows=rows, roles=[r.value for r in Role], error=error
        )

    @requires(Role.ADMIN)
    async def users_action(request: Request, user: SignedIn) -> Response:
        form = await request.form()
        action = request.path_params["action"]
        name = (_field(form, "name") or "").strip()
        role = _field(form, "role") or ""
        password = _field(form, "password") or ""

        def apply() -> None:
            with db() as session, session.begin():
                if action == "add":
                    accounts.add_user(session, name, role, password)
                elif action == "disable":
                    if name == user.name:
                        raise accounts.AccountError("you cannot disable your own account")
                    accounts.disable_user(session, name)
                elif action == "enable":
                    accounts.enable_user(session, name)
                elif action == "passwd":
                    accounts.set_password(session, name, password)
                elif action == "role":
                    accounts.set_role(session, name, role)
                else:
                    raise accounts.AccountError(f"unknown action {action!r}")
                audit.record(
                    session,
                    USER_CHANGED,
                    actor=f"console:{user.name}",
                    subject=name[:128],
                    detail={"from": _client(request), "action": action, "role": role or None},
                )

        try:
            await run_in_threadpool(apply)
        except accounts.AccountError as exc:
            return await _users(request, user, str(exc), 400)
        return RedirectResponse("/admin/users?done=user", status_code=303)

    routes = [
        Route("/", home),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/dashboard", dashboard_page),
        Route("/dashboard.json", dashboard_json),
        Route("/site", site_page),
        Route("/site/{which}.png", site_plot),
        Route("/studies", worklist_page),
        Route("/studies/{study_id:int}", study_page),
        Route("/studies/{study_id:int}/images/{instance_id:int}.png", study_image),
        Route("/studies/{study_id:int}/images/{instance_id:int}/heatmap.png", study_heatmap),
        Route("/studies/{study_id:int}/review", review, methods=["POST"]),
        Route("/admin/deliveries", deliveries_page),
        Route("/admin/deliveries/retry", deliveries_retry, methods=["POST"]),
        Route("/admin/models", models_page),
        Route("/admin/models/{action}", models_action, methods=["POST"]),
        Route("/admin/users", users_page),
        Route("/admin/users/{action}", users_action, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes)
    return SecurityHeaders(app, ctx.tls)


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _date(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None

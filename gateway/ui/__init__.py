"""The dashboard served by `gateway serve`: sign-in, pages, and their static assets.

Templates live in `templates/`, plain CSS and JavaScript in `static/` (no build step, no CDN).
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.ui import pages, signin
from gateway.ui.templating import STATIC_DIR, Renderer

routes: list[BaseRoute] = [
    Route("/login", signin.login_form, methods=["GET"], include_in_schema=False),
    Route("/login", signin.login, methods=["POST"], include_in_schema=False),
    Route("/logout", signin.logout, methods=["POST"], include_in_schema=False),
    *pages.routes,
    Mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static"),
]

__all__ = ["Renderer", "routes"]

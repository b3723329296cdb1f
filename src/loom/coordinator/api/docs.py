"""API docs at `/docs`, served offline: Swagger UI's assets come from the pinned
`swagger-ui-bundle` package, never from a CDN (a coordinator on a laptop with no internet
still shows its docs)."""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle  # type: ignore[import-untyped]
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from loom.coordinator.errors import NotFound

ASSETS = Path(swagger_ui_bundle.swagger_ui_path)
SERVED = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
PREFIX = "/docs/assets"

router = APIRouter(include_in_schema=False)


@router.get("/docs", response_class=HTMLResponse)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="Loom coordinator API",
        swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{PREFIX}/favicon-32x32.png",
    )


@router.get(PREFIX + "/{name}")
async def asset(name: str) -> Response:
    media = SERVED.get(name)
    if media is None:
        raise NotFound("not_found", f"no docs asset {name!r}")
    body = (ASSETS / name).read_bytes()
    return Response(body, media_type=media, headers={"Cache-Control": "max-age=86400"})


def install(app: FastAPI) -> None:
    app.include_router(router)

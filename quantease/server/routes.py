"""Routes quantease adds to vLLM's OpenAI-compatible app.

Installed through vLLM's own `--middleware` option (an HTTP middleware function), which vLLM 0.24 .. 0.32 all
apply to the app they build: no patching of vLLM's app factory, which moved between releases.
"""
import os

from fastapi.responses import JSONResponse

from quantease.errors import QuantEaseError

DIR_ENV = "QUANTEASE_SERVE_DIR"
_cache = {}


def quantization_report():
    folder = os.environ.get(DIR_ENV)
    if not folder:
        raise QuantEaseError(f"{DIR_ENV} is not set: start the server with `quantease serve DIR`")
    if folder not in _cache:
        from quantease.server.checkpoint import report

        _cache[folder] = report(folder)
    return _cache[folder]


async def quantization_route(request, call_next):
    """GET /v1/quantization -> the served checkpoint's quantization report."""
    if request.url.path.rstrip("/") != "/v1/quantization":
        return await call_next(request)
    if request.method != "GET":
        return JSONResponse({"error": {"message": "use GET", "type": "BadRequestError", "code": 405}},
                            status_code=405, headers={"Allow": "GET"})
    try:
        return JSONResponse(quantization_report())
    except QuantEaseError as e:
        return JSONResponse({"error": {"message": str(e), "type": "InternalServerError", "code": 500}},
                            status_code=500)

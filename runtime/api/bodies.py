"""Request bodies: the size limit, enforced before a body is buffered, and the JSON content type every body
must declare."""
from fastapi import Request
from fastapi.responses import JSONResponse

from semipd.runtime.protocol import APIError


class BodyLimitMiddleware:
    """Refuses request bodies over the limit with 413 before they are buffered: at once by Content-Length when
    the client sends one, else (a chunked upload) as soon as the bytes received pass it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = self.too_large()
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.too_large()       # rendered by the APIError handler, inside the app
            return message

        return await self.app(scope, counting_receive, send)

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of "
                             f"{self.max_bytes / 2**20:g} MiB (semipd serve --max-request-body-mib)",
                        code="request_too_large")


async def json_body(request: Request) -> bytes:
    """The body of a request that must carry JSON. Any other Content-Type (or none) is refused before the body
    is read: a browser sends text/plain, form and Content-Type-less bodies cross-site without a CORS preflight,
    so parsing them as JSON would let any web page start generations on a server it can reach."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        given = f"it is '{media_type}'" if media_type else "none was sent"
        raise APIError(415, f"Content-Type must be application/json ({given})", code="unsupported_media_type")
    return await request.body()

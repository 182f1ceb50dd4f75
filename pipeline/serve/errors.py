"""The one error type of the HTTP API: a status code and an OpenAI-style body."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    """A 400: the request is wrong (`param` names the field)."""
    return ApiError(400, message, param)


def unsupported(param: str, what: str) -> ApiError:
    """A 400 for a field that would change the output and is not supported."""
    return ApiError(400, f"'{param}': {what} is not supported by this server", param,
                    "unsupported_parameter")

"""OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}` with a 4xx status."""

from __future__ import annotations

from typing import Any

import msgspec

# The `type` OpenAI's API gives each status (the `openai` client maps the status to its exception).
TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """A request the server refuses: its HTTP status and what to tell the client."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def json(self) -> bytes:
        return msgspec.json.encode(self.body())


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def unknown_model(name: str, known: list[str]) -> ApiError:
    return ApiError(404, f"The model {name!r} does not exist; this server has: {', '.join(known)}",
                    "model", "model_not_found")


def from_decode(err: msgspec.MsgspecError) -> ApiError:
    """msgspec's decode error as a 400 naming the field (`$.max_tokens` -> param `max_tokens`)."""
    text = str(err)
    if isinstance(err, msgspec.DecodeError) and not isinstance(err, msgspec.ValidationError):
        return bad_request(f"The request body is not valid JSON ({text})", code="invalid_json")
    param = None
    if " - at `$." in text:
        text, _, path = text.rpartition(" - at `$.")
        param = path.rstrip("`")
    elif "missing required field `" in text:
        param = text.rsplit("`", 2)[-2]
    return bad_request(f"{text}" + (f" (at {param})" if param else ""), param)

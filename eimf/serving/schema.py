"""The serving contract, defined once: the request, the answer and the error of one user's recommendation.

Every way of asking goes through these pydantic models: the Ray Serve app (FastAPI publishes them at
``/openapi.json``), the MLflow pyfunc model (its signature is derived from them by :func:`mlflow_signature`, and
each DataFrame row is validated by them) and ``eimf recommend``. What needs the catalogue (are the ids known, is
``k`` at most the number of items) is checked afterwards by :class:`eimf.serving.recommender.Recommender`.

A rejected request raises :class:`RequestError` with the field (``history[3]``, ``k``; ``None`` for the body as a
whole) and the reason; over HTTP it is the :class:`ErrorResponse` ``{"error": {"field": ..., "reason": ...}}``
with a 4xx status.
"""
from __future__ import annotations

import math
from numbers import Integral
from typing import Any, List, Mapping, Optional

import numpy as np
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, WithJsonSchema,
                      field_validator)
from typing_extensions import Annotated

DEFAULT_K = 10
#: Bounds on what one request may ask, so that one request cannot hold a replica for long.
MAX_K = 1000
MAX_HISTORY = 10_000
#: Longer ids are refused: no catalogue has them, and they would only cost memory.
MAX_ID_CHARS = 256


class RequestError(ValueError):
    """A request that cannot be served: ``field`` (None for the whole body) and ``reason``."""

    def __init__(self, reason: str, field: Optional[str] = None):
        # a field name or reason may quote the request (a key with a lone surrogate): an error must still encode
        self.field, self.reason = (None if field is None else utf8_safe(field)), utf8_safe(reason)
        super().__init__(f"{field}: {reason}" if field else reason)

    def prefixed(self, prefix: str) -> "RequestError":
        """The same error one level down, e.g. ``request 3`` of a batch."""
        return RequestError(self.reason, f"{prefix}.{self.field}" if self.field else prefix)


def utf8_safe(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates, which JSON's ``\\ud800`` escapes can carry)
    written as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _item_id(value: Any) -> str:
    if isinstance(value, str):
        if not 1 <= len(value) <= MAX_ID_CHARS:
            raise ValueError(f"an item id has 1 to {MAX_ID_CHARS} characters, got {len(value)}")
        if not _encodes(value):  # the catalogue lookup hashes ids as UTF-8: a lone surrogate would fail it
            raise ValueError(f"an item id is valid Unicode text, got {value!r:.40} (a lone surrogate)")
        return value
    if isinstance(value, (Integral, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    raise ValueError(f"an item id is a string or an integer, got {type(value).__name__} {value!r:.40}")


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _id_list(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # pandas hands list cells over as arrays
        return value.tolist()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of item ids, got {type(value).__name__}")
    return value


#: A raw item id as the log wrote it; integers are accepted and read as their decimal string.
ItemId = Annotated[str, BeforeValidator(_item_id),
                   WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
                                             {"type": "integer"}]})]


class RecommendRequest(BaseModel):
    """One user: their recent raw item ids, oldest first. The model reads the last ``maxlen`` known ones; unknown
    ids are ignored and counted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    history: Annotated[List[ItemId], BeforeValidator(_id_list), Field(min_length=1, max_length=MAX_HISTORY)] = Field(
        description="recent raw item ids, oldest first")
    k: Optional[Annotated[int, Field(ge=1, le=MAX_K)]] = Field(
        None, description=f"how many items (default {DEFAULT_K}; at most {MAX_K} and the catalogue's size)")
    exclude_seen: Optional[StrictBool] = Field(None, description="drop the history's items (default true)")

    @field_validator("k", mode="before")
    @classmethod
    def _no_bool_or_text(cls, value: Any) -> Any:
        # lax int would read True as 1 and "5" as 5; a number with no fractional part (5.0) is the number 5
        if isinstance(value, (bool, np.bool_, str, bytes)):
            raise ValueError(f"must be an integer, got {type(value).__name__} {value!r:.40}")
        return value


class RecommendResponse(BaseModel):
    """The answer for one user, best first; the lists are parallel."""

    items: List[str] = Field(description="raw item ids")
    scores: List[float] = Field(description="max over interests of the inner product")
    interests: List[int] = Field(description="the interest that attains each score")
    titles: List[str] = Field(description="the items' text")
    interest_labels: List[str] = Field(description="EIMF models: the nearest annotated phrase per interest")
    unknown_ids: int = Field(description="history ids not in the catalogue (ignored)")
    history_used: int = Field(description="known ids fed to the model (the last maxlen)")


class ErrorDetail(BaseModel):
    field: Optional[str] = Field(description="the field at fault, e.g. history[3] or k; null for the whole body")
    reason: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


FIELDS = tuple(RecommendRequest.model_fields)


def plain(request: Any) -> Any:
    """A request with numpy scalars made Python values and missing optional values (None, NaN, as pandas writes
    them) left out, so that a DataFrame row validates like the JSON object it came from."""
    if not isinstance(request, Mapping):
        return request
    out = {}
    for key, value in request.items():
        if isinstance(value, np.generic):
            value = value.item()
        if key != "history" and (value is None or (isinstance(value, float) and math.isnan(value))):
            continue
        out[key] = value
    return out


def validate_request(request: Any) -> RecommendRequest:
    """``request`` (a mapping) as a :class:`RecommendRequest`, or :class:`RequestError` for its first fault."""
    if isinstance(request, RecommendRequest):
        return request
    if not isinstance(request, Mapping):
        raise RequestError(f"a request is an object with a 'history' list, got {type(request).__name__}")
    try:
        return RecommendRequest.model_validate(plain(request))
    except ValidationError as e:
        raise from_validation_error(e) from None


def from_validation_error(e: ValidationError) -> RequestError:
    return from_error_dicts(e.errors(include_url=False))


def from_error_dicts(errors: List[dict]) -> RequestError:
    """pydantic's first error (as ``ValidationError.errors()`` or FastAPI lists them) as a :class:`RequestError`
    with a field path and a reason a person can act on."""
    err = errors[0]
    return RequestError(_reason(err), _field(err["loc"]))


def _field(loc) -> Optional[str]:
    out = ""
    for part in loc:
        if part in ("body",):  # FastAPI puts the body's own errors under "body"
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _reason(err: dict) -> str:
    kind, loc, ctx = err["type"], err["loc"], err.get("ctx") or {}
    field = [p for p in loc if p != "body"]
    name = field[0] if field else None
    got = err.get("input")
    if kind == "missing":
        return "is required" + (": the user's recent raw item ids, oldest first" if name == "history" else "")
    if kind == "extra_forbidden":
        return f"unknown field; a request has {', '.join(FIELDS)}"
    if kind == "too_short" and name == "history" and len(field) == 1:
        return "is empty: at least one known item id is needed (there is no popularity fallback)"
    if kind == "too_long" and name == "history" and len(field) == 1:
        return f"has {ctx.get('actual_length', '?')} ids; at most {MAX_HISTORY} (the model reads the last maxlen)"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}, got {got!r:.40}"
    if kind == "less_than_equal":
        return f"at most {ctx.get('le')} per request, got {got!r:.40}"
    if kind in ("int_from_float", "int_parsing", "int_type"):
        return f"must be an integer, got {type(got).__name__} {got!r:.40}"
    if kind == "bool_type":
        return f"must be true or false, got {type(got).__name__} {got!r:.40}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"a request is an object with a 'history' list, got {type(got).__name__}"
    if kind == "value_error":  # our own validators: their message is the reason
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg']} (got {type(got).__name__} {got!r:.40})"

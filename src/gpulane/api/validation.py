"""Pydantic validation errors as the project's errors: a code, the field, and the fix.

A request model's field carries a :func:`fix` (a wrap validator) that turns whatever pydantic
found wrong with the value into one error with the project's code and message; the model's
bounds still come from its type and ``Field``, so the OpenAPI document and the check are one.
:func:`request_error` renders the first error of a pydantic ``ValidationError`` (or FastAPI's
``RequestValidationError``) as a :class:`~gpulane.errors.RequestError`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationInfo, ValidatorFunctionWrapHandler, WrapValidator
from pydantic import ValidationError as PydanticValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from gpulane.errors import ValidationError

CODE_KEY = "gpulane_code"
"""Context key that marks a pydantic error as already carrying the project's code."""

_TYPE_ERRORS = ("_type", "_parsing")
"""Suffixes of pydantic's error types for a value of the wrong type (not out of range)."""

_NOT_AN_OBJECT = frozenset({"model_type", "model_attributes_type", "dict_type"})


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: cases is a dict
class Fix:
    """How a field's errors read: ``message`` is a ``str.format`` template over ``field``,
    ``value`` and the pydantic error's context (e.g. ``{max_length}``)."""

    code: str
    message: str
    cases: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """pydantic error type -> (code, message) where one field has more than one answer;
    ``missing`` (the field left out, which its own validator never sees) is looked up here
    by :func:`request_error`."""
    types_too: bool = True
    """False: a value of the wrong type keeps the generic ``invalid_request`` answer."""
    field: str | None = None
    """The field's name on the wire when it differs from pydantic's location (headers)."""

    def __call__(self, value: Any, handler: ValidatorFunctionWrapHandler,
                 info: ValidationInfo) -> Any:
        try:
            return handler(value)
        except PydanticValidationError as exc:
            first = exc.errors()[0]
            kind = first["type"]
            if CODE_KEY in (first.get("ctx") or {}) or any(
                    isinstance(part, int) for part in first["loc"]):
                raise  # about an item of a list (a bulk task's field): the item answers
            if kind in self.cases:
                code, message = self.cases[kind]
            elif not self.types_too and kind.endswith(_TYPE_ERRORS):
                raise
            else:
                code, message = self.code, self.message
            ctx = {**(first.get("ctx") or {}), CODE_KEY: code, "template": message}
            if self.field is not None:
                ctx["field"] = self.field
            raise PydanticCustomError(kind, first["msg"], ctx) from None


def fix(code: str, message: str, *, cases: Mapping[str, tuple[str, str]] | None = None,
        types_too: bool = True, field: str | None = None) -> WrapValidator:
    """Annotate a field with the project's error for it (see :class:`Fix`)."""
    return WrapValidator(Fix(code, message, dict(cases or {}), types_too, field))


def custom(code: str, message: str, field_name: str) -> PydanticCustomError:
    """An error a model validator raises about one field (checks across fields)."""
    return PydanticCustomError("value_error", message,
                               {CODE_KEY: code, "template": message, "field": field_name})


def field_path(loc: Sequence[int | str]) -> str:
    """``("tasks", 0, "device")`` as ``tasks[0].device``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def request_error(errors: Sequence[Any], model: type[BaseModel] | None = None,
                  example: str = "") -> ValidationError:
    """The first of pydantic's ``errors()`` as the project's 422. ``model`` (the body's model)
    lets a missing field name what it wants; ``example`` shows a valid body."""
    if not errors:
        return ValidationError("invalid_request", "request: invalid request")
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    path = field_path(loc)
    ctx = dict(err.get("ctx") or {})
    kind = err.get("type", "")
    if CODE_KEY in ctx:
        template = str(ctx.pop("template"))
        path = str(ctx.pop("field", path))
        code = str(ctx.pop(CODE_KEY))
        values = {**ctx, "field": path, "value": err.get("input")}
        return ValidationError(code, template.format(**values), field=path or None)
    if kind in _NOT_AN_OBJECT:
        where = path or "the body"
        like = f" like {example}" if example else ""
        return ValidationError("invalid_body", f"{where} must be a JSON object{like}",
                               field=path or "body")
    if kind == "missing":
        info = _field_info(model, loc)
        own = next((m.func for m in info.metadata if isinstance(m, WrapValidator)
                    and isinstance(m.func, Fix)), None) if info is not None else None
        if own is not None and "missing" in own.cases:
            code, template = own.cases["missing"]
            return ValidationError(code, template.format(field=path, value=None), field=path)
        what = info.description if info is not None else None
        return ValidationError("missing_field", f"{path} is required" + (
            f": {what}" if what else ""), field=path)
    return ValidationError("invalid_request", f"{path or 'request'}: {err.get('msg')}",
                           field=path or None)


def _field_info(model: type[BaseModel] | None, loc: Sequence[int | str]) -> FieldInfo | None:
    """The field at ``loc`` inside ``model`` (through lists of models)."""
    current: Any = model
    info = None
    for part in loc:
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = info.annotation
        if isinstance(current, types.UnionType):
            current = typing.get_args(current)[0]
    return info

"""Typed chapter configs, the three run profiles, and the checks every parameter value passes.

Every chapter is configured by one frozen dataclass derived from :class:`ChapterConfig`.
Its fields are the chapter's papermill parameters; its class attribute ``profiles``
says how the ``smoke`` and ``paper`` profiles differ from the defaults (which are the
``quick`` profile). A chapter builds its config with :meth:`ChapterConfig.from_params`,
passing the parameters cell's values; ``None`` means "the profile's value".

A value is checked against its field's declared type (:func:`field_rules`), so a new
chapter gets the checks for free:

- ``int`` takes integers only (no floats, bools or strings); ``float`` takes finite
  numbers; ``bool`` takes ``True``/``False``; ``str`` takes strings;
- ``tuple[int, ...]`` takes ``(4, 16)``, ``[4, 16]``, ``4,16`` or a single ``4``;
  ``tuple[str, ...]`` also takes a comma-separated string (``bn,gn``);
- numbers are positive; 0 is accepted where the field's default or one of its
  profiles uses 0 (e.g. ``train_size = 0  # 0: all``); negative numbers never.

A field narrows or widens these with ``dataclasses.field(metadata=...)``: ``min`` / ``max``
(inclusive bounds), ``allow_zero``, ``allow_nonfinite`` (NaN and ±inf for a float),
``choices`` (the accepted values) or ``pattern`` (a regular expression a string must
match) with ``accepts`` (how to say it in an error message).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from typing import Any, ClassVar, Mapping, TypeVar

from bnbook.errors import BnbookError

PROFILES: tuple[str, ...] = ("smoke", "quick", "paper")
"""``smoke``: seconds, for tests. ``quick``: the default, minutes on a 2-core CPU.
``paper``: the papers' scale, meant for one GPU (runs on a CPU too, slowly)."""

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
"""Device names the runner and :func:`bnbook.env.resolve_device` accept."""

MAX_SEED = 2**31 - 1
"""Largest base seed: experiments add a few to it and seed torch and NumPy with the sums."""

MAX_INT = 2**63 - 1  # torch and NumPy store integers in int64

C = TypeVar("C", bound="ChapterConfig")


class ParameterError(BnbookError):
    """A parameter value that its field does not accept; names the field, the value and what it accepts."""

    def __init__(self, name: str, value: Any, accepted: str, owner: str = "") -> None:
        self.name, self.value, self.accepted = name, value, accepted
        where = f" of {owner}" if owner else ""
        super().__init__(f"parameter {name!r}{where} expects {accepted}, got {value!r}")


def check_profile(profile: str) -> str:
    """Return ``profile`` if it is one of :data:`PROFILES`, else raise a clear error."""
    if profile not in PROFILES:
        raise BnbookError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    return profile


class _Rejected(Exception):
    """Internal: a value (or an element of it) that a rule does not accept."""


@dataclasses.dataclass(frozen=True)
class FieldRule:
    """What one config field accepts: its type plus bounds, choices or a pattern."""

    name: str
    kind: Any  # the resolved type hint: int, float, bool, str, tuple[...], X | None, ...
    minimum: float | None = 0
    zero_ok: bool = False
    maximum: float | None = None
    finite: bool = True
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    pattern_text: str | None = None

    # ---------------------------------------------------------------- description
    def accepts(self) -> str:
        """What the field accepts, in words (used in error messages)."""
        return self._describe(self.kind)

    def _bounds(self, what: str) -> str:
        if self.minimum is None and self.maximum is None:
            return what
        if self.minimum == 0 and self.maximum is None:
            return f"{what} ≥ 0" if self.zero_ok else f"{what} > 0"
        parts = []
        if self.minimum is not None:
            parts.append(f"≥ {_num(self.minimum)}" if self.zero_ok or self.minimum != 0 else "> 0")
        if self.maximum is not None:
            parts.append(f"≤ {_num(self.maximum)}")
        return f"{what} {' and '.join(parts)}"

    def _describe(self, kind: Any) -> str:
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            return " or ".join(self._describe(a) for a in inner) + " or None"
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                example = {int: ", e.g. (4, 16) or 4,16", float: ", e.g. (0.1, 0.5)", str: ", e.g. a,b"}.get(args[0], "")
                return f"a non-empty tuple of {self._plural(args[0])}{example}"
            return f"a tuple of {len(args)} values ({', '.join(self._describe(a) for a in args)})"
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if kind is bool:
            return "True or False"
        if kind is int:
            return self._bounds("an integer")
        if kind is float:
            return self._bounds("a finite number" if self.finite else "a number")
        if kind is str:
            return self.pattern_text or ("a string matching " + self.pattern if self.pattern else "a string")
        return getattr(kind, "__name__", str(kind))

    def _plural(self, kind: Any) -> str:
        if typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)
            return "tuples of " + (self._plural(inner[0]) if inner[-1] is Ellipsis else self._describe(kind))
        text = self._describe(kind)
        for article in ("an ", "a "):
            if text.startswith(article):
                head, _, tail = text[len(article):].partition(" ")
                return f"{head}s {tail}".strip()
        return text

    # ---------------------------------------------------------------- checking
    def check(self, value: Any) -> Any:
        """Return ``value`` converted to the field's type (e.g. a list to a tuple), or raise.

        Raises :class:`ParameterError` naming the field, the value and what is accepted.
        """
        try:
            return self._coerce(self.kind, value)
        except _Rejected:
            raise ParameterError(self.name, value, self.accepts()) from None

    def _coerce(self, kind: Any, value: Any) -> Any:
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            for arg in (a for a in args if a is not type(None)):
                try:
                    return self._coerce(arg, value)
                except _Rejected:
                    continue
            raise _Rejected
        if origin is tuple:
            return self._coerce_tuple(args, value)
        if self.choices is not None:
            if value not in self.choices or isinstance(value, bool) != any(isinstance(c, bool) for c in self.choices):
                raise _Rejected
            return value
        if kind is bool:
            if not isinstance(value, bool):
                raise _Rejected
            return value
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise _Rejected
            return self._in_range(value)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _Rejected
            try:
                value = float(value)
            except OverflowError:  # an integer beyond float's range
                raise _Rejected from None
            if not math.isfinite(value):
                if self.finite:
                    raise _Rejected
                return value
            return self._in_range(value)
        if kind is str:
            if not isinstance(value, str) or (self.pattern and not re.fullmatch(self.pattern, value)):
                raise _Rejected
            return value
        if isinstance(kind, type) and not isinstance(value, kind):
            raise _Rejected
        return value

    def _coerce_tuple(self, args: tuple[Any, ...], value: Any) -> tuple[Any, ...]:
        variadic = len(args) == 2 and args[1] is Ellipsis
        if isinstance(value, str) and variadic and args[0] is str:
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        elif isinstance(value, str):  # "(4, 16)" or "4,16" from a caller that did not parse it
            try:
                value = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                raise _Rejected from None
        if variadic and not isinstance(value, (list, tuple)) and typing.get_origin(args[0]) is not tuple:
            value = (value,)  # a single element: -p batch_sizes=4
        if not isinstance(value, (list, tuple)):
            raise _Rejected
        if variadic:
            if not value:
                raise _Rejected
            return tuple(self._coerce(args[0], v) for v in value)
        if len(value) != len(args):
            raise _Rejected
        return tuple(self._coerce(a, v) for a, v in zip(args, value))

    def _in_range(self, value: int | float) -> int | float:
        if self.minimum is not None and (value < self.minimum or (value == 0 and self.minimum == 0 and not self.zero_ok)):
            raise _Rejected
        if self.maximum is not None and value > self.maximum:
            raise _Rejected
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise _Rejected
        return value


def _num(x: float) -> str:
    return f"{x:,}" if float(x).is_integer() else f"{x:g}"


def _contains_zero(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_contains_zero(v) for v in value)
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0


def field_rules(cls: type[ChapterConfig]) -> dict[str, FieldRule]:
    """The :class:`FieldRule` of every field of the config class ``cls``, by field name."""
    hints = typing.get_type_hints(cls)
    profiles = getattr(cls, "profiles", {}) or {}
    rules = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        used = [default, *(p[f.name] for p in profiles.values() if f.name in p)]
        choices = meta.get("choices")
        lowest = meta.get("min", 0)
        zero_ok = meta.get("allow_zero", any(_contains_zero(v) for v in used)) or lowest is None or lowest < 0
        rules[f.name] = FieldRule(
            name=f.name,
            kind=hints.get(f.name, Any),
            minimum=lowest,
            zero_ok=bool(zero_ok),
            maximum=meta.get("max"),
            finite=not meta.get("allow_nonfinite", False),
            choices=tuple(choices) if choices is not None else None,
            pattern=meta.get("pattern"),
            pattern_text=meta.get("accepts"),
        )
    return rules


@dataclasses.dataclass(frozen=True)
class ChapterConfig:
    """Fields every chapter has. Subclasses add their own (with quick-profile defaults)."""

    profile: str = dataclasses.field(default="quick", metadata={"choices": PROFILES})  # smoke | quick | paper
    seed: int = dataclasses.field(default=0, metadata={"min": 0, "max": MAX_SEED, "allow_zero": True})
    """Base seed; experiments with several seeds use seed, seed+1, ..."""
    device: str = dataclasses.field(
        default="auto", metadata={"pattern": DEVICE_PATTERN, "accepts": "auto, cpu, cuda or cuda:N"}
    )

    profiles: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    """Per-profile overrides of the field defaults, e.g. ``{"smoke": {"steps": 50}}``."""

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the config's fields, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_param(cls, name: str, value: Any) -> Any:
        """Return ``value`` converted to field ``name``'s type, or raise :class:`ParameterError`."""
        rules = field_rules(cls)
        if name not in rules:
            raise BnbookError(f"unknown parameter {name!r} for {cls.__name__}; known: {', '.join(rules)}")
        return rules[name].check(value)

    @classmethod
    def from_params(cls: type[C], profile: str = "quick", **params: Any) -> C:
        """Build the config of ``profile``, overridden by every parameter that is not ``None``.

        Raises :class:`BnbookError` for an unknown profile or parameter name and
        :class:`ParameterError` for a value its field does not accept, so a typo or a bad
        value in ``-p`` never passes silently.
        """
        check_profile(profile)
        names = cls.field_names()
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise BnbookError(
                f"unknown parameter(s) {', '.join(unknown)} for {cls.__name__}; "
                f"known: {', '.join(names)}"
            )
        for name in cls.profiles.get(profile, {}):
            if name not in names:  # a mistake in the class itself: fail loudly
                raise BnbookError(f"{cls.__name__}.profiles[{profile!r}] sets unknown field {name!r}")
        rules = field_rules(cls)
        values: dict[str, Any] = dict(cls.profiles.get(profile, {}))
        for name, value in params.items():
            if value is None:
                continue
            try:
                values[name] = rules[name].check(value)
            except ParameterError as exc:
                raise ParameterError(name, value, exc.accepted, cls.__name__) from None
        values["profile"] = profile
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)


def stable_hash(obj: Any, length: int = 12) -> str:
    """Return a short hex digest of ``obj``'s canonical JSON form (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]

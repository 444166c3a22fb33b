"""Typed chapter configs and the three run profiles.

Every chapter is configured by one frozen dataclass derived from :class:`ChapterConfig`.
Its fields are the chapter's papermill parameters; its class attribute ``profiles``
says how the ``smoke`` and ``paper`` profiles differ from the defaults (which are the
``quick`` profile). A chapter builds its config with :meth:`ChapterConfig.from_params`,
passing the parameters cell's values; ``None`` means "the profile's value".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar, Mapping, TypeVar

from bnbook.errors import BnbookError

PROFILES: tuple[str, ...] = ("smoke", "quick", "paper")
"""``smoke``: seconds, for tests. ``quick``: the default, minutes on a 2-core CPU.
``paper``: the papers' scale, meant for one GPU (runs on a CPU too, slowly)."""

C = TypeVar("C", bound="ChapterConfig")


def check_profile(profile: str) -> str:
    """Return ``profile`` if it is one of :data:`PROFILES`, else raise a clear error."""
    if profile not in PROFILES:
        raise BnbookError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    return profile


@dataclasses.dataclass(frozen=True)
class ChapterConfig:
    """Fields every chapter has. Subclasses add their own (with quick-profile defaults)."""

    profile: str = "quick"  # smoke | quick | paper
    seed: int = 0  # base seed; experiments with several seeds use seed, seed+1, ...
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    profiles: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    """Per-profile overrides of the field defaults, e.g. ``{"smoke": {"steps": 50}}``."""

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the config's fields, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_params(cls: type[C], profile: str = "quick", **params: Any) -> C:
        """Build the config of ``profile``, overridden by every parameter that is not ``None``.

        Raises :class:`BnbookError` for an unknown profile or an unknown parameter name,
        so a typo in ``-p`` never passes silently.
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
        values: dict[str, Any] = dict(cls.profiles.get(profile, {}))
        values.update({k: v for k, v in params.items() if v is not None})
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

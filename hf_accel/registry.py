"""Method name -> adapter class. ``@register("aded")`` on an adapter class makes ``accel="aded"`` work."""

from __future__ import annotations

_ADAPTERS: dict = {}


def register(name: str):
    def deco(cls):
        if name in _ADAPTERS and _ADAPTERS[name] is not cls:
            raise ValueError(f"an hf_accel method named {name!r} is already registered ({_ADAPTERS[name].__name__})")
        cls.name = name
        _ADAPTERS[name] = cls
        return cls

    return deco


def available() -> list:
    return sorted(_ADAPTERS)


def get(name: str):
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise ValueError(
            f"unknown hf_accel method {name!r}. Available methods: {', '.join(available())}. "
            "Pass one of them as accel=..."
        ) from None

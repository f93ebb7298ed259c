"""Method name -> adapter class. ``@register("aded")`` on an adapter class makes ``accel="aded"`` work."""

from __future__ import annotations

_ADAPTERS: dict = {}
_BY_CONFIG: dict = {}  # config class -> names of the methods registered with it


def register(name: str):
    def deco(cls):
        if name in _ADAPTERS and _ADAPTERS[name] is not cls:
            raise ValueError(f"an hf_accel method named {name!r} is already registered ({_ADAPTERS[name].__name__})")
        cls.name = name
        _ADAPTERS[name] = cls
        config = getattr(cls, "Config", None)
        if config is not None:
            _BY_CONFIG.setdefault(config, []).append(name)
        return cls

    return deco


def available() -> list:
    return sorted(_ADAPTERS)


def get(name: str):
    try:
        return _ADAPTERS[name]
    except KeyError:
        base, paren, rest = str(name).partition("(")
        if paren and base.strip() in _ADAPTERS:  # the bench / demo spelling name(key=value,...)
            items = [item.partition("=") for item in rest.rstrip(") ").split(",") if "=" in item]
            kw = ", ".join(f"{k.strip()!r}: {v.strip()}" for k, _, v in items)
            raise ValueError(
                f"accel={name!r}: options go in accel_kwargs, e.g. accel={base.strip()!r}, accel_kwargs={{{kw}}} "
                "(name(key=value) is the spelling of `hf-accel bench --methods` and `hf-accel demo`)"
            ) from None
        raise ValueError(
            f"unknown hf_accel method {name!r}. Available methods: {', '.join(available())}. "
            "Pass one of them as accel=..."
        ) from None


def method_of(config) -> str:
    """The registered method whose Config class ``config`` is an instance of (``accel=ADEDConfig(...)``)."""
    names = _BY_CONFIG.get(type(config), [])
    if len(names) != 1:
        what = "no registered method" if not names else f"several methods ({', '.join(names)})"
        raise ValueError(
            f"accel={type(config).__name__}(...): {what} takes this config; pass the method by name instead, "
            f"e.g. accel='aded', accel_kwargs={{...}}."
        )
    return names[0]

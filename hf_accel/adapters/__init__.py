"""One file per method; importing this package registers them all."""

from . import aded, clover, ead, hidden_transfer, lora_drop, lud, m2r2  # noqa: F401

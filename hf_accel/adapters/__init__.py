"""One file per method; importing this package registers them all."""

from . import aded, clover, duo_attention, ead, hidden_transfer, lora_drop, lud, m2r2, quant_spec  # noqa: F401

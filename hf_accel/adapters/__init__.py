"""One file per method; importing this package registers them all."""

from . import aded  # noqa: F401

"""Built-in attention modules, one file each. Importing this package registers them."""

from . import lpa, sagan, softmask  # noqa: F401

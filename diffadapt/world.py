"""Moved to :mod:`diffadapt.embedded.world`; this name stays an alias of that module (the same
module object) for existing imports."""

import sys

from diffadapt.embedded import world

sys.modules[__name__] = world

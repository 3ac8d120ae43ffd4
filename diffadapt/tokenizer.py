"""Moved to :mod:`diffadapt.embedded.tokenizer`; this name stays an alias of that module (the same
module object) for existing imports."""

import sys

from diffadapt.embedded import tokenizer

sys.modules[__name__] = tokenizer

"""Where the embedded default model lives: ``diffadapt.embedded`` (kept under this name for the
callers that read ``diffadapt.defaults.default_model_path``)."""

from diffadapt.embedded import DEFAULT_MODEL, default_model_path

__all__ = ["DEFAULT_MODEL", "default_model_path"]

"""Registry of adapter methods. Adding a method = one file + one line here."""

from __future__ import annotations

import importlib

from diffadapt.methods.base import AdapterConfig, AdapterConfigError, LayerSpec, Method

_REGISTRY = {
    "fourierft": "diffadapt.methods.fourierft:FourierFT",
    "boft": "diffadapt.methods.boft:BOFT",
    "oft": "diffadapt.methods.oft:OFT",
    "hra": "diffadapt.methods.hra:HRA",
    "frod": "diffadapt.methods.frod:FRoD",
}

METHOD_NAMES = tuple(_REGISTRY)


def get_method(name: str) -> type[Method]:
    key = name.lower()
    if key not in _REGISTRY:
        raise AdapterConfigError(f"Unknown adapter method {name!r}; choose one of {', '.join(_REGISTRY)}.")
    module_name, cls_name = _REGISTRY[key].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def method_for_peft_type(peft_type: str) -> type[Method]:
    for name in _REGISTRY:
        method = get_method(name)
        if method.config_class.peft_type == peft_type:
            return method
    raise AdapterConfigError(
        f"PEFT type {peft_type!r} is not a diffadapt method; supported: "
        + ", ".join(get_method(n).config_class.peft_type for n in _REGISTRY)
    )


__all__ = ["AdapterConfig", "AdapterConfigError", "LayerSpec", "Method", "get_method", "method_for_peft_type", "METHOD_NAMES"]

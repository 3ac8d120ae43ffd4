"""diffadapt: FourierFT, BOFT/OFT, HRA and FRoD adapters for diffusion models.

Five lines in a notebook::

    import diffadapt as da
    da.add_adapter(pipe.unet, da.BOFTConfig(boft_block_size=8), "subject")   # or da.load_adapter
    da.set_adapters(pipe.unet, ["subject"], [0.8])
    image = pipe("a photo of sks dog").images[0]
    da.merge_adapters(pipe.unet)  # bake for speed; da.unmerge_adapters restores bit-exactly
"""

from __future__ import annotations

from diffadapt._version import __version__

from diffadapt.artifact import ComponentAdapter, PipelineAdapter
from diffadapt.checkpoint import CheckpointError, read_adapter
from diffadapt.defaults import default_model_path
from diffadapt.methods import METHOD_NAMES, AdapterConfig, AdapterConfigError, get_method, method_names
from diffadapt.methods.boft import BOFTConfig
from diffadapt.methods.fourierft import FourierFTConfig
from diffadapt.methods.frod import FRoDConfig
from diffadapt.methods.hra import HRAConfig
from diffadapt.methods.oft import OFTConfig
from diffadapt.model import add_adapter, adapter_config, adapter_parameters, count_parameters, has_adapters
from diffadapt.pipeline import (  # (every verb takes a model or a pipeline)
    active_adapters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    hotswap_adapter,
    list_adapters,
    load_adapter,
    load_lycoris,
    merge_adapters,
    read_pipeline_adapter,
    save_adapter,
    set_adapter_strength,
    set_adapters,
    set_keep_eval_weights,
    unload,
    unmerge_adapters,
)
from diffadapt.formats.lycoris_export import save_lycoris

__all__ = [
    "__version__",
    "FourierFTConfig",
    "BOFTConfig",
    "OFTConfig",
    "HRAConfig",
    "FRoDConfig",
    "AdapterConfig",
    "AdapterConfigError",
    "CheckpointError",
    "METHOD_NAMES",
    "PipelineAdapter",
    "ComponentAdapter",
    "active_adapters",
    "add_adapter",
    "adapter_config",
    "adapter_parameters",
    "count_parameters",
    "has_adapters",
    "default_model_path",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "get_method",
    "method_names",
    "hotswap_adapter",
    "read_pipeline_adapter",
    "list_adapters",
    "load_lycoris",
    "save_lycoris",
    "load_adapter",
    "merge_adapters",
    "read_adapter",
    "save_adapter",
    "set_adapter_strength",
    "set_keep_eval_weights",
    "set_adapters",
    "unload",
    "unmerge_adapters",
]

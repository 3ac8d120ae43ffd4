"""Shared pieces of the diffadapt benchmarks: models built from configs (random weights),
identical inputs, the method settings of the performance issue, timing and memory helpers.

Nothing here downloads anything: every model is built from its config with random weights.
"""

from __future__ import annotations

import copy
import gc
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

# -- models ------------------------------------------------------------------------------------------

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
SD3_TARGETS = UNET_TARGETS + [
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.net.0.proj", "ff_context.net.2",
]


@dataclass
class ModelSpec:
    """A benchmark model: how to build it, its inputs, its adapter targets."""

    name: str
    description: str
    targets: list[str]
    batch: int
    grad_ckpt: bool  # default for --grad-ckpt auto
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, torch.Generator], dict[str, torch.Tensor]]  # (batch, cpu generator) -> kwargs
    input_key: str  # the latent input (gets requires_grad for the floor)


def _small_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _sd15_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    # SD1.5's config: the default down/up block types are SD1.x's (3 cross-attention levels + 1 plain)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def _sd15_widths_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    # SD1.5's widths and attention, fewer blocks: 3 cross-attention levels, one layer each
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(320, 640, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def _sd3_transformer(num_layers: int = 24, sample_size: int = 128) -> torch.nn.Module:
    """SD3-medium's SD3Transformer2DModel config (random weights); fewer layers / smaller latents for sd3w."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        num_layers=num_layers,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )


def _sd3_small() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=32,
    )


def _unet_inputs(channels: int, size: int, text: int, width: int):
    def make(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            "sample": torch.randn(batch, channels, size, size, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "encoder_hidden_states": torch.randn(batch, text, width, generator=g),
        }

    return make


def _sd3_inputs(size: int, text: int, width: int, pooled: int):
    def make(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            "hidden_states": torch.randn(batch, 16, size, size, generator=g),
            "encoder_hidden_states": torch.randn(batch, text, width, generator=g),
            "pooled_projections": torch.randn(batch, pooled, generator=g),
            "timestep": torch.rand(batch, generator=g) * 1000,
        }

    return make


MODELS: dict[str, ModelSpec] = {
    "small": ModelSpec(
        "small",
        "UNet2DConditionModel, block_out_channels (64, 128), both levels cross-attention, layers_per_block 1, "
        "cross_attention_dim 64, attention_head_dim 8; batch 2, 4x16x16 latents, text 77x64",
        UNET_TARGETS, 2, False, _small_unet, _unet_inputs(4, 16, 77, 64), "sample",
    ),
    "sd15": ModelSpec(
        "sd15",
        "SD1.5 UNet2DConditionModel (block_out_channels (320, 640, 1280, 1280), layers_per_block 2, "
        "cross_attention_dim 768, attention_head_dim 8); batch 4, 4x64x64 latents, text 77x768",
        UNET_TARGETS, 4, False, _sd15_unet, _unet_inputs(4, 64, 77, 768), "sample",
    ),
    "sd15w": ModelSpec(
        "sd15w",
        "UNet2DConditionModel at SD1.5 widths with fewer blocks (block_out_channels (320, 640, 1280), all three "
        "levels cross-attention, layers_per_block 1, cross_attention_dim 768, attention_head_dim 8); batch 1, "
        "4x32x32 latents, text 77x768",
        UNET_TARGETS, 1, False, _sd15_widths_unet, _unet_inputs(4, 32, 77, 768), "sample",
    ),
    "sd3": ModelSpec(
        "sd3",
        "SD3-medium SD3Transformer2DModel (24 layers, 24 heads x 64, joint_attention_dim 4096); batch 2, "
        "16x128x128 latents, text 154x4096, pooled 2048",
        SD3_TARGETS, 2, True, _sd3_transformer, _sd3_inputs(128, 154, 4096, 2048), "hidden_states",
    ),
    "sd3w": ModelSpec(
        "sd3w",
        "SD3Transformer2DModel at SD3-medium widths with 2 layers (24 heads x 64, joint_attention_dim 4096, "
        "ff 6144): SD3's layer shapes and FRoD's per-layer memory on a CPU; batch 2, 16x64x64 latents, text 16x4096",
        SD3_TARGETS, 2, True, lambda: _sd3_transformer(2, 64), _sd3_inputs(64, 16, 4096, 2048), "hidden_states",
    ),
    "sd3small": ModelSpec(
        "sd3small",
        "small SD3Transformer2DModel (2 layers, 4 heads x 16, joint_attention_dim 64) for exercising the SD3 "
        "code path (grad ckpt, joint-attention targets) on a CPU; batch 2, 16x16x16 latents, text 16x64",
        SD3_TARGETS, 2, True, _sd3_small, _sd3_inputs(16, 16, 64, 32), "hidden_states",
    ),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_master(spec: ModelSpec, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """The frozen base model, random weights from ``seed``, kept on the CPU (every variant is a
    deep copy moved to ``device``). Large models are initialised on ``device`` (fast random init)."""
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()  # "modules that should be kept in float32" on .to(dtype)
    except Exception:  # noqa: BLE001
        pass
    torch.manual_seed(seed)
    if device != "cpu":
        with torch.device(device):
            model = spec.build()
    else:
        model = spec.build()
    model = model.to(dtype=dtype).to("cpu")
    model.requires_grad_(False)
    return model


def fresh_copy(master: torch.nn.Module, device: str, grad_ckpt: bool) -> torch.nn.Module:
    model = copy.deepcopy(master).to(device)
    if grad_ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    return model


def make_inputs(spec: ModelSpec, batch: int, dtype: torch.dtype, device: str, seed: int = 1):
    """Identical inputs (and a regression target) for every variant."""
    g = torch.Generator().manual_seed(seed)
    raw = spec.inputs(batch, g)
    inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in raw.items()}
    if spec.name.startswith("sd3"):  # SD3 timesteps are floats in the model's dtype
        inputs["timestep"] = raw["timestep"].to(device=device, dtype=dtype)
    target = torch.randn(raw[spec.input_key].shape, generator=g).to(device=device, dtype=dtype)
    return inputs, target


# -- adapter settings ----------------------------------------------------------------------------------

# the settings; everything else is the method's default
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "oft": {"oft_block_size": 32, "r": 0},
    "boft": {"boft_block_size": 4, "boft_n_butterfly_factor": 2},
    "hra": {"r": 8},
    "fourierft": {"n_frequency": 1000},
    "frod": {"sparse_rate": 0.01},
}
METHOD_LABELS = {
    "oft": "OFT b32", "boft": "BOFT b4 m2", "hra": "HRA r8", "fourierft": "FourierFT n1000",
    "frod": "FRoD sparse 0.01",
}


def diffadapt_config(method: str, targets: list[str], **extra):
    import diffadapt as da

    fields = {**METHOD_SETTINGS[method], **extra}
    if method == "frod":
        fields.setdefault("progressbar", False)  # a tqdm bar only (no effect on the math)
    return da.get_method(method).config_class(target_modules=list(targets), **fields)


def peft_config_for(method: str, targets: list[str], **extra):
    """PEFT's config built from diffadapt's config (``to_peft_dict``), so both compute the same
    function; ``extra`` changes fields on diffadapt's side first."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from diffadapt.formats import peft as peft_format

    ours = diffadapt_config(method, targets, **extra)  # FRoD: progressbar=False carries over
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_format.peft_type(ours.method)](**peft_format.to_peft_dict(ours))


def peft_lora_config(targets: list[str], r: int = 16):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=r, target_modules=list(targets))


# -- timing ----------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """``(wall ms, process CPU ms)`` of one call of ``fn`` (device synchronised before and after).

    CPU time counts only this process's work, so on a CPU shared with other jobs it is the
    steadier gauge of cost (with one torch thread it is the step's own compute); on a GPU the
    wall time is the measure."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> float:
    """Interquartile range relative to the median (a noise gauge)."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def paired_ratio(a: "Stats", b: "Stats", op: str, clock: str) -> Optional[float]:
    """Median over timing rounds of (a's median in the round / b's median in the same round).

    Variants are timed in interleaved rounds, so pairing by round cancels the machine's load
    drifting between rounds; with a single round this is the ratio of the medians."""
    def per_round(s: "Stats") -> dict[int, float]:
        groups: dict[int, list[float]] = {}
        for t, r in zip(s.times[op][clock], s.times[op]["round"]):
            groups.setdefault(int(r), []).append(t)
        return {r: statistics.median(ts) for r, ts in groups.items()}

    ra, rb = per_round(a), per_round(b)
    ratios = [ra[r] / rb[r] for r in ra if r in rb and rb[r] > 0]
    return statistics.median(ratios) if ratios else None


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -- memory ------------------------------------------------------------------------------------------


class LiveTensorBytes:
    """Peak bytes of live tensor storages on the CPU during a call: a TorchDispatchMode sees
    every op's outputs (forward, backward and optimizer ops alike), each storage is counted once
    and uncounted when it is freed (a weakref finalizer on the preserved storage object). Tensors
    made before (weights, optimizer states, inputs) are registered with :meth:`add`. This is what
    CUDA's max_memory_allocated counts, without allocator rounding or caching."""

    def __init__(self) -> None:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        self._weakref = weakref
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.ops = 0  # aten ops dispatched (a proxy for kernel launches)
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                from torch.utils._pytree import tree_leaves

                tracker.ops += 1
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker.add(t)
                return out

        self.mode = _Mode()

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def add(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu" or t.is_meta or t.layout != torch.strided:
            return  # (sparse tensors have no single storage; PEFT's FRoD uses one, a few KiB)
        st = t.untyped_storage()
        key, nbytes = st._cdata, st.nbytes()
        old = self.live.get(key)
        if old is None:
            self._weakref.finalize(st, self._free, key)
            self.live[key] = nbytes
            self.current += nbytes
        elif nbytes > old:  # resized in place
            self.live[key] = nbytes
            self.current += nbytes - old
        self.peak = max(self.peak, self.current)

    def add_all(self, *objs: Any) -> None:
        for obj in objs:
            if isinstance(obj, torch.Tensor):
                self.add(obj)
            elif isinstance(obj, torch.nn.Module):
                for t in [*obj.parameters(), *obj.buffers()]:
                    self.add(t)
                    if getattr(t, "grad", None) is not None:
                        self.add(t.grad)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    for v in state.values():
                        if isinstance(v, torch.Tensor):
                            self.add(v)


def cpu_peak_bytes(fn: Callable[[], Any], *tracked: Any) -> tuple[Optional[int], Optional[int]]:
    """``(peak bytes of live CPU tensors, aten ops dispatched)`` during ``fn`` (see
    :class:`LiveTensorBytes`), counting the ``tracked`` modules / optimizers / tensors made
    before; ``(None, None)`` if tracking fails. On a GPU only the op count means anything."""
    try:
        tracker = LiveTensorBytes()
        tracker.add_all(*tracked)
        with tracker.mode:
            fn()
        return tracker.peak, tracker.ops
    except Exception:  # noqa: BLE001 - the columns are then left empty
        return None, None


# -- environment -----------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "peft", "diffadapt"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = "missing"
    return out


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    import os

    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch threads {torch.get_num_threads()}"
    )


@dataclass
class Stats:
    """Raw numbers of one variant."""

    key: str
    label: str
    impl: str  # "diffadapt" | "peft" | "-"
    method: str  # "floor" | "lora" | method name
    error: Optional[str] = None
    trainable: int = 0
    layers: int = 0
    setup_s: Optional[float] = None
    # op ("step" | "infer" | "merge") -> "wall" | "cpu" (milliseconds per call) | "round" (index)
    times: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {op: {"wall": [], "cpu": [], "round": []} for op in ("step", "infer", "merge")}
    )

    def add(self, op: str, wall_cpu: tuple[float, float], round_index: int = 0) -> None:
        self.times[op]["wall"].append(wall_cpu[0])
        self.times[op]["cpu"].append(wall_cpu[1])
        self.times[op]["round"].append(round_index)

    def ran(self, op: str = "step") -> bool:
        return bool(self.times[op]["wall"])
    peak_bytes: Optional[int] = None
    ops: Optional[int] = None  # aten ops per training step (forward + backward + optimizer)
    note: str = ""

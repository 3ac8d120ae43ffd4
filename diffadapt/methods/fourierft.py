"""FourierFT: a weight update given by ``n`` trainable coefficients of its 2-D Fourier spectrum.

Math (W is ``(d_out, d_in)``, ``d_in`` = fan_in; Conv1D's ``d_in`` is its true input width and
Conv2d's is ``in_channels * kh * kw`` over ``weight.flatten(1)``)::

    positions  idx = randperm(d_out * d_in, generator=Generator().manual_seed(seed))[:n]   (CPU)
               j_m = idx_m // d_in  (row),   k_m = idx_m % d_in  (column)
    spectrum   F[j_m, k_m] = c_m,  zero elsewhere           (c = ``fourierft_spectrum``, length n)
    update     dW = scaling * Re(ifft2(F))
                  = scaling / (d_out d_in) * sum_m c_m cos(2 pi (j_m p / d_out + k_m q / d_in))
    layer      W_eff = W + a * dW,   a = strength

``ifft2`` uses torch's default ("backward") normalisation, the 1/(d_out d_in) above; this is
PEFT's ``get_delta_weight`` and its positions, so PEFT files load bit-compatibly. Strength is
linear (``c -> a * scaling * c``): a = 0 gives dW = 0 exactly, a = 1 the trained update, values
in between interpolate W + a dW (negative values subtract, > 1 extrapolates).

Two exact ways to compute ``x @ dW.T`` (``FourierFTConfig.fast_path``):

* ``"dense"`` -- build dW once per call in fp32 as an ``irfft2`` of the Hermitian half-grid
  ``(F + F[-j, -k]) / 2`` (whose inverse FFT is real and equals Re(ifft2(F)); a tall layer on
  the CPU halves the rows instead, :func:`rows_half`), cast it to the activation dtype, one GEMM:
  O(d_out d_in log(d_out d_in) + T d_out d_in).
* ``"fft"`` -- transform the activations instead, O(T (d_in log d_in + n + d_out log d_out)):
  y[p] = scaling / d_in * Re(ifft_p(Z)),  Z[j] = sum_{m: j_m = j} c_m conj(X[k_m]),  X = rfft(x)
  along d_in; the gather at k_m and scatter-add into j_m use index buffers fixed at init
  (details in :func:`delta_output_fft`).
* ``"auto"`` (default) picks by device and shape: see :func:`choose_path`.

FFTs run in fp32 (fp64 for fp64 inputs) because torch has no bf16 FFT; results are cast to the
activation dtype. Trainable ``fourierft_spectrum`` is created in fp32 (PEFT casts it to the base
weight dtype; the runtime owns that choice).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from diffadapt import patterns
from diffadapt.fused import as_dtype
from diffadapt.methods.base import AdapterConfig, AdapterConfigError, LayerSpec, Method

_PATHS = ("auto", "dense", "fft")
_FIELD = "n_frequency_pattern key"


def _peft_key_pattern(key: str) -> str:
    """PEFT's test of an ``n_frequency_pattern`` key: ``re.match(rf".*\\.{key}$", name)``."""
    return rf".*\.{key}$"


@dataclass
class FourierFTConfig(AdapterConfig):
    """PEFT's ``FourierFTConfig`` fields, plus ``fast_path`` (diffadapt only, never saved to PEFT).

    ``n_frequency_pattern`` maps a module-name key to its own ``n_frequency`` with PEFT's rule
    (first key with ``re.match(rf".*\\.{key}$", name)``, or the exact name); the generic
    ``overrides`` are applied after it and win. ``fan_in_fan_out`` is kept for PEFT files only:
    the runtime always hands W as ``(out, in)``.
    """

    method: ClassVar[str] = "fourierft"

    n_frequency: int = field(
        default=1000, metadata={"flag": "--n_frequency", "help": "spectral coefficients per layer (1000)."}
    )
    scaling: float = field(default=150.0, metadata={"flag": "--fourierft_scaling", "help": "scaling alpha (150)."})
    random_loc_seed: int = field(
        default=777, metadata={"flag": "--random_loc_seed", "help": "seed of the frequency positions (777)."}
    )
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool = False  # PEFT default: spectrum ~ N(0, 1); True: zeros (identity)
    fast_path: str = "auto"  # "auto" | "dense" | "fft"

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if not isinstance(self.n_frequency_pattern, dict) or not all(isinstance(k, str) for k in self.n_frequency_pattern):
            raise AdapterConfigError(f"{name}: n_frequency_pattern must map module-name keys to integers.")
        try:
            for key in self.n_frequency_pattern:
                patterns.check_pattern(_peft_key_pattern(key), _FIELD, full=False)
        except patterns.UnsafePatternError as exc:
            raise AdapterConfigError(f"{name}: {exc}") from None
        for key, n in [(None, self.n_frequency), *self.n_frequency_pattern.items()]:
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                where = "n_frequency" if key is None else f"n_frequency_pattern[{key!r}]"
                raise AdapterConfigError(f"{name}: {where}={n!r} must be a positive integer (PEFT default 1000).")
        scaling = self.scaling
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise AdapterConfigError(f"{name}: scaling={self.scaling!r} must be a finite number (PEFT default 150.0).")
        if isinstance(self.random_loc_seed, bool) or not isinstance(self.random_loc_seed, int):
            raise AdapterConfigError(
                f"{name}: random_loc_seed={self.random_loc_seed!r} must be an integer; the frequency positions "
                "are drawn from it (PEFT default 777)."
            )
        if self.fast_path not in _PATHS:
            raise AdapterConfigError(f"{name}: fast_path={self.fast_path!r}; choose one of {', '.join(_PATHS)}.")

    def check_layer(self, layer: LayerSpec) -> None:
        cfg = self.for_layer(layer.name)
        if layer.kind not in ("linear", "conv1d", "conv2d"):
            raise AdapterConfigError(
                f"FourierFT cannot adapt {layer.describe()}: only linear, conv1d and conv2d layers."
            )
        size = layer.out_features * layer.fan_in
        if cfg.n_frequency > size:
            raise AdapterConfigError(
                f"FourierFT n_frequency={cfg.n_frequency} does not fit {layer.describe()}: its spectrum has only "
                f"{layer.out_features}*{layer.fan_in}={size} entries. Lower n_frequency for this layer "
                "(n_frequency_pattern / overrides) or exclude it."
            )

    def for_layer(self, name: str) -> "FourierFTConfig":
        cfg = self
        if self.n_frequency_pattern:
            hit = next((k for k in self.n_frequency_pattern if patterns.match(_peft_key_pattern(k), name, _FIELD)), name)
            n = self.n_frequency_pattern.get(hit, self.n_frequency)
            cfg = dataclasses.replace(self, n_frequency=n, n_frequency_pattern={})
        return AdapterConfig.for_layer(cfg, name)


class FourierPrep(NamedTuple):
    coef: Tensor  # (n,) a * scaling * c
    buffers: dict
    d_out: int
    d_in: int
    path: str


def choose_path(tokens: int, d_out: int, d_in: int, n: int, device: torch.device) -> str:
    """The cheaper exact form for ``tokens`` rows. Off CPU: ``"dense"`` (one tensor-core GEMM; the
    FFT form is memory-bound there -- not yet measured on a GPU). On CPU, a cost model fitted to
    one-thread fp32 timings (T = 4096, n = 1000): per token a GEMM costs d_out*d_in multiply-adds,
    the FFT form ~10 (d_in log2 d_in + d_out log2 d_out) + 170 n of them (its gathers are
    memory-bound). It picks dense at d = 320 and fft at d = 640 / 1280, as measured."""
    if device.type != "cpu":
        return "dense"
    fft = 10 * (d_in * math.log2(max(d_in, 2)) + d_out * math.log2(max(d_out, 2))) + 170 * n
    dense = tokens * d_out * d_in + 8 * d_out * d_in * math.log2(max(d_out * d_in, 2))  # GEMM + build dW
    return "fft" if tokens * fft < dense else "dense"


_ROWS_HALF_ASPECT = 4  # tall grids (d_out >= 4 d_in) ...
_ROWS_HALF_MAX_CELLS = 1 << 19  # ... of at most 2^19 cells take the half along the rows (CPU)


def rows_half(d_out: int, d_in: int, device: torch.device) -> bool:
    """Which axis the inverse FFT halves: the columns (``irfft2``), or for a tall layer on the CPU the
    rows. A ``(d_out, d_in // 2 + 1)`` grid's first pass is a strided c2c transform down each of its
    few columns; halving the rows instead runs it along the contiguous rows (length ``d_in``) and the
    real pass down ``d_out``: measured (one thread, fp32, MKL) 1.8x faster for ``512 x 64`` and
    ``1024 x 128`` (an up-projection's shape), 1.25x for ``2048 x 256``; past ~2^19 cells
    (``5120 x 640``: 1.2-1.3x slower) and below an aspect of 4 (``1024 x 512``: 1.5x slower) the
    columns win. Off the CPU: the columns (not measured there)."""
    return device.type == "cpu" and d_out >= _ROWS_HALF_ASPECT * d_in and d_out * d_in <= _ROWS_HALF_MAX_CELLS


def delta_weight(coef: Tensor, buffers: dict, d_out: int, d_in: int, dtype: torch.dtype) -> Tensor:
    """dW = Re(ifft2(F)) for ``F[j_m, k_m] = coef_m``, as the inverse real FFT of the Hermitian half
    ``(F + F[-j, -k]) / 2`` (columns 0 .. d_in // 2, or rows 0 .. d_out // 2 where :func:`rows_half`),
    written straight into the real parts of a complex grid (no real-to-complex copy before the
    inverse FFT)."""
    rows = rows_half(d_out, d_in, coef.device)
    half = "rows2d" if rows else "half2d"  # which half-grid's cells and weights (position_buffers)
    cells, weights = buffers["re_" + half], buffers["w_" + half]
    vals = (as_dtype(coef, dtype).view(1, -1) * as_dtype(weights, dtype).view(2, -1)).view(-1)
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64  # (dtype.to_complex() breaks dynamo)
    shape = (d_out // 2 + 1, d_in) if rows else (d_out, d_in // 2 + 1)
    grid = torch.zeros(shape, dtype=cdtype, device=coef.device)
    torch.view_as_real(grid).view(-1).index_add_(0, cells, vals)
    if rows:
        return torch.fft.irfftn(grid, s=(d_in, d_out), dim=(1, 0)).contiguous()  # (a strided add costs 5x the copy)
    return torch.fft.irfft2(grid, s=(d_out, d_in))


def delta_output_dense(x: Tensor, prep: FourierPrep) -> Tensor:
    """x @ dW.T with dW built once per call (fp32) and cast to x's dtype: one extra GEMM."""
    dW = delta_weight(prep.coef, prep.buffers, prep.d_out, prep.d_in, torch.promote_types(x.dtype, torch.float32))
    return F.linear(x, dW.to(x.dtype))


class _GatherScale(torch.autograd.Function):
    """``X[:, idx] * w`` keeping ``X`` (``T x (d_in + 2)``, the size of the layer's input) for backward
    instead of the gathered ``X[:, idx]`` (``T x ~4n``: 6x the input at d_in = 640, n = 1000); the
    gather is repeated in backward for ``w``'s gradient."""

    @staticmethod
    def forward(ctx, X, w, idx):
        ctx.save_for_backward(X, w, idx)
        return torch.gather(X, -1, idx.expand(X.shape[0], -1)) * w

    @staticmethod
    def backward(ctx, g):
        X, w, idx = ctx.saved_tensors
        idx = idx.expand(X.shape[0], -1)
        gX = torch.zeros_like(X).scatter_add_(-1, idx, g * w) if ctx.needs_input_grad[0] else None
        gw = (g * torch.gather(X, -1, idx)).sum(0) if ctx.needs_input_grad[1] else None
        return gX, gw, None


def delta_output_fft(x: Tensor, prep: FourierPrep) -> Tensor:
    """x @ dW.T exactly through FFTs of the activations; dW is never formed.

    With X = rfft(x) and Xc = conj(X) / d_in, every frequency m reads Xc[kk_m] and adds
    ``coef_m * Xc[kk_m]`` to output bin jj_m (kk = k, jj = j if k <= d_in/2, else kk = d_in - k,
    jj = -j: conj(X[k]) = X[d_in - k] and Re(conj(z) e^{it}) = Re(z e^{-it})); y = Re(ifft(Z)).
    Bins past d_out/2 are folded, conjugated, onto the half-spectrum so one irfft finishes it.
    All of it is one real gather -> scale -> scatter-add on the interleaved (re, im) values.
    """
    b, dt = prep.buffers, torch.promote_types(x.dtype, torch.float32)
    lead, T = x.shape[:-1], x.numel() // x.shape[-1]
    X = torch.view_as_real(torch.fft.rfft(x.reshape(T, prep.d_in).to(dt), dim=-1)).flatten(-2)  # (T, 2*(d_in//2+1))
    w = (prep.coef.to(dt) * (1.0 / prep.d_in)).index_select(0, b["src"]) * b["w_fft"].to(dt)
    G = _GatherScale.apply(X, w, b["gather"])
    H = torch.zeros(T, 2 * (prep.d_out // 2 + 1), dtype=dt, device=x.device)
    H = H.scatter_add(-1, b["scatter"].expand(T, -1), G)
    y = torch.fft.irfft(torch.view_as_complex(H.view(T, -1, 2)), n=prep.d_out, dim=-1)
    return y.to(x.dtype).reshape(*lead, prep.d_out)


class FourierFT(Method):
    name: ClassVar[str] = "fourierft"
    config_class: ClassVar[type[AdapterConfig]] = FourierFTConfig
    multiplicative: ClassVar[bool] = False
    learning_rate: ClassVar[float] = 1e-2  # the training scripts' starting points (see Method)
    embedded_learning_rate: ClassVar[float] = 1e-3
    # the scripts start from a zero spectrum, i.e. the base model, as every other method does: PEFT's
    # default random spectrum (times scaling 150) changes the model before the first step, on a small
    # model beyond recognition
    training_defaults: ClassVar[dict[str, Any]] = {"init_weights": True}

    @staticmethod
    def positions(n: int, d_out: int, d_in: int, seed: int) -> tuple[Tensor, Tensor]:
        """PEFT's (row, col) of the n trainable frequencies (CPU generator, bit-identical)."""
        idx = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
        return idx // d_in, idx % d_in

    @classmethod
    def init_shared(cls, config, layers, weights):
        """The frequency positions and index buffers depend only on ``(d_out, d_in, n, seed)``: built
        once per such group and held once (one dict object per group; a model's layers of one
        shape share it), so injection draws each ``randperm`` once and the buffers cost one copy."""
        groups: dict = {}
        out = []
        for layer, weight in zip(layers, weights):
            cfg = config.for_layer(layer.name)
            key = (layer.out_features, layer.fan_in, cfg.n_frequency, cfg.random_loc_seed, weight.device)
            if key not in groups:
                cfg.check_layer(layer)
                groups[key] = cls.position_buffers(*key)
            out.append(groups[key])
        return out

    @classmethod
    def position_buffers(cls, d_out: int, d_in: int, n: int, seed: int, device: torch.device) -> dict[str, Tensor]:
        """PEFT's positions and the index buffers of both exact paths for a ``(d_out, d_in)`` layer."""
        j, k = cls.positions(n, d_out, d_in, seed)
        hi, ho, ar = d_in // 2, d_out // 2, torch.arange(n)
        # dense path: (j, k) and its mirror (-j, -k), each kept at weight 1/2 if in the half-grid
        jm, km = (-j) % d_out, (-k) % d_in
        pos = torch.cat([j * (hi + 1) + k.clamp(max=hi), jm * (hi + 1) + km.clamp(max=hi)])
        w2d = torch.cat([(k <= hi).float(), (km <= hi).float()]) * 0.5
        # the same with the rows halved (rows_half): cell (j, k) of a (d_out // 2 + 1, d_in) grid
        pos_rows = torch.cat([j.clamp(max=ho) * d_in + k, jm.clamp(max=ho) * d_in + km])
        w_rows = torch.cat([(j <= ho).float(), (jm <= ho).float()]) * 0.5
        # fft path (see delta_output_fft): read Xc[kk], add to full bin jj, fold bins > d_out/2
        lo = k <= hi
        kk, jj = torch.where(lo, k, d_in - k), torch.where(lo, j, jm)
        plain, mirror = jj <= ho, (-jj) % d_out <= ho  # both for DC / Nyquist bins
        src = torch.cat([ar[plain], ar[mirror]])
        slot = torch.cat([jj[plain], ((-jj) % d_out)[mirror]])
        conj = torch.cat([torch.zeros_like(ar[plain]), torch.ones_like(ar[mirror])]).bool()
        # Xc = conj(X): imag weight -1/2; a folded (conjugated) entry flips it back to +1/2
        w_fft = torch.stack([torch.full(conj.shape, 0.5), torch.where(conj, 0.5, -0.5)], -1).flatten()
        pair = torch.tensor([0, 1])
        return {
            "rows": j.to(device), "cols": k.to(device),  # PEFT's `indices`
            "re_half2d": (2 * pos).to(device), "w_half2d": w2d.to(device),  # real part of half-grid cell pos
            "re_rows2d": (2 * pos_rows).to(device), "w_rows2d": w_rows.to(device),  # the same, rows halved
            "pos_grad": torch.where(k <= hi, j * (hi + 1) + k, jm * (hi + 1) + km).to(device),  # half-grid cell of (j, k)
            "src": src.repeat_interleave(2).to(device), "w_fft": w_fft.to(device),
            "gather": (2 * kk[src, None] + pair).flatten().to(device),
            "scatter": (2 * slot[:, None] + pair).flatten().to(device),
            "shape": torch.empty(d_out, d_in, 0, device=device),  # carries (d_out, d_in) as static sizes
        }

    @classmethod
    def init_layer(cls, config, layer, weight, shared):
        """The spectrum; the buffers are ``shared``'s (:meth:`init_shared`), built here only when
        called without them."""
        cfg = config.for_layer(layer.name)
        cfg.check_layer(layer)
        n = cfg.n_frequency
        dev = weight.device
        buffers = {} if shared else cls.position_buffers(layer.out_features, layer.fan_in, n, cfg.random_loc_seed, dev)
        # torch.randn(n) on the CPU default generator, as PEFT draws it
        spectrum = torch.zeros(n) if cfg.init_weights else torch.randn(n)
        dt = torch.promote_types(weight.dtype, torch.float32) if weight.dtype.is_floating_point else torch.float32
        return {"fourierft_spectrum": spectrum.to(device=dev, dtype=dt)}, buffers

    @classmethod
    def prepare_many(cls, config, params, buffers, strength, training=False):
        coef = torch.stack([p["fourierft_spectrum"] for p in params]) * config.scaling
        coef = coef * strength
        return [
            FourierPrep(c, b, *b["shape"].shape[:2], config.fast_path) for c, b in zip(coef.unbind(0), buffers)
        ]

    @staticmethod
    def _path(x: Tensor, prep: FourierPrep) -> str:
        if prep.path != "auto":
            return prep.path
        return choose_path(x.numel() // x.shape[-1], prep.d_out, prep.d_in, prep.coef.shape[0], x.device)

    @classmethod
    def fold_into_weight(cls, x: Tensor, prep: FourierPrep) -> bool:
        return cls._path(x, prep) == "dense"  # dW is built anyway: fold it into the base GEMM

    @classmethod
    def delta_output(cls, x: Tensor, prep: FourierPrep) -> Tensor:
        return delta_output_fft(x, prep) if cls._path(x, prep) == "fft" else delta_output_dense(x, prep)

    delta_fields: ClassVar[tuple[str, ...]] = ("coef",)

    @staticmethod
    def keep_folded_weight(x: Tensor, prep: FourierPrep) -> bool:
        """Keep ``W + dW`` for backward when it is no larger than the layer's input, which backward
        keeps anyway (``d_out <= tokens``): the saved bytes at most double, and the inverse FFT is
        not run a second time. Wider layers (few tokens: a GEGLU's up-projection at a deep level)
        rebuild it."""
        return prep.d_out <= x.numel() // x.shape[-1]

    @staticmethod
    def delta_weight(prep: FourierPrep, dtype: torch.dtype) -> Tensor:
        return delta_weight(prep.coef, prep.buffers, prep.d_out, prep.d_in, dtype)

    @staticmethod
    def delta_weight_backward(prep: FourierPrep, grad: Tensor) -> tuple[Tensor]:
        """``d coef_m = Re(fft2(G))[j_m, k_m] / (d_out d_in)`` for ``G = dL/d(dW)``: the adjoint of
        ``dW[p, q] = sum_m coef_m cos(2 pi (j_m p / d_out + k_m q / d_in)) / (d_out d_in)``, read
        from the half spectrum (``Re fft2(G)[j, k] = Re fft2(G)[-j, -k]`` for real G)."""
        spectrum = torch.fft.rfft2(as_dtype(grad, torch.promote_types(grad.dtype, torch.float32)))
        picked = spectrum.real.flatten().index_select(0, prep.buffers["pos_grad"])
        return (as_dtype(picked * (1.0 / (prep.d_out * prep.d_in)), prep.coef.dtype),)

    @classmethod
    def apply_to_weight(cls, weight: Tensor, prep: FourierPrep) -> Tensor:
        dt = torch.promote_types(weight.dtype, torch.float32)
        return as_dtype(as_dtype(weight, dt) + cls.delta_weight(prep, dt), weight.dtype)

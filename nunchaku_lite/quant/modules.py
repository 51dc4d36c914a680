"""Quantized drop-in replacements for nn.Linear: `W4A4Linear` (SVDQuant) and `W4A16Linear` (weight-only).

Both are called like the linear they replace (`y = layer(x)`, x [..., in_features]) and hold only buffers,
so `state_dict()` is exactly what quant/format.py stores. The math is quant/ops.py; on CUDA the native
kernels (nunchaku_lite.native) run instead when they are built.

On CUDA, `layer.to_native_()` (or native.prepare_model_(model) for a whole model, which Flux.from_pretrained
calls) converts a layer once to the kernels' layout and drops the canonical buffers, so the GPU holds one
copy of each weight; a converted layer runs only through the kernels and refuses state_dict().

K (in_features) that is not a multiple of the group size 64 is padded with zero columns at build time (a
warning says so); the forward pads its input the same way, so callers still pass in_features columns.

Two small composites exist for layers that one quantized GEMM cannot express: `SplitInputLinear` (sum of
parts over consecutive slices of the input; FLUX's single-block linear2 with unsigned fc2 inputs = attention
out_proj on the first D inputs, signed, + mlp_fc2 on the other F inputs, unsigned and shifted, as in Nunchaku)
and `ConcatOutputLinear` (outputs of parts concatenated; the Nunchaku import uses it only when two row blocks
of a fused linear do not share a smooth vector).
"""
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

GROUP = ops.GROUP


@functools.cache
def _native():
    """The native kernel module if it is built and usable, else None (the package works without it).
    Decided once per process (a failing import is not retried on every forward)."""
    try:
        from .. import native
    except Exception:  # not built yet, no CUDA toolkit, cffi failure: the reference ops take over
        return None
    available = getattr(native, "available", None)
    return native if callable(available) and available() else None


def _padded(k: int) -> int:
    return -(-k // GROUP) * GROUP


def _layer_dtype(dtype: torch.dtype | None, linear: nn.Linear) -> torch.dtype:
    """dtype of the low-rank factors and bias built from `linear`: `dtype`, else the weight's; float64 and
    non-float dtypes become float32."""
    dtype = dtype or linear.weight.dtype
    return dtype if dtype.is_floating_point and dtype != torch.float64 else torch.float32


def _warn_pad(k: int, name: str):
    warnings.warn(f"{name}: in_features={k} is not a multiple of {GROUP}; padding K to {_padded(k)} with zeros "
                  "(weights and inputs), which costs memory and compute but not accuracy", stacklevel=3)


class _KeepsExactBuffers(nn.Module):
    """`.to(dtype)`, `.half()`, `.bfloat16()` move but never re-round the buffers that define the quantized
    values (weight scales, zero points, smooth): a cast would silently change the 4-bit weights.
    Also the input check and K padding shared by the two quantized linears, and the rules of a layer converted
    to the native kernels' layout (`to_native_`): it keeps every dtype on `.to()`, runs only through the
    kernels, and refuses state_dict()/load_state_dict() (its buffers are not the canonical format)."""

    _exact: tuple[str, ...] = ()

    @property
    def native_converted(self) -> bool:
        """True after `to_native_()` / native.prepare_model_: the buffers are the kernels' layout."""
        return "_native_layout" in self.__dict__

    def to_native_(self, dtype: torch.dtype | None = None) -> bool:
        """Convert this layer in place to the native kernels' layout, keeping only that copy (see
        native.to_native_; False when it stays canonical: not on CUDA, kernels unavailable, ...)."""
        native = _native()
        return False if native is None else native.to_native_(self, dtype)

    def _apply(self, fn, recurse=True):
        # A kernel's cached prepared copy (native.prepared_for) belongs to the old tensors: drop it now rather
        # than let it pin them (e.g. GPU memory after .to("cpu")); it is rebuilt on the next CUDA forward.
        self.__dict__.pop("_native_prepared", None)
        names = tuple(self._buffers) if self.native_converted else self._exact
        keep = {name: self._buffers[name] for name in names if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        # uint8 (qweight, or the converted weight): moved by fn, never cast
        device = next(t.device for t in self._buffers.values() if t is not None and t.dtype == torch.uint8)
        for name, t in keep.items():  # a meta tensor has no data to copy: to_empty() allocates it
            self._buffers[name] = torch.empty_like(t, device=device) if t.is_meta and device.type != "meta" \
                else t.to(device)
        return self

    def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        pad = self.padded_in_features - self.in_features
        return F.pad(x, (0, pad)) if pad else x

    def _converted_error(self, what: str) -> RuntimeError:
        return RuntimeError(f"{type(self).__name__}({self.extra_repr()}): {what} needs the canonical buffers, but "
                            "this layer was converted to the native kernels' layout (to_native_ / "
                            "native.prepare_model_, which Flux.from_pretrained does on CUDA); save or inspect the "
                            "model before converting it, or load it again with native_layout=False")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.native_converted:
            raise self._converted_error(f"state_dict() ('{prefix}*')")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.native_converted and any(k.startswith(prefix) for k in state_dict):
            raise self._converted_error(f"load_state_dict() ('{prefix}*')")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _forward_converted(self, x: torch.Tensor, kernel: str) -> torch.Tensor:
        """Forward of a converted layer: the kernels or a clear error (the reference ops need canonical buffers)."""
        native = _native() if x.is_cuda else None
        if native is None:
            raise self._converted_error(f"a forward on {x.device} (reference ops)")
        y = getattr(native, kernel)(x, self)
        if y is NotImplemented:
            raise ValueError(f"{type(self).__name__}: the native kernels take bfloat16/float16 activations, got "
                             f"{x.dtype} (converted layers have no reference fallback)")
        return y


class W4A4Linear(_KeepsExactBuffers):
    """y = W4A4(x / smooth) + (x @ lora_down^T) @ lora_up^T + bias (see ops.w4a4_linear).

    Buffers (Kp = in_features rounded up to 64): qweight uint8 [N, Kp/2] (canonical packing), wscales
    [N, Kp/64] (`scale_dtype`), smooth float32 [Kp], lora_down [rank, Kp] (reads the raw input: 1/smooth is
    folded in), lora_up [N, rank], bias [N]. `act_unsigned`/`act_shift`: unsigned u4 activations of
    (x + shift) / smooth, for post-GELU inputs. `act_pow2`: power-of-two activation group scales per token
(ops.quantize_act(pow2=True); with power-of-two weight scales this is the Hopper integer GEMM's format).
`act_quant=False` keeps the 4-bit weight but runs 16-bit
    activations (ablations, layer-by-layer checks of an import). `.to(dtype)` casts only lora_down, lora_up
    and bias (see _KeepsExactBuffers).
    """

    _exact = ("wscales", "smooth")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 act_unsigned: bool = False, act_shift: float = 0.0, act_quant: bool = True,
                 dtype: torch.dtype = torch.bfloat16, scale_dtype: torch.dtype = torch.bfloat16,
                 device=None, act_pow2: bool = False):
        super().__init__()
        if rank < 0:
            raise ValueError(f"W4A4Linear: rank must be >= 0, got {rank}")
        kp = _padded(in_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.padded_in_features = kp
        self.act_unsigned, self.act_shift, self.act_quant = bool(act_unsigned), float(act_shift), bool(act_quant)
        self.act_pow2 = bool(act_pow2)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(out_features, kp // 2, dtype=torch.uint8, **kw))
        self.register_buffer("wscales", torch.zeros(out_features, kp // GROUP, dtype=scale_dtype, **kw))
        self.register_buffer("smooth", torch.ones(kp, dtype=torch.float32, **kw))
        self.register_buffer("lora_down", torch.zeros(rank, kp, dtype=dtype, **kw))
        self.register_buffer("lora_up", torch.zeros(out_features, rank, dtype=dtype, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, residual: torch.Tensor, smooth: torch.Tensor | None = None,
                    lora_down: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
                    act_unsigned: bool = False, act_shift: float = 0.0, dtype: torch.dtype | None = None,
                    scale_dtype: torch.dtype = torch.bfloat16, pow2: bool = False,
                    act_pow2: bool = False) -> "W4A4Linear":
        """Build from the quantizer's results for `linear` (its bias is copied).

        residual [N, K]: the smoothed weight minus the low-rank part, W * smooth - lora_up @ (lora_down * smooth),
        quantized here. smooth [K] (None: ones). lora_down [r, K] must already read the RAW input (1/smooth
        folded in); lora_up [N, r]. The bias is copied as is: with `act_shift` s the quantized part computes
        ((x + s) / smooth) @ Rq^T = x @ (Rq / smooth)^T + s * rowsum(Rq / smooth), so a caller that wants an
        unbiased layer subtracts s * rowsum(Rq / smooth) from the bias afterwards (Rq: `dequantized_weight()`).
        pow2: power-of-two group scales (ops.quantize_weight(pow2=True)); act_pow2: power-of-two activation
        scales (ops.quantize_act(pow2=True)).
        """
        n, k = linear.out_features, linear.in_features
        if residual.shape != (n, k):
            raise ValueError(f"W4A4Linear.from_linear: residual shape {tuple(residual.shape)} != ({n}, {k})")
        if (lora_down is None) != (lora_up is None):
            raise ValueError("W4A4Linear.from_linear: give both lora_down and lora_up, or neither")
        rank = 0 if lora_down is None else lora_down.shape[0]
        if lora_down is not None and (lora_down.shape != (rank, k) or lora_up.shape != (n, rank)):
            raise ValueError(f"W4A4Linear.from_linear: lora_down {tuple(lora_down.shape)} / lora_up "
                             f"{tuple(lora_up.shape)} do not fit a [{n}, {k}] layer")
        if k % GROUP:
            _warn_pad(k, "W4A4Linear")
        dtype = _layer_dtype(dtype, linear)
        dev = linear.weight.device
        m = cls(k, n, rank, bias=linear.bias is not None, act_unsigned=act_unsigned, act_shift=act_shift,
                dtype=dtype, scale_dtype=scale_dtype, device=dev, act_pow2=act_pow2)
        pad = m.smooth.shape[0] - k
        codes, scales = ops.quantize_weight(F.pad(residual.detach().float().to(dev), (0, pad)), scale_dtype, pow2)
        m.qweight.copy_(ops.pack_int4(codes))
        m.wscales.copy_(scales)
        if smooth is not None:
            if smooth.shape != (k,):
                raise ValueError(f"W4A4Linear.from_linear: smooth shape {tuple(smooth.shape)} != ({k},)")
            m.smooth[:k].copy_(smooth.detach().float())
        if rank:
            m.lora_down.copy_(F.pad(lora_down.detach().to(dev, dtype), (0, pad)))
            m.lora_up.copy_(lora_up.detach().to(dev, dtype))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def config(self) -> dict:
        """Constructor arguments (JSON-able) for quant/format.py."""
        cfg = dict(type="W4A4Linear", in_features=self.in_features, out_features=self.out_features,
                   rank=self.rank, bias=self.bias is not None, act_unsigned=self.act_unsigned,
                   act_shift=self.act_shift)
        if self.act_pow2:  # only when set: files without it load as before
            cfg["act_pow2"] = True
        return cfg

    def dequantized_weight(self) -> torch.Tensor:
        """Residual in smoothed space, float32 [N, Kp]: codes * wscales."""
        if self.native_converted:
            raise self._converted_error("dequantized_weight()")
        return ops.dequantize(ops.unpack_int4(self.qweight), self.wscales)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight W [N, in_features] in float32 (ignoring activation quantization and
        the shift): residual / smooth + lora_up @ lora_down."""
        w = self.dequantized_weight() / self.smooth.float()
        if self.rank:
            w = w + self.lora_up.float() @ self.lora_down.float()
        return w[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pad_input(x)
        if self.native_converted:  # never act_quant=False: to_native_ leaves those canonical
            return self._forward_converted(x, "w4a4_linear")
        if not self.act_quant:
            return self._forward_fake_act(x)
        native = _native() if x.is_cuda else None
        if native is not None and hasattr(native, "w4a4_linear"):
            y = native.w4a4_linear(x, self)  # NotImplemented: a shape/rank/device the kernels do not cover
            if y is not NotImplemented:
                return y
        lora = (self.lora_down, self.lora_up) if self.rank else (None, None)
        return ops.w4a4_linear(x, self.qweight, self.wscales, *lora, self.bias, self.smooth,
                               self.act_unsigned, self.act_shift, act_pow2=self.act_pow2)

    def _forward_fake_act(self, x: torch.Tensor) -> torch.Tensor:
        # 16-bit activations with the 4-bit weight: the shift stays (the bias compensates it), no act rounding.
        xs = ((x.float() + self.act_shift) / self.smooth).to(x.dtype)
        y = F.linear(xs, self.dequantized_weight().to(x.dtype))
        if self.rank:
            y = y + F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
        if self.act_unsigned or self.act_shift:
            s += f", act_unsigned={self.act_unsigned}, act_shift={self.act_shift}"
        if self.act_pow2:
            s += ", act_pow2=True"
        return s + ("" if self.act_quant else ", act_quant=False")


class W4A16Linear(_KeepsExactBuffers):
    """y = x @ W^T + bias with 4-bit weights (per-row groups of 64) and 16-bit activations (see ops.w4a16_linear).

    Buffers: qweight uint8 [N, Kp/2], wscales [N, Kp/64], bias [N]; with `zero_point=True` also wzeros
    [N, Kp/64] and unsigned codes (W = U * s + z, Nunchaku's AWQ layers), else signed codes (W = C * s).
    `.to(dtype)` casts only the bias.
    """

    _exact = ("wscales", "wzeros")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, zero_point: bool = False,
                 dtype: torch.dtype = torch.bfloat16, scale_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        kp = _padded(in_features)
        self.in_features, self.out_features, self.zero_point = in_features, out_features, bool(zero_point)
        self.padded_in_features = kp
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(out_features, kp // 2, dtype=torch.uint8, **kw))
        self.register_buffer("wscales", torch.zeros(out_features, kp // GROUP, dtype=scale_dtype, **kw))
        self.register_buffer("wzeros", torch.zeros(out_features, kp // GROUP, dtype=scale_dtype, **kw)
                             if zero_point else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None,
                    scale_dtype: torch.dtype = torch.bfloat16) -> "W4A16Linear":
        """Quantize `linear.weight` symmetrically (absmax/7 per row and 64-group); the bias is copied."""
        n, k = linear.out_features, linear.in_features
        if k % GROUP:
            _warn_pad(k, "W4A16Linear")
        dtype = _layer_dtype(dtype, linear)
        m = cls(k, n, bias=linear.bias is not None, dtype=dtype, scale_dtype=scale_dtype,
                device=linear.weight.device)
        w = F.pad(linear.weight.detach().float(), (0, m.wscales.shape[1] * GROUP - k))
        codes, scales = ops.quantize_weight(w, scale_dtype)
        m.qweight.copy_(ops.pack_int4(codes))
        m.wscales.copy_(scales)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def config(self) -> dict:
        return dict(type="W4A16Linear", in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias is not None, zero_point=self.zero_point)

    def dense_weight(self) -> torch.Tensor:
        """Dequantized weight, float32 [N, in_features]."""
        if self.native_converted:
            raise self._converted_error("dense_weight()")
        codes = ops.unpack_int4(self.qweight, signed=not self.zero_point)
        return ops.dequantize(codes, self.wscales, self.wzeros)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pad_input(x)
        if self.native_converted:
            return self._forward_converted(x, "w4a16_linear")
        native = _native() if x.is_cuda else None
        if native is not None and hasattr(native, "w4a16_linear"):
            y = native.w4a16_linear(x, self)
            if y is not NotImplemented:
                return y
        return ops.w4a16_linear(x, self.qweight, self.wscales, self.bias, self.wzeros)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, zero_point={self.zero_point}"


class SplitInputLinear(nn.Module):
    """y = sum_i parts[i](x[..., slice_i]): one linear whose input columns are split into consecutive slices,
    each its own quantized GEMM (own smooth, own activation signedness)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.splits = [p.in_features for p in parts]
        self.in_features, self.out_features = sum(self.splits), parts[0].out_features

    def config(self) -> dict:
        return dict(type="SplitInputLinear", parts=[p.config() for p in self.parts])

    def dense_weight(self) -> torch.Tensor:
        return torch.cat([p.dense_weight() for p in self.parts], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for part, xi in zip(self.parts, x.split(self.splits, dim=-1)):
            yi = part(xi)
            y = yi if y is None else y + yi
        return y


class ConcatOutputLinear(nn.Module):
    """y = cat_i parts[i](x): one linear whose output rows come from separate quantized GEMMs."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)

    def config(self) -> dict:
        return dict(type="ConcatOutputLinear", parts=[p.config() for p in self.parts])

    def dense_weight(self) -> torch.Tensor:
        return torch.cat([p.dense_weight() for p in self.parts], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


QUANTIZED_TYPES = (W4A4Linear, W4A16Linear)
_BY_NAME = {c.__name__: c for c in (W4A4Linear, W4A16Linear, SplitInputLinear, ConcatOutputLinear)}


def module_from_config(cfg: dict, dtype: torch.dtype = torch.bfloat16, scale_dtype: torch.dtype = torch.bfloat16,
                       device=None, act_quant: bool = True) -> nn.Module:
    """Rebuild an (empty) quantized module from its `config()` dict; buffers are filled by load_state_dict."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in _BY_NAME:
        raise ValueError(f"unknown quantized layer type {kind!r} (known: {sorted(_BY_NAME)})")
    if kind in ("SplitInputLinear", "ConcatOutputLinear"):
        parts = [module_from_config(c, dtype, scale_dtype, device, act_quant) for c in cfg["parts"]]
        return _BY_NAME[kind](parts)
    if kind == "W4A4Linear":
        cfg["act_quant"] = act_quant
    return _BY_NAME[kind](**cfg, dtype=dtype, scale_dtype=scale_dtype, device=device)


def quantized_linears(module: nn.Module):
    """Yield (name, layer) for every W4A4Linear / W4A16Linear inside `module` (composites' parts included)."""
    for name, m in module.named_modules():
        if isinstance(m, QUANTIZED_TYPES):
            yield name, m


def is_quantized(module: nn.Module) -> bool:
    """True if `module` is or contains a quantized linear."""
    return next(quantized_linears(module), None) is not None


def set_act_quant(module: nn.Module, enabled: bool) -> None:
    """Switch activation quantization of every W4A4Linear in `module` on or off."""
    for _, m in quantized_linears(module):
        if isinstance(m, W4A4Linear):
            if m.native_converted and not enabled:
                raise m._converted_error("set_act_quant(False)")
            m.act_quant = bool(enabled)

"""SVDQuant post-training quantization of a FLUX DiT: W4A4 linears with a 16-bit low-rank branch.

For each linear Y = X W^T + b inside the double and single blocks (SVDQUANT.md):

    lambda_j = max|X_j|^alpha / max|W_j|^beta          smoothing: X_hat = X / lambda, W_hat = W * lambda
    W_hat    ~ L1 L2                                    rank-r truncated SVD, float64
    R        = W_hat - L1 L2  -> INT4, per row, groups of 64 (ops.quantize_weight)
    Y'       = Q(X_hat) Q(R)^T + X (L2 / lambda)^T L1^T + b     (1/lambda folded into the down projection)

(alpha, beta) is searched per layer over DeepCompressor's grid {(0, 0), (a, 0), (a, 1 - a): a = 1/g .. (g-1)/g},
each candidate scored by the squared output error on a sample of the layer's real inputs, with the low-rank
split and both quantizations (weights and activations, round-to-nearest) included. Refinement then iterates
L <- SVD_r(W_hat - Q(W_hat - L)) while the output error improves. The INT4 residual is finally rounded by
GPTQ with H = sum x^T x over all calibration tokens of the layer (rescaled to the smoothed input), when the
layer saw at least K tokens (else H is rank-deficient and GPTQ would overfit): otherwise to nearest with
per-group scales clipped for least squared error (the format stores any scale). Method "naive" always uses
plain absmax/7 round-to-nearest.

The truncated SVD is computed in float64 from the Gram matrix of the smaller side of W_hat (K x K or N x N):
an exact eigendecomposition when that side is <= 1024, else block subspace iteration (r + 16 vectors) with a
Rayleigh-Ritz step; the search warm-starts each candidate from the previous candidate's subspace. Fused layers
(qkv, and the single block's qkv+mlp linear1) are one nn.Linear in FLUX, so q, k and v share one down
projection automatically.

Calibration and memory. The model is processed one block at a time: the inputs of block 0 are captured for
every calibration sample (the embedders run on `device`), then for each block in order: move it to `device`,
run every sample through the ORIGINAL 16-bit block while forward hooks on its linears record, per layer, the
running per-channel max|x|, the running sum x^T x (K x K, for GPTQ) and a uniform random subsample of at most
`max_tokens` input tokens (reservoir by random keys, so memory is bounded whatever the calibration size; the
search and the reported per-layer errors use this sample, so the errors are calibration-set figures, slightly
optimistic for GPTQ); the block outputs are the next block's
inputs (propagation through the original block, as DeepCompressor does). Then the block's linears are replaced
in place by quantized modules, and the block goes back to its original device. Peak device memory is one block,
its layers' K x K moments, and one set of hidden states of the calibration samples (about 33 MB per 1024x1024
sample for FLUX.1); the model is never copied (it is quantized in place and returned).

Methods: "svdquant" (search + low rank + INT4 residual), "smooth" (search, rank 0), "naive" (no smoothing, no
low rank), "w4a16" (every block linear weight-only INT4). Modulation linears (adaLN, input silu(vec)) are
W4A16 or kept 16-bit (`modulation=`); embedders and the final layer stay 16-bit. With `fc2_unsigned=True` (the
default for "svdquant") the
MLP output linears take Nunchaku's unsigned, shifted activations (u4 of (x + 0.171875) / lambda, the shift
folded into the bias); the single block's linear2 then becomes two GEMMs (attention part signed, MLP part
unsigned), like Nunchaku's out_proj + mlp_fc2.
"""
from __future__ import annotations

import inspect
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .modules import SplitInputLinear, W4A4Linear, W4A16Linear, quantized_linears

METHODS = ("svdquant", "smooth", "naive", "w4a16")
MODULATION = ("w4a16", "bf16")
DIT_INPUTS = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")
_FLOAT_INPUTS = ("img", "txt", "y", "timesteps", "guidance")  # cast to the model dtype like the pipeline does
_EXACT_EIGH_MAX = 1024  # Gram sides up to this size get an exact eigendecomposition
_OVERSAMPLE = 16


@dataclass
class QuantConfig:
    method: str = "svdquant"
    rank: int = 32
    modulation: str = "w4a16"
    grid: int = 20  # alpha grid: a = 1/grid .. (grid-1)/grid
    refine_iters: int = 4  # low-rank refinement steps (stop early when the output error stops improving)
    fc2_unsigned: bool = False
    gptq: bool = True  # GPTQ rounding of the INT4 residual (and of W4A16 weights) instead of round-to-nearest
    max_tokens: int = 1024  # input tokens kept per layer for the search and the error figures
    seed: int = 0
    pow2_scales: bool = False  # power-of-two W4A4 weight group scales (ops.quantize_weight(pow2=True))
    pow2_act: bool = False  # power-of-two W4A4 activation group scales (ops.quantize_act(pow2=True))

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantize: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.modulation not in MODULATION:
            raise ValueError(f"quantize: modulation must be one of {MODULATION}, got {self.modulation!r}")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"quantize: rank must be an integer >= 0, got {self.rank!r}")
        if self.grid < 2:
            raise ValueError(f"quantize: grid must be >= 2 (alpha steps of 1/grid), got {self.grid}")
        if self.refine_iters < 0 or self.max_tokens < 1:
            raise ValueError("quantize: refine_iters must be >= 0 and max_tokens >= 1")
        if self.method in ("smooth", "naive", "w4a16"):
            self.rank = 0  # these methods have no low-rank branch by definition
        if self.method == "naive":
            self.gptq = False  # plain round-to-nearest W4A4, the baseline

    @property
    def searches(self) -> bool:
        return self.method in ("svdquant", "smooth")


# ---------------------------------------------------------------------------------------------------------
# Which linears get what


def block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def is_modulation(name: str) -> bool:
    """adaLN modulation linears: `img_mod.lin`, `txt_mod.lin` (double), `modulation.lin` (single)."""
    return name.endswith("mod.lin") or name.endswith("modulation.lin")


def is_fc2(name: str, block_kind: str) -> bool:
    """Linears whose input is gelu(fc1(x)): the double blocks' `*_mlp.2`, the single blocks' `linear2`
    (whose input is concat(attention, gelu(mlp)): only its MLP part is post-GELU)."""
    return name.endswith("mlp.2") if block_kind == "double" else name == "linear2"


# ---------------------------------------------------------------------------------------------------------
# Per-layer statistics (streaming)


class InputStats:
    """Streaming statistics of a linear's input x: per-channel max|x|, the second moment H = sum x^T x (for
    GPTQ; optional) and a uniform random sample of <= max_tokens tokens.

    The sample keeps the tokens with the largest i.i.d. uniform keys seen so far, i.e. a uniform sample
    without replacement over all tokens ever seen, in O(max_tokens * K) memory; H costs K * K floats.
    """

    def __init__(self, max_tokens: int, generator: torch.Generator, hessian: bool = False, sample: bool = True):
        self.max_tokens, self.gen, self.want_hessian, self.want_sample = max_tokens, generator, hessian, sample
        self.absmax = self.keys = self.rows = self.hessian = None
        self.count = 0

    def update(self, x: torch.Tensor):
        x = x.detach().reshape(-1, x.shape[-1])
        amax = x.abs().amax(dim=0).float()
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.count += x.shape[0]
        if self.want_hessian:
            xf = x.float()
            # 16-bit inputs are exact in TF32, so the fast TF32 product loses nothing (fp32 accumulation)
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = x.dtype in (torch.bfloat16, torch.float16)
            try:
                h = xf.T @ xf
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
            self.hessian = h if self.hessian is None else self.hessian.add_(h)
        if not self.want_sample:
            return
        keys = torch.rand(x.shape[0], generator=self.gen, device=self.gen.device).to(x.device)
        if x.shape[0] > self.max_tokens:
            keys, idx = keys.topk(self.max_tokens)
            x = x[idx]
        x = x.float()
        if self.rows is not None:
            keys, x = torch.cat([self.keys, keys]), torch.cat([self.rows, x])
            if keys.shape[0] > self.max_tokens:
                keys, idx = keys.topk(self.max_tokens)
                x = x[idx]
        self.keys, self.rows = keys, x


# ---------------------------------------------------------------------------------------------------------
# Low rank (float64) and simulated quantization


def low_rank(w: torch.Tensor, rank: int, basis: torch.Tensor | None = None, iters: int = 12,
             generator: torch.Generator | None = None):
    """Rank-`rank` truncated SVD of w [N, K] in float64, balanced: returns (up [N, r], down [r, K], basis).

    up @ down is the best rank-r approximation (up to subspace-iteration convergence for Gram sides > 1024);
    up = U sqrt(S), down = sqrt(S) V^T. `basis` (from a previous call on a similar matrix) warm-starts the
    iteration.
    """
    w = w.double()
    left = w.shape[0] <= w.shape[1]
    gram = w @ w.T if left else w.T @ w
    d = gram.shape[0]
    if d <= _EXACT_EIGH_MAX:
        evals, evecs = torch.linalg.eigh(gram)
        vecs, basis = evecs[:, -rank:].flip(-1), None
        evals = evals[-rank:].flip(0)
    else:
        p = min(d, rank + _OVERSAMPLE)
        if basis is None or basis.shape != (d, p):
            basis = torch.randn(d, p, dtype=torch.float64, device=w.device, generator=generator)
        for _ in range(iters):
            basis = torch.linalg.qr(gram @ basis).Q
        small_evals, small_vecs = torch.linalg.eigh(basis.T @ gram @ basis)  # Rayleigh-Ritz
        vecs = basis @ small_vecs[:, -rank:].flip(-1)
        evals = small_evals[-rank:].flip(0)
    sigma = evals.clamp_min(0).sqrt()
    root = sigma.sqrt().clamp_min(1e-30)
    if left:  # vecs = U_r: up = U sqrt(S), down = U^T W / sqrt(S) = sqrt(S) V^T
        up, down = vecs * root, (vecs.T @ w) / root[:, None]
    else:  # vecs = V_r: up = W V / sqrt(S) = U sqrt(S), down = sqrt(S) V^T
        up, down = (w @ vecs) / root, vecs.T * root[:, None]
    return up, down, basis


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest INT4 weight [N, K], dequantized (float32), as W4A4Linear.from_linear stores it."""
    return ops.dequantize(*ops.quantize_weight(w))


def fake_quant_act(x: torch.Tensor, smooth: torch.Tensor, unsigned: bool, pow2: bool = False) -> torch.Tensor:
    """Dequantized INT4 activations of x / smooth [T, K] (float32), as the W4A4 linear computes them.

    For unsigned layers the shift is removed again (shift / smooth), which is what the bias compensation
    of the real layer does.
    """
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    deq = ops.dequantize(*ops.quantize_act(x, smooth, unsigned, shift, pow2))
    return deq - shift / smooth if unsigned else deq


_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _group_scale(wg: torch.Tensor, scale_dtype: torch.dtype, ch: torch.Tensor | None = None) -> torch.Tensor:
    """Scales of 64-wide weight groups wg [..., 64]: (clip * absmax) / 7 with the clip ratio of least squared
    rounding error (weights only; the format allows any scale), rounded to `scale_dtype` -> [...].
    With `ch` (the rows' channel scales, broadcastable to [...]): the power-of-two format instead, the
    candidates being ch * 2^-e for e = 0 .. ops.POW2_MAX_EXP (ops.pow2_group_scales)."""
    amax = wg.abs().amax(dim=-1)
    if ch is None:
        cands = [(amax * clip / 7.0).to(scale_dtype) for clip in _CLIP_RATIOS]
    else:
        cands = ops.pow2_candidates(ch, amax.shape, scale_dtype)
    return ops.least_error_scales(wg, cands)[0]


def rtn_quantize(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16, pow2: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest INT4 of w [N, K] with MSE-clipped group scales (see _group_scale) -> (codes, scales).
    pow2: power-of-two group scales (ops.quantize_weight(pow2=True)'s format)."""
    n, k = w.shape
    wg = w.float().view(n, k // ops.GROUP, ops.GROUP)
    scales = _group_scale(wg, scale_dtype, ops.pow2_channel_scale(w, scale_dtype)[:, None] if pow2 else None)
    s = scales.float()[..., None]
    codes = torch.round(wg / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-8, 7).to(torch.int8)
    return codes.view(n, k), scales


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, block: int = 128,
                  scale_dtype: torch.dtype = torch.bfloat16, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ: quantize w [N, K] column by column to INT4 (per row, groups of 64, symmetric), pushing each
    column's rounding error onto the not yet quantized columns through the inverse of H = sum x^T x [K, K],
    which minimizes the output error sum ||x (W - Q)^T||^2 over the calibration inputs.

    Group scales are chosen when the group is reached, from its weights as updated so far: absmax/7 times the
    clip ratio in 1.0 .. 0.75 of least squared rounding error, rounded to `scale_dtype`. pow2: power-of-two
    group scales, the channel scale fixed from the weights before any update (see _group_scale).
    Returns (codes int8 [N, K], scales [N, K//64]) in ops.quantize_weight's conventions.
    """
    n, k = w.shape
    g = ops.GROUP
    w = w.float().clone()
    h = hessian.double().clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    try:  # upper Cholesky factor of H^-1: row i holds the update coefficients of column i onto columns > i
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    except torch.linalg.LinAlgError:  # numerically singular even after damping: plain rounding is safe
        return rtn_quantize(w, scale_dtype, pow2)
    ch = ops.pow2_channel_scale(w, scale_dtype) if pow2 else None
    codes = torch.zeros(n, k, dtype=torch.int8, device=w.device)
    scales = torch.zeros(n, k // g, dtype=scale_dtype, device=w.device)
    block = max(g, block // g * g)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                s = _group_scale(w1[:, i:i + g], scale_dtype, ch)
                scales[:, col // g] = s
                s = s.float()
                safe = torch.where(s > 0, s, torch.ones_like(s))
            q = torch.round(w1[:, i] / safe).clamp_(-8, 7)
            codes[:, col] = q.to(torch.int8)
            err = (w1[:, i] - q * s) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales


def smoothing_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """lambda = max|X|^alpha / max|W|^beta per input channel, normalized to geometric mean 1 (the quantized
    result does not depend on a global factor; this keeps the bf16 low-rank factors in a sane range)."""
    lam = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(beta)
    return lam / lam.log().mean().exp()


def candidates(method: str, grid: int) -> list[tuple[float, float]]:
    if method not in ("svdquant", "smooth"):
        return [(0.0, 0.0)]
    alphas = [i / grid for i in range(1, grid)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in alphas] + [(a, 1.0 - a) for a in alphas]


@dataclass
class LayerResult:
    smooth: torch.Tensor  # [K] float32
    up: torch.Tensor | None  # [N, r] float64
    down: torch.Tensor | None  # [r, K] float64, acting on the smoothed input
    alpha: float
    beta: float
    error: float  # squared relative output error of the simulation (the search score)


def search_layer(w: torch.Tensor, x: torch.Tensor, x_absmax: torch.Tensor, cfg: QuantConfig,
                 unsigned: bool = False, generator: torch.Generator | None = None) -> tuple[LayerResult, float]:
    """Choose smoothing and low rank for weight w [N, K] (K a multiple of 64) given input sample x [T, K].

    Returns the best result and the naive W4A4 score (no smoothing, no low rank) for comparison.
    """
    w = w.float()
    y_ref = x @ w.T
    ref_energy = y_ref.pow(2).sum().clamp_min(1e-30)
    w_absmax = w.abs().amax(dim=0)
    ones = torch.ones_like(x_absmax)

    def score(lam, lowrank):
        w_hat = w * lam
        resid = w_hat if lowrank is None else w_hat - lowrank
        y = fake_quant_act(x, lam, unsigned, cfg.pow2_act) @ fake_quant_weight(resid).T
        if lowrank is not None:
            y = y + (x / lam) @ lowrank.T
        return ((y - y_ref).pow(2).sum() / ref_energy).item()

    def factors(w_hat, basis, iters):
        return low_rank(w_hat, cfg.rank, basis, iters, generator)

    naive = score(ones, None)
    best, basis = None, None
    for alpha, beta in candidates(cfg.method, cfg.grid):
        lam = ones if alpha == beta == 0 else smoothing_factors(x_absmax, w_absmax, alpha, beta)
        up = down = lowrank = None
        if cfg.rank:
            up, down, basis = factors(w * lam, basis, 12 if basis is None else 3)
            lowrank = (up @ down).float()
        err = naive if (alpha == beta == 0 and lowrank is None) else score(lam, lowrank)
        if best is None or err < best.error:
            best = LayerResult(lam, up, down, alpha, beta, err)
    if cfg.rank:  # converge the chosen subspace, then refine: L <- SVD_r(W_hat - Q(W_hat - L))
        w_hat = (w * best.smooth).double()
        up, down, basis = factors(w_hat, basis, 30)
        lowrank = (up @ down).float()
        best.up, best.down, best.error = up, down, score(best.smooth, lowrank)
        for _ in range(cfg.refine_iters):
            target = w_hat - fake_quant_weight(w_hat.float() - lowrank).double()
            up, down, basis = factors(target, basis, 4)
            lowrank = (up @ down).float()
            err = score(best.smooth, lowrank)
            if err >= best.error:
                break
            best.up, best.down, best.error = up, down, err
    return best, naive


def _pad_k(t: torch.Tensor, k_padded: int, value: float = 0.0) -> torch.Tensor:
    return F.pad(t, (0, k_padded - t.shape[-1]), value=value) if t.shape[-1] != k_padded else t


def build_w4a4(linear: nn.Linear, result: LayerResult, unsigned: bool,
               hessian: torch.Tensor | None = None, clip: bool = False, pow2: bool = False,
               act_pow2: bool = False) -> W4A4Linear:
    """The W4A4Linear for `linear` from a search result; the residual is computed against the low-rank
    factors as they will be stored (rounded to the model dtype), so their rounding error gets quantized too.
    The residual is rounded by GPTQ in the smoothed space when `hessian` (sum x^T x of the raw inputs) is
    given, else to nearest: with MSE-clipped scales if `clip`, else plain absmax/7 scales. pow2: power-of-two
    group scales (ops.quantize_weight(pow2=True); the Hopper GEMMs fold them into their weight operand);
    act_pow2: the layer quantizes its activations with power-of-two scales (ops.quantize_act(pow2=True))."""
    k = linear.in_features
    w = linear.weight.detach().float()
    lam = result.smooth[:k].float()
    dtype = linear.weight.dtype if linear.weight.dtype in (torch.bfloat16, torch.float16) else torch.float32
    lora_down = lora_up = None
    resid = w * lam
    if result.up is not None:
        lora_up = result.up.to(dtype)
        lora_down = (result.down[:, :k] / lam.double()).to(dtype)  # reads the raw input
        resid = resid - (lora_up.float() @ (lora_down.float() * lam))
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    layer = W4A4Linear.from_linear(linear, resid, smooth=lam, lora_down=lora_down, lora_up=lora_up,
                                   act_unsigned=unsigned, act_shift=shift, pow2=pow2, act_pow2=act_pow2)
    kp = layer.smooth.shape[0]
    if hessian is not None:
        lam_p = layer.smooth.double()
        h = F.pad(hessian.double(), (0, kp - k, 0, kp - k)) / (lam_p[:, None] * lam_p[None, :])  # of x / lambda
        _set_codes(layer, *gptq_quantize(_pad_k(resid, kp), h, scale_dtype=layer.wscales.dtype, pow2=pow2))
    elif clip:
        _set_codes(layer, *rtn_quantize(_pad_k(resid, kp), layer.wscales.dtype, pow2))
    if unsigned:
        remove_shift_term_(layer)
    return layer


def remove_shift_term_(layer: W4A4Linear) -> None:
    """(x + s)/lambda . Rq^T = x/lambda . Rq^T + s * rowsum(Rq / lambda): take the constant second term of an
    unsigned, shifted W4A4 layer out of its bias, so the layer computes x W^T + b again."""
    rq = layer.dequantized_weight() / layer.smooth
    layer.bias.copy_((layer.bias.float() - layer.act_shift * rq.sum(dim=1)).to(layer.bias.dtype))


def _set_codes(layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor):
    layer.qweight.copy_(ops.pack_int4(codes))
    layer.wscales.copy_(scales)


def build_w4a16(linear: nn.Linear, hessian: torch.Tensor | None = None, clip: bool = True) -> W4A16Linear:
    """W4A16Linear for `linear`: GPTQ when the input second moment `hessian` is given, else round-to-nearest
    with MSE-clipped scales (`clip`) or plain absmax/7 scales."""
    layer = W4A16Linear.from_linear(linear)
    k, kp = linear.in_features, layer.wscales.shape[1] * ops.GROUP
    w = _pad_k(linear.weight.detach().float(), kp)
    if hessian is not None:
        _set_codes(layer, *gptq_quantize(w, F.pad(hessian, (0, kp - k, 0, kp - k)), scale_dtype=layer.wscales.dtype))
    elif clip:
        _set_codes(layer, *rtn_quantize(w, layer.wscales.dtype))
    return layer


def _linear_part(linear: nn.Linear, lo: int, hi: int, with_bias: bool) -> nn.Linear:
    """A view of input columns [lo, hi) of `linear` as an nn.Linear (no copy of the full weight)."""
    part = nn.Linear(hi - lo, linear.out_features, bias=with_bias, device="meta")
    part.weight = nn.Parameter(linear.weight.detach()[:, lo:hi], requires_grad=False)
    if with_bias:
        part.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return part


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------
# Quantizing one block


def quantize_block(block: nn.Module, kind: str, stats: dict[str, InputStats], cfg: QuantConfig,
                   generator: torch.Generator | None = None) -> list[dict]:
    """Replace the linears of `block` (on the compute device) in place; returns per-layer figures.

    Each record: layer, precision, rel_err (the real quantized module's output vs the 16-bit one on the
    sampled tokens, relative L2), naive_err (W4A4 without smoothing/low rank, simulated), alpha, beta.
    """
    records = []
    for name, linear in block_linears(block):
        st = stats.get(name)
        if is_modulation(name) or cfg.method == "w4a16":
            if is_modulation(name) and cfg.modulation == "bf16":
                continue
            new = build_w4a16(linear, _hessian(st, cfg), clip=cfg.method != "naive")
            rec = dict(precision="w4a16")
        else:
            unsigned = cfg.fc2_unsigned and is_fc2(name, kind) and linear.bias is not None
            if unsigned and kind == "single":  # concat(attn, gelu(mlp)): signed attention part + unsigned MLP part
                hidden = linear.out_features
                parts, naives, alphas = [], [], []
                for lo, hi, uns in ((0, hidden, False), (hidden, linear.in_features, True)):
                    sub = _linear_part(linear, lo, hi, with_bias=uns)
                    res, naive = _search(sub, st.absmax[lo:hi], st.rows[:, lo:hi], cfg, uns, generator)
                    parts.append(build_w4a4(sub, res, uns, _hessian(st, cfg, lo, hi), clip=cfg.method != "naive",
                                            pow2=cfg.pow2_scales, act_pow2=cfg.pow2_act))
                    naives.append(naive)
                    alphas.append((res.alpha, res.beta))
                new = SplitInputLinear(parts)
                rec = dict(precision="w4a4", naive_err=math.sqrt(sum(naives) / 2), alpha=alphas[1][0],
                           beta=alphas[1][1], unsigned=True)
            else:
                res, naive = _search(linear, st.absmax, st.rows, cfg, unsigned, generator)
                new = build_w4a4(linear, res, unsigned, _hessian(st, cfg), clip=cfg.method != "naive",
                                 pow2=cfg.pow2_scales, act_pow2=cfg.pow2_act)
                rec = dict(precision="w4a4", naive_err=math.sqrt(naive), alpha=res.alpha, beta=res.beta,
                           unsigned=unsigned)
        if st is not None and st.rows is not None:
            x = st.rows.to(linear.weight.dtype)
            rec["rel_err"] = _rel_error(new(x), F.linear(x.float(), linear.weight.float(),
                                                         None if linear.bias is None else linear.bias.float()))
        block.set_submodule(name, new)
        records.append(dict(layer=name, **rec))
    return records


def _hessian(st: InputStats, cfg: QuantConfig, lo: int = 0, hi: int | None = None) -> torch.Tensor | None:
    """The input second moment for GPTQ, or None (round to nearest) when GPTQ is off or the layer saw fewer
    calibration tokens than it has inputs: H is then rank-deficient and GPTQ overfits those few tokens."""
    if not cfg.gptq or st is None or st.hessian is None:
        return None
    h = st.hessian[lo:hi, lo:hi]
    return h if st.count >= h.shape[0] else None


def _search(linear: nn.Linear, absmax: torch.Tensor, rows: torch.Tensor, cfg: QuantConfig, unsigned: bool,
            generator) -> tuple[LayerResult, float]:
    k = linear.in_features
    kp = -(-k // ops.GROUP) * ops.GROUP
    if cfg.rank > min(linear.out_features, k):
        raise ValueError(f"quantize: rank {cfg.rank} > min(N, K) = {min(linear.out_features, k)}")
    w = _pad_k(linear.weight.detach().float(), kp)
    x = _pad_k(rows.float(), kp)
    absmax = _pad_k(absmax.float(), kp, 1.0)
    return search_layer(w, x, absmax, cfg, unsigned, generator)


# ---------------------------------------------------------------------------------------------------------
# Calibration inputs


class _Stop(Exception):
    def __init__(self, args):
        self.args_ = args


def _bind(fn, args, kwargs) -> dict:
    bound = inspect.signature(fn).bind(*args, **kwargs)
    return dict(bound.arguments)


def _detach_cpu(v):
    if not isinstance(v, torch.Tensor):
        return v
    with torch.inference_mode(False):  # the pipeline runs in inference mode; keep ordinary tensors
        return v.detach().to("cpu", copy=True).clone()


def collect_pipeline_inputs(pipeline, prompts, steps: int | None = None, seed: int = 0, **call_kwargs) -> list[dict]:
    """Run `pipeline` (a nunchaku_lite.Flux) on each prompt with all its sampler steps and return the DiT's
    keyword inputs of every step (moved to CPU): the calibration set DeepCompressor draws its samples from."""
    dit = getattr(pipeline, "transformer", None)
    if not isinstance(dit, nn.Module):
        raise ValueError("quantize: `pipeline` has no `.transformer` module to capture calibration inputs from")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("quantize: calibration prompts must be a non-empty list of strings")
    captured = []

    def hook(module, args, kwargs):
        captured.append({k: _detach_cpu(v) for k, v in _bind(module.forward, args, kwargs).items()})

    handle = dit.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, prompt in enumerate(prompts):
            pipeline(prompt, steps=steps, seed=seed + i, output_type="latent", **call_kwargs)
    finally:
        handle.remove()
    return captured


def calibration_inputs(calibration, pipeline=None, steps=None, samples=None, seed=0,
                       pipeline_kwargs: dict | None = None) -> list[dict]:
    """Normalize `calibration` (list of DiT kwarg dicts, or prompts with `pipeline=`) to a list of dicts,
    keeping at most `samples` of them (a seeded random subset in original order)."""
    if isinstance(calibration, str) or (isinstance(calibration, (list, tuple)) and calibration
                                        and all(isinstance(c, str) for c in calibration)):
        if pipeline is None:
            raise ValueError("quantize: calibration prompts need `pipeline=` (a nunchaku_lite.Flux) to run them")
        inputs = collect_pipeline_inputs(pipeline, calibration, steps, seed, **(pipeline_kwargs or {}))
    elif isinstance(calibration, (list, tuple)) and calibration and all(isinstance(c, dict) for c in calibration):
        inputs = list(calibration)
        for i, c in enumerate(inputs):
            missing = [k for k in DIT_INPUTS if k != "guidance" and k not in c]
            unknown = [k for k in c if k not in DIT_INPUTS]
            if missing or unknown:
                raise ValueError(f"quantize: calibration[{i}] must hold the transformer's inputs {DIT_INPUTS}; "
                                 f"missing {missing}, unknown {unknown}")
    else:
        raise TypeError("quantize: calibration must be a non-empty list of dicts of the transformer's inputs "
                        f"({', '.join(DIT_INPUTS)}) or a list of prompts with pipeline=; "
                        f"got {type(calibration).__name__}")
    if samples is not None and len(inputs) > samples:
        g = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(inputs), generator=g)[:samples].tolist())
        inputs = [inputs[i] for i in keep]
    return inputs


# ---------------------------------------------------------------------------------------------------------
# The whole model


def _check_model(dit: nn.Module, cfg: QuantConfig):
    if not hasattr(dit, "double_blocks") or not hasattr(dit, "single_blocks"):
        raise TypeError(f"quantize: expected a nunchaku_lite Flux transformer, got {type(dit).__name__}")
    done = next(quantized_linears(dit), None)
    if done is not None:
        raise ValueError(f"quantize: the model is already quantized ({done[0]} is a {type(done[1]).__name__}); "
                         "quantize the 16-bit model instead")
    if any(p.is_meta for p in dit.parameters()):
        raise ValueError("quantize: the model has weights on the meta device (not loaded)")
    padded = []
    for kind, blocks in (("double", dit.double_blocks), ("single", dit.single_blocks)):
        for i, block in enumerate(blocks):
            for name, lin in block_linears(block):
                path = f"{kind}_blocks.{i}.{name}"
                if lin.in_features % ops.GROUP:
                    padded.append(path)
                if cfg.rank and not is_modulation(name) and cfg.rank > min(lin.in_features, lin.out_features):
                    raise ValueError(f"quantize: rank {cfg.rank} > min(N, K) = "
                                     f"{min(lin.in_features, lin.out_features)} for {path} "
                                     f"[{lin.out_features} x {lin.in_features}]")
    if padded:
        warnings.warn(f"quantize: {len(padded)} linears have K not a multiple of {ops.GROUP} (e.g. {padded[0]}); "
                      "their weights and inputs are zero-padded to the next multiple", stacklevel=4)


def _to_device(sample: dict, device, dtype) -> dict:
    out = {}
    for k, v in sample.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if k in _FLOAT_INPUTS and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _block_inputs(dit, inputs, device, dtype) -> list[tuple]:
    """Run the embedders (moved to `device`) and return the positional inputs of the first block per sample."""
    first = dit.double_blocks[0] if len(dit.double_blocks) else dit.single_blocks[0]

    def stop(module, args, kwargs):
        raise _Stop(tuple(_bind(module.forward, args, kwargs).values()))

    stem = [m for n, m in dit.named_children() if n not in ("double_blocks", "single_blocks")]
    homes = [_device_of(m) for m in stem]
    for m in stem:
        m.to(device)
    handle = first.register_forward_pre_hook(stop, with_kwargs=True)
    states = []
    try:
        for sample in inputs:
            try:
                dit(**_to_device(sample, device, dtype))
            except _Stop as s:
                states.append(s.args_)
            else:
                raise RuntimeError("quantize: the first block was never called")
    finally:
        handle.remove()
        for m, home in zip(stem, homes):
            if home is not None:
                m.to(home)
    return states


def _device_of(module: nn.Module):
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers(), None)
    return None if t is None else t.device


def _log_block(name, seconds, records, file):
    errs = [r for r in records if "rel_err" in r]
    parts = []
    for r in errs:
        s = f"{r['layer']} {r['rel_err']:.4f}"
        if "naive_err" in r and r["precision"] == "w4a4":
            s += f" (naive {r['naive_err']:.4f})"
        parts.append(s)
    print(f"[quantize] {name}: {seconds:.1f}s  rel. output error: " + ", ".join(parts), file=file, flush=True)


@torch.no_grad()
def quantize(dit: nn.Module, calibration, method: str = "svdquant", rank: int = 32, *, modulation: str = "w4a16",
             grid: int = 20, refine_iters: int = 4, fc2_unsigned: bool | None = None, gptq: bool = True,
             max_tokens: int = 1024, pow2_scales: bool = False, pow2_act: bool = False,
             device=None, progress=True, pipeline=None, steps: int | None = None, samples: int | None = None,
             seed: int = 0, pipeline_kwargs: dict | None = None) -> nn.Module:
    """Quantize a FLUX DiT IN PLACE (its linears are swapped for quantized modules) and return it.

    dit: a 16-bit nunchaku_lite Flux (e.g. from `load_transformer`), on any device (CPU RAM is fine).
    calibration: a list of dicts of the transformer's keyword inputs (img, img_ids, txt, txt_ids, timesteps, y,
        guidance), or a list of prompts together with `pipeline=` (their DiT inputs at every one of the `steps`
        sampler steps are captured; `pipeline_kwargs` such as height/width go to each pipeline call);
        `samples` keeps a random subset of that many inputs.
    method: "svdquant" | "smooth" | "naive" | "w4a16"; rank: low-rank branch rank (svdquant; 0 allowed).
    modulation: "w4a16" (4-bit weights, 16-bit activations) or "bf16" (kept in the model's 16-bit dtype).
    grid: alpha steps of 1/grid in the smoothing search; refine_iters: low-rank refinement iterations.
    fc2_unsigned: unsigned shifted activations for the MLP output linears (Nunchaku's choice). None (default)
        means True for "svdquant" and False for the ablations "smooth" and "naive": post-GELU inputs are nearly
        non-negative, so the unsigned grid gives them one more bit of resolution.
    gptq: round the INT4 weights (W4A4 residuals, W4A16 layers) with GPTQ using the calibration inputs'
        second moments, instead of round-to-nearest (method "naive" always rounds to nearest).
    max_tokens: input tokens sampled per layer for the search and the reported errors.
    pow2_scales: W4A4 weight group scales that are the row's channel scale times 2^-e (0 <= e <= 4): the
        same format, a slightly coarser grid (see the README's quality table), and on Hopper the GEMM folds
        them into its weight operand (native.w4a4_gemm's folded kernels).
    pow2_act: the W4A4 layers quantize their activations with power-of-two group scales per token
        (ops.quantize_act(pow2=True)). With pow2_scales this is the format of the Hopper integer GEMM, which
        accumulates all of K in int32 without per-group promotion (the fastest W4A4 path on H100/H200).
    device: where each block is quantized (default: CUDA if available, else the model's device).
    progress: True prints one line per block to stderr; a callable receives (block_name, seconds, records).

    The result has `quant_config` (settings, saved by `save_quantized`) and `quant_report` (per-layer errors).
    """
    if fc2_unsigned is None:
        fc2_unsigned = method == "svdquant"
    cfg = QuantConfig(method, rank, modulation, grid, refine_iters, fc2_unsigned, gptq, max_tokens, seed,
                      pow2_scales, pow2_act)
    _check_model(dit, cfg)
    inputs = calibration_inputs(calibration, pipeline, steps, samples, seed, pipeline_kwargs)
    home = _device_of(dit)
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else home)
    dtype = next(dit.parameters()).dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    report, start = [], time.perf_counter()

    states = _block_inputs(dit, inputs, device, dtype)
    blocks = [("double", i, b) for i, b in enumerate(dit.double_blocks)]
    blocks += [("single", i, b) for i, b in enumerate(dit.single_blocks)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not a multiple of.*")  # reported once by _check_model
        for kind, i, block in blocks:
            t0 = time.perf_counter()
            if kind == "single" and i == 0 and len(dit.double_blocks):
                states = [(torch.cat((txt, img), dim=1), *rest) for img, txt, *rest in states]  # txt first
            block_home = _device_of(block)
            block.to(device)
            stats, hooks = {}, []
            for name, lin in block_linears(block):
                mod = is_modulation(name)
                if mod and (cfg.modulation == "bf16" or not cfg.gptq):
                    continue
                stats[name] = st = InputStats(cfg.max_tokens, generator, hessian=cfg.gptq, sample=not mod)
                hooks.append(lin.register_forward_pre_hook(lambda m, a, st=st: st.update(a[0])))
            try:  # each sample's output replaces its input right away: one set of hidden states in memory
                for j, args in enumerate(states):
                    out = block(*args)
                    states[j] = (*out, *args[2:]) if kind == "double" else (out, *args[1:])
                del args, out
            finally:
                for h in hooks:
                    h.remove()
            records = quantize_block(block, kind, stats, cfg, generator)
            del stats
            block.to(block_home)
            name, seconds = f"{kind}_blocks.{i}", time.perf_counter() - t0
            if callable(progress):
                progress(name, seconds, records)
            elif progress:
                _log_block(name, seconds, records, sys.stderr)
            report += [dict(r, layer=f"{name}.{r['layer']}") for r in records]
    if progress is True:
        print(f"[quantize] done: {len(blocks)} blocks in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    dit.quant_config = dict(asdict(cfg), samples=len(inputs))
    dit.quant_report = report
    return dit

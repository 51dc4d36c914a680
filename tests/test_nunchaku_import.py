"""Nunchaku INT4 checkpoint import: a packer written from NUNCHAKU_FORMAT.md's index formulas (forward direction,
element by element, independent of the importer's vectorized inverses) builds Nunchaku files for a tiny FLUX;
the import must recover every integer code, scale and vector exactly and reproduce the documented forward."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nunchaku_lite.models.dit import Flux, FluxParams
from nunchaku_lite.quant import nunchaku as nk
from nunchaku_lite.quant import ops
from nunchaku_lite.quant.modules import ConcatOutputLinear, SplitInputLinear, W4A4Linear, W4A16Linear

SHIFT = 0.171875


# ---------------------------------------------------------------------------------------------------------
# "Their packing": NUNCHAKU_FORMAT.md §3 formulas, scattering each element to its flat position


def _grid(*sizes):
    return np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")


def pack_w4a4_qweight(codes: np.ndarray) -> torch.Tensor:
    n_, k_ = codes.shape
    n, k = _grid(n_, k_)
    nt, np_, npk, nl = n // 128, (n % 128) // 16, (n % 16) // 8, n % 8
    kt, kpk, kl, j = k // 64, (k % 64) // 32, (k % 32) // 8, k % 8
    word = (((((nt * (k_ // 64) + kt) * 8 + np_) * 8 + nl) * 4 + kl) * 2 + npk) * 2 + kpk
    byte = 4 * word + j // 2
    out = np.zeros(n_ * k_ // 2, np.uint8)
    np.add.at(out, byte.ravel(), ((codes & 0xF) << (4 * (j % 2))).astype(np.uint8).ravel())
    return torch.from_numpy(out.view(np.int8).reshape(n_, k_ // 2).copy())


def _perm128(n):
    r = n % 128
    a, b, c, d = r // 16, (r % 16) // 8, (r % 8) // 2, r % 2
    return a * 16 + c * 4 + b * 2 + d


def pack_w4a4_wscales(s: torch.Tensor) -> torch.Tensor:
    n_, g_ = s.shape
    n, g = _grid(n_, g_)
    flat = (n // 128 * g_ + g) * 128 + _perm128(n)
    out = torch.empty(n_ * g_, dtype=s.dtype)
    out[torch.from_numpy(flat.ravel())] = s.reshape(-1)
    return out.reshape(g_, n_)


def pack_vec128(v: torch.Tensor) -> torch.Tensor:
    n = np.arange(v.shape[0])
    out = torch.empty_like(v)
    out[torch.from_numpy(n // 128 * 128 + _perm128(n))] = v
    return out


def pack_lora_down(down: torch.Tensor) -> torch.Tensor:  # down [R, K] -> stored [K, R]
    r_, k_ = down.shape
    r, c = _grid(r_, k_)
    flat = ((c // 16) * (r_ // 16) + r // 16) * 256 + (r % 8) * 32 + ((c % 8) // 2) * 8 + ((r % 16) // 8) * 4 \
        + ((c % 16) // 8) * 2 + (c % 2)
    out = torch.empty(r_ * k_, dtype=down.dtype)
    out[torch.from_numpy(flat.ravel())] = down.reshape(-1)
    return out.reshape(k_, r_)


def pack_lora_up(up: torch.Tensor) -> torch.Tensor:  # up [N, R] -> stored [N, R]
    n_, r_ = up.shape
    n, r = _grid(n_, r_)
    flat = ((n // 16) * (r_ // 16) + r // 16) * 256 + (n % 8) * 32 + ((r % 8) // 2) * 8 + ((n % 16) // 8) * 4 \
        + ((r % 16) // 8) * 2 + (r % 2)
    out = torch.empty(n_ * r_, dtype=up.dtype)
    out[torch.from_numpy(flat.ravel())] = up.reshape(-1)
    return out.reshape(n_, r_)


def stored_row(n: np.ndarray, n_total: int, splits: int) -> np.ndarray:
    """Diffusers row n = c*Dm + j is stored at row j*S + c."""
    dm = n_total // splits
    return (n % dm) * splits + n // dm


def pack_w4a16_qweight(u: np.ndarray, splits: int) -> torch.Tensor:  # u [N, K] unsigned, diffusers rows
    n_, k_ = u.shape
    n, k = _grid(n_, k_)
    ns = stored_row(n, n_, splits)
    rw, ri = ns // 4, ns % 4
    ch, h, a, b = k // 64, (k % 64) // 32, (k % 32) // 8, k % 8
    t = rw * k_ + ch * 64 + ri * 16 + h * 8 + b
    byte = 2 * t + a // 2
    out = np.zeros(n_ * k_ // 2, np.uint8)
    np.add.at(out, byte.ravel(), (u.astype(np.uint8) << (4 * (a % 2))).astype(np.uint8).ravel())
    return torch.from_numpy(out.view(np.int32).reshape(n_ // 4, k_ // 2).copy())


def pack_w4a16_rows(v: torch.Tensor, splits: int) -> torch.Tensor:
    """[N, ...] in diffusers order -> stored row order (rows j*S + c)."""
    n = np.arange(v.shape[0])
    out = torch.empty_like(v)
    out[torch.from_numpy(stored_row(n, v.shape[0], splits))] = v
    return out


# ---------------------------------------------------------------------------------------------------------
# Ground truth for a tiny FLUX (D = 128 = one head of 128, F = 512)

D, F = 128, 512


def tiny_params(guidance=True):
    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=D,
                      mlp_ratio=F / D, num_heads=1, depth=2, depth_single_blocks=2, axes_dim=(16, 56, 56),
                      guidance_embed=guidance)


def diffusers_config(p: FluxParams):
    return {"_class_name": "FluxTransformer2DModel", "attention_head_dim": p.hidden_size // p.num_heads,
            "axes_dims_rope": list(p.axes_dim), "guidance_embeds": p.guidance_embed, "in_channels": p.in_channels,
            "joint_attention_dim": p.context_in_dim, "num_attention_heads": p.num_heads, "num_layers": p.depth,
            "num_single_layers": p.depth_single_blocks, "patch_size": 1, "pooled_projection_dim": p.vec_in_dim}


def bf16(t):
    return t.to(torch.bfloat16)


def make_w4a4(g: torch.Generator, n, k, rank, smooth=None, zero_bias=False):
    return {
        "codes": torch.randint(-8, 8, (n, k), generator=g).to(torch.int8),
        "wscales": bf16(torch.rand(n, k // 64, generator=g) * 0.02 + 0.002),
        "smooth": smooth if smooth is not None else bf16(torch.rand(k, generator=g) * 1.5 + 0.5),
        "down": bf16(torch.randn(rank, k, generator=g) * 0.05),
        "up": bf16(torch.randn(n, rank, generator=g) * 0.05),
        "bias": torch.zeros(n, dtype=torch.bfloat16) if zero_bias else bf16(torch.randn(n, generator=g) * 0.1),
    }


def make_w4a16(g: torch.Generator, n, k):
    s = bf16(torch.rand(n, k // 64, generator=g) * 0.02 + 0.002)
    return {"codes": torch.randint(0, 16, (n, k), generator=g).to(torch.int8), "wscales": s,
            "wzeros": bf16(-(7 * s.float())), "bias": bf16(torch.randn(n, generator=g) * 0.1)}


def nunchaku_w4a4_tensors(prefix, L):
    return {f"{prefix}.qweight": pack_w4a4_qweight(L["codes"].numpy().astype(np.int64)),
            f"{prefix}.wscales": pack_w4a4_wscales(L["wscales"]),
            f"{prefix}.bias": pack_vec128(L["bias"]),
            f"{prefix}.smooth": pack_vec128(L["smooth"]),
            f"{prefix}.smooth_orig": pack_vec128(L["smooth"]),
            f"{prefix}.lora_down": pack_lora_down(L["down"]),
            f"{prefix}.lora_up": pack_lora_up(L["up"])}


# AdaLN chunks holding a scale: (shift, SCALE, gate) x 2 for double blocks, (shift, SCALE, gate) for single ones
SCALE_CHUNKS = {6: (1, 4), 3: (1,)}


def stored_w4a16_bias(bias: torch.Tensor, splits: int) -> torch.Tensor:
    """Nunchaku stores the scale chunks with +1 folded in (in bf16)."""
    b = bias.float().clone()
    dm = b.shape[0] // splits
    for c in SCALE_CHUNKS[splits]:
        b[c * dm:(c + 1) * dm] += 1
    return bf16(b)


def nunchaku_w4a16_tensors(prefix, L, splits):
    """Packed tensors; also sets L["bias_bfl"], the (1 + scale) bias the file really holds (the +1 went through
    bf16 rounding, so small scale biases lose bits: that is in the file, not in the import)."""
    stored = stored_w4a16_bias(L["bias"], splits).float()
    dm = stored.shape[0] // splits
    L["bias_bfl"] = stored.clone()
    for c in SCALE_CHUNKS[splits]:
        L["bias_bfl"][c * dm:(c + 1) * dm] -= 1
    return {f"{prefix}.qweight": pack_w4a16_qweight(L["codes"].numpy().astype(np.int64), splits),
            f"{prefix}.wscales": pack_w4a16_rows(L["wscales"], splits).T.contiguous(),
            f"{prefix}.wzeros": pack_w4a16_rows(L["wzeros"], splits).T.contiguous(),
            f"{prefix}.bias": pack_w4a16_rows(stored_w4a16_bias(L["bias"], splits), splits)}


DOUBLE = {"qkv_proj": (3 * D, D), "qkv_proj_context": (3 * D, D), "out_proj": (D, D), "out_proj_context": (D, D),
          "mlp_fc1": (F, D), "mlp_fc2": (D, F), "mlp_context_fc1": (F, D), "mlp_context_fc2": (D, F)}
UNQ = {"x_embedder": (D, 64), "context_embedder": (D, 64), "time_text_embed.timestep_embedder.linear_1": (D, 256),
       "time_text_embed.timestep_embedder.linear_2": (D, D), "time_text_embed.text_embedder.linear_1": (D, 32),
       "time_text_embed.text_embedder.linear_2": (D, D), "norm_out.linear": (2 * D, D), "proj_out": (64, D)}


def build_truth(params: FluxParams, seed=0):
    """Integer/bf16 ground truth per Nunchaku layer name, plus the Nunchaku-packed tensors."""
    g = torch.Generator().manual_seed(seed)
    truth, blocks, unq = {}, {}, {}
    ranks = iter([16, 32, 48] * 100)
    for i in range(params.depth):
        pre = f"transformer_blocks.{i}"
        for name, (n, k) in DOUBLE.items():
            truth[f"{pre}.{name}"] = L = make_w4a4(g, n, k, next(ranks))
            blocks.update(nunchaku_w4a4_tensors(f"{pre}.{name}", L))
        for name in ("norm1.linear", "norm1_context.linear"):
            truth[f"{pre}.{name}"] = L = make_w4a16(g, 6 * D, D)
            blocks.update(nunchaku_w4a16_tensors(f"{pre}.{name}", L, 6))
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            gain = bf16(1 + 0.2 * torch.randn(128, generator=g))
            truth[f"{pre}.{name}.weight"] = blocks[f"{pre}.{name}.weight"] = gain
    for i in range(params.depth_single_blocks):
        pre = f"single_transformer_blocks.{i}"
        shared = bf16(torch.rand(D, generator=g) * 1.5 + 0.5)  # qkv_proj and mlp_fc1 share their smooth
        for name, (n, k) in {"qkv_proj": (3 * D, D), "mlp_fc1": (F, D), "out_proj": (D, D), "mlp_fc2": (D, F)}.items():
            L = make_w4a4(g, n, k, next(ranks), smooth=shared if name in ("qkv_proj", "mlp_fc1") else None,
                          zero_bias=name == "out_proj")
            truth[f"{pre}.{name}"] = L
            blocks.update(nunchaku_w4a4_tensors(f"{pre}.{name}", L))
        truth[f"{pre}.norm.linear"] = L = make_w4a16(g, 3 * D, D)
        blocks.update(nunchaku_w4a16_tensors(f"{pre}.norm.linear", L, 3))
        for name in ("norm_q", "norm_k"):
            gain = bf16(1 + 0.2 * torch.randn(128, generator=g))
            truth[f"{pre}.{name}.weight"] = blocks[f"{pre}.{name}.weight"] = gain
    unq_shapes = dict(UNQ)
    if params.guidance_embed:
        unq_shapes["time_text_embed.guidance_embedder.linear_1"] = (D, 256)
        unq_shapes["time_text_embed.guidance_embedder.linear_2"] = (D, D)
    for name, (n, k) in unq_shapes.items():
        unq[f"{name}.weight"] = bf16(torch.randn(n, k, generator=g) / k ** 0.5)
        unq[f"{name}.bias"] = bf16(torch.randn(n, generator=g) * 0.1)
    truth.update(unq)
    return truth, blocks, unq


def write_single_file(path, params, blocks, unq):
    meta = {"config": json.dumps(diffusers_config(params)), "model_class": "NunchakuFluxTransformer2dModel",
            "comfy_config": json.dumps({"model_class": "Flux" if params.guidance_embed else "FluxSchnell"}),
            "quantization_config": json.dumps({"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype": None,
                                               "group_size": 64}, "activation": {"dtype": "int4", "scale_dtype": None,
                                               "group_size": 64}, "rank": 32})}
    save_file({**blocks, **unq}, str(path), metadata=meta)


def write_folder(folder, params, blocks, unq):
    folder.mkdir()
    save_file(blocks, str(folder / "transformer_blocks.safetensors"))
    save_file(unq, str(folder / "unquantized_layers.safetensors"))
    (folder / "config.json").write_text(json.dumps(diffusers_config(params)))


# ---------------------------------------------------------------------------------------------------------
# Dense equivalent (§4.3) and the documented W4A4 forward (§4.1), evaluated independently


def dense_w4a4(L, unsigned):
    rq = L["codes"].double() * L["wscales"].double().repeat_interleave(64, dim=1)
    r_s = rq / L["smooth"].double()[None, :]
    w = r_s + L["up"].double() @ L["down"].double()
    b = L["bias"].double() + (SHIFT * r_s.sum(1) if unsigned else 0)
    return w, b


def dense_w4a16(L):
    expand = lambda t: t.double().repeat_interleave(64, dim=1)  # noqa: E731
    w = L["codes"].double() * expand(L["wscales"]) + expand(L["wzeros"])
    return w, L["bias_bfl"].double()


def documented_w4a4_forward(x: torch.Tensor, L, unsigned: bool) -> torch.Tensor:
    """§4.1 in numpy: quantize (x+s)/smooth per token and 64-group (fp32, np.rint = half to even), then float64."""
    xh = ((x.numpy().astype(np.float32) + np.float32(SHIFT if unsigned else 0))
          / L["smooth"].float().numpy()).reshape(x.shape[0], -1, 64)
    qmax, lo, hi = (15, 0, 15) if unsigned else (7, -8, 7)
    scale = np.abs(xh).max(-1, keepdims=True) / np.float32(qmax)
    q = np.clip(np.rint(xh / np.where(scale == 0, 1, scale)), lo, hi)
    c = L["codes"].numpy().astype(np.float64).reshape(L["codes"].shape[0], -1, 64)
    dots = np.einsum("mgk,ngk->mng", q.astype(np.float64), c)
    y = (dots * scale.astype(np.float64)[:, None, :, 0] * L["wscales"].double().numpy()[None]).sum(-1)
    y += (x.double().numpy() @ L["down"].double().numpy().T) @ L["up"].double().numpy().T
    return torch.from_numpy(y + L["bias"].double().numpy())


def dense_flux(params: FluxParams, truth) -> Flux:
    sd = {}
    for i in range(params.depth):
        pre, ours = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for name, (target, unsigned) in nk.DOUBLE_W4A4.items():
            sd[f"{ours}.{target}.weight"], sd[f"{ours}.{target}.bias"] = dense_w4a4(truth[f"{pre}.{name}"], unsigned)
        for name, target in (("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin")):
            sd[f"{ours}.{target}.weight"], sd[f"{ours}.{target}.bias"] = dense_w4a16(truth[f"{pre}.{name}"])
        for name, target in nk.DOUBLE_NORMS.items():
            sd[f"{ours}.{target}"] = truth[f"{pre}.{name}"]
    for i in range(params.depth_single_blocks):
        pre, ours = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        wq, bq = dense_w4a4(truth[f"{pre}.qkv_proj"], False)
        wm, bm = dense_w4a4(truth[f"{pre}.mlp_fc1"], False)
        sd[f"{ours}.linear1.weight"], sd[f"{ours}.linear1.bias"] = torch.cat((wq, wm)), torch.cat((bq, bm))
        wo, bo = dense_w4a4(truth[f"{pre}.out_proj"], False)
        w2, b2 = dense_w4a4(truth[f"{pre}.mlp_fc2"], True)
        sd[f"{ours}.linear2.weight"], sd[f"{ours}.linear2.bias"] = torch.cat((wo, w2), dim=1), bo + b2
        w, b = dense_w4a16(truth[f"{pre}.norm.linear"])
        sd[f"{ours}.modulation.lin.weight"], sd[f"{ours}.modulation.lin.bias"] = w, b
        for name, target in nk.SINGLE_NORMS.items():
            sd[f"{ours}.{target}"] = truth[f"{pre}.{name}"]
    for dname, bname in nk.UNQUANTIZED.items():
        for field in ("weight", "bias"):
            if f"{dname}.{field}" in truth:
                sd[f"{bname}.{field}"] = truth[f"{dname}.{field}"]
    sc, sh = sd["final_layer.adaLN_modulation.1.weight"].chunk(2)  # diffusers [scale; shift] -> BFL [shift; scale]
    sd["final_layer.adaLN_modulation.1.weight"] = torch.cat((sh, sc))
    sc, sh = sd["final_layer.adaLN_modulation.1.bias"].chunk(2)
    sd["final_layer.adaLN_modulation.1.bias"] = torch.cat((sh, sc))
    model = Flux(params)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval()


def inputs(params, seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    h = w = 4
    img_ids = torch.zeros(batch, h * w, 3)
    img_ids[..., 1] = torch.arange(h).repeat_interleave(w)
    img_ids[..., 2] = torch.arange(w).repeat(h)
    kw = dict(img=torch.randn(batch, h * w, params.in_channels, generator=g), img_ids=img_ids,
              txt=torch.randn(batch, 8, params.context_in_dim, generator=g), txt_ids=torch.zeros(batch, 8, 3),
              timesteps=torch.full((batch,), 0.6), y=torch.randn(batch, params.vec_in_dim, generator=g))
    if params.guidance_embed:
        kw["guidance"] = torch.full((batch,), 3.5)
    return kw


# ---------------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def dev_checkpoint(tmp_path_factory):
    params = tiny_params(guidance=True)
    truth, blocks, unq = build_truth(params)
    path = tmp_path_factory.mktemp("nk") / "svdq-int4_r32-flux.1-tiny.safetensors"
    write_single_file(path, params, blocks, unq)
    return params, truth, path


def test_inverse_permutations_on_odd_shapes():
    g = torch.Generator().manual_seed(3)
    n, k, r = 256, 192, 48
    codes = torch.randint(-8, 8, (n, k), generator=g).to(torch.int8)
    assert torch.equal(nk.unpack_w4a4_qweight(pack_w4a4_qweight(codes.numpy().astype(np.int64)), n, k), codes)
    s = torch.randn(n, k // 64, generator=g)
    assert torch.equal(nk.unpack_w4a4_wscales(pack_w4a4_wscales(s), n, k // 64), s)
    v = torch.randn(n, generator=g)
    assert torch.equal(nk._unpermute_128(pack_vec128(v), n), v)
    down, up = torch.randn(r, k, generator=g), torch.randn(n, r, generator=g)
    assert torch.equal(nk.unpack_lora_down(pack_lora_down(down), k, r), down)
    assert torch.equal(nk.unpack_lora_up(pack_lora_up(up), n, r), up)
    u = torch.randint(0, 16, (6 * 64, k), generator=g).to(torch.int8)
    assert torch.equal(nk.unpack_w4a16_qweight(pack_w4a16_qweight(u.numpy().astype(np.int64), 6), 6 * 64, k, 6), u)
    # the permutations are not identities, so the checks above are not vacuous
    assert not torch.equal(pack_w4a4_wscales(s).reshape(-1), s.T.reshape(-1))
    assert not torch.equal(pack_vec128(v), v)


def test_detection(dev_checkpoint, tmp_path):
    params, truth, path = dev_checkpoint
    assert nk.is_nunchaku_checkpoint(path)
    other = tmp_path / "plain.safetensors"
    save_file({"img_in.weight": torch.zeros(2, 2)}, str(other))
    assert not nk.is_nunchaku_checkpoint(other)
    assert not nk.is_nunchaku_checkpoint(tmp_path / "missing.safetensors")


def test_import_recovers_every_tensor_exactly(dev_checkpoint):
    params, truth, path = dev_checkpoint
    model = nk.load_nunchaku_transformer(path)

    def check_w4a4(mod: W4A4Linear, L, unsigned, rows=slice(None), ranks=slice(None)):
        assert torch.equal(ops.unpack_int4(mod.qweight)[rows], L["codes"])
        assert torch.equal(mod.wscales[rows], L["wscales"])
        assert torch.equal(mod.smooth, L["smooth"].float())
        assert torch.equal(mod.lora_down[ranks], L["down"])
        assert torch.equal(mod.lora_up[rows, ranks], L["up"])
        assert torch.equal(mod.bias[rows], L["bias"])
        assert mod.act_unsigned == unsigned and mod.act_shift == (SHIFT if unsigned else 0.0)

    def check_w4a16(mod: W4A16Linear, L):
        assert mod.zero_point
        assert torch.equal(ops.unpack_int4(mod.qweight, signed=False), L["codes"])
        assert torch.equal(mod.wscales, L["wscales"]) and torch.equal(mod.wzeros, L["wzeros"])
        assert torch.equal(mod.bias.float(), L["bias_bfl"])  # the folded +1 is removed again
        scale_rows = slice(mod.out_features // (6 if mod.out_features == 6 * D else 3), None)
        assert not torch.equal(mod.bias.float()[scale_rows], bf16(L["bias"] + 1).float()[scale_rows])

    for i in range(params.depth):
        blk, pre = model.double_blocks[i], f"transformer_blocks.{i}"
        for name, (target, unsigned) in nk.DOUBLE_W4A4.items():
            check_w4a4(blk.get_submodule(target), truth[f"{pre}.{name}"], unsigned)
        check_w4a16(blk.img_mod.lin, truth[f"{pre}.norm1.linear"])
        check_w4a16(blk.txt_mod.lin, truth[f"{pre}.norm1_context.linear"])
        assert torch.equal(blk.txt_attn.norm.key_norm.scale, truth[f"{pre}.norm_added_k.weight"])
    for i in range(params.depth_single_blocks):
        blk, pre = model.single_blocks[i], f"single_transformer_blocks.{i}"
        qkv, fc1 = truth[f"{pre}.qkv_proj"], truth[f"{pre}.mlp_fc1"]
        rq = qkv["down"].shape[0]
        assert isinstance(blk.linear1, W4A4Linear)  # shared smooth -> one merged layer
        check_w4a4(blk.linear1, qkv, False, rows=slice(0, 3 * D), ranks=slice(0, rq))
        check_w4a4(blk.linear1, fc1, False, rows=slice(3 * D, None), ranks=slice(rq, None))
        assert not blk.linear1.lora_up[: 3 * D, rq:].any() and not blk.linear1.lora_up[3 * D:, :rq].any()
        assert isinstance(blk.linear2, SplitInputLinear)
        check_w4a4(blk.linear2.parts[0], truth[f"{pre}.out_proj"], False)
        check_w4a4(blk.linear2.parts[1], truth[f"{pre}.mlp_fc2"], True)
        check_w4a16(blk.modulation.lin, truth[f"{pre}.norm.linear"])
    sc, sh = truth["norm_out.linear.weight"].chunk(2)
    assert torch.equal(model.final_layer.adaLN_modulation[1].weight, torch.cat((sh, sc)))
    assert torch.equal(model.img_in.weight, truth["x_embedder.weight"])
    assert torch.equal(model.guidance_in.out_layer.bias, truth["time_text_embed.guidance_embedder.linear_2.bias"])


@pytest.mark.parametrize("unsigned_layer", [False, True])
def test_layer_forward_matches_documented_semantics(dev_checkpoint, unsigned_layer):
    params, truth, path = dev_checkpoint
    model = nk.load_nunchaku_transformer(path, dtype=torch.float32)
    name, target = ("mlp_context_fc2", "txt_mlp.2") if unsigned_layer else ("qkv_proj", "img_attn.qkv")
    L = truth[f"transformer_blocks.1.{name}"]
    g = torch.Generator().manual_seed(5)
    k = L["codes"].shape[1]
    x = torch.randn(7, k, generator=g)
    if unsigned_layer:  # a post-GELU input
        x = torch.nn.functional.gelu(3 * x, approximate="tanh")
    x[0, :64] = 0  # one all-zero group
    y = model.double_blocks[1].get_submodule(target)(x).double()
    ref = documented_w4a4_forward(x, L, unsigned_layer)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_split_linear2_forward(dev_checkpoint):
    params, truth, path = dev_checkpoint
    model = nk.load_nunchaku_transformer(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    attn = torch.randn(5, D, generator=g)
    mlp = torch.nn.functional.gelu(2 * torch.randn(5, F, generator=g), approximate="tanh")
    y = model.single_blocks[0].linear2(torch.cat((attn, mlp), dim=1)).double()
    ref = documented_w4a4_forward(attn, truth["single_transformer_blocks.0.out_proj"], False) + \
        documented_w4a4_forward(mlp, truth["single_transformer_blocks.0.mlp_fc2"], True)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_whole_model_equals_dense_equivalent(dev_checkpoint):
    """act_quant=False leaves only the weights' 4-bit rounding, which the dense model (§4.3) shares exactly:
    checks every mapping (AdaLN de-interleave and +1, final-layer swap, split/merged linears, shift bias)."""
    params, truth, path = dev_checkpoint
    model = nk.load_nunchaku_transformer(path, dtype=torch.float32, act_quant=False)
    dense = dense_flux(params, truth)
    kw = inputs(params)
    with torch.no_grad():
        out, ref = model(**kw), dense(**kw)
        err = (out - ref).norm() / ref.norm()
        assert err < 1e-5, err
        # with 4-bit activations the output moves, but stays close to the dense model
        model_q = nk.load_nunchaku_transformer(path, dtype=torch.float32)
        err_q = (model_q(**kw) - ref).norm() / ref.norm()
        assert 1e-4 < err_q < 0.3, err_q


def test_legacy_folder_equals_single_file(dev_checkpoint, tmp_path):
    params = tiny_params(guidance=False)
    truth, blocks, unq = build_truth(params, seed=2)
    folder = tmp_path / "svdq-int4-flux.1-schnell"
    write_folder(folder, params, blocks, unq)
    single = tmp_path / "single.safetensors"
    write_single_file(single, params, blocks, unq)
    assert nk.is_nunchaku_checkpoint(folder)
    a, b = nk.load_nunchaku_transformer(folder), nk.load_nunchaku_transformer(single)
    assert not hasattr(a, "guidance_in") and a.params == b.params
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_params_inferred_without_config(dev_checkpoint, tmp_path):
    params, truth, path = dev_checkpoint
    from safetensors.torch import load_file
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))  # no metadata at all
    assert nk.load_nunchaku_transformer(bare).params == params


def test_fp4_and_foreign_files_rejected(dev_checkpoint, tmp_path):
    params, truth, path = dev_checkpoint
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    tensors["transformer_blocks.0.qkv_proj.wscales"] = tensors["transformer_blocks.0.qkv_proj.wscales"].to(
        torch.float8_e4m3fn)
    fp4 = tmp_path / "svdq-fp4.safetensors"
    save_file(tensors, str(fp4))
    with pytest.raises(ValueError, match="NVFP4"):
        nk.load_nunchaku_transformer(fp4)
    meta_fp4 = tmp_path / "svdq-fp4-meta.safetensors"
    save_file(load_file(str(path)), str(meta_fp4),
              metadata={"quantization_config": json.dumps({"weight": {"dtype": "fp4_e2m1_all"}})})
    with pytest.raises(ValueError, match="NVFP4"):
        nk.load_nunchaku_transformer(meta_fp4)
    with pytest.raises(FileNotFoundError):
        nk.load_nunchaku_transformer(tmp_path / "nope.safetensors")
    extra = load_file(str(path))
    extra["transformer_blocks.0.mystery.weight"] = torch.zeros(3)
    odd = tmp_path / "odd.safetensors"
    save_file(extra, str(odd))
    with pytest.raises(ValueError, match="mystery"):
        nk.load_nunchaku_transformer(odd)


def test_import_saves_in_our_format(dev_checkpoint, tmp_path):
    from nunchaku_lite.quant.format import load_quantized_transformer, save_quantized
    params, truth, path = dev_checkpoint
    model = nk.load_nunchaku_transformer(path)
    out = save_quantized(model, tmp_path / "ours.safetensors")
    back = load_quantized_transformer(out)
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    assert isinstance(back.single_blocks[0].linear2, SplitInputLinear)
    kw = inputs(params)
    with torch.no_grad():
        assert torch.equal(model(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}),
                           back(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}))


def test_unshared_smooth_falls_back_to_concat(tmp_path):
    params = tiny_params(guidance=False)
    truth, blocks, unq = build_truth(params, seed=4)
    key = "single_transformer_blocks.1.mlp_fc1.smooth"
    blocks[key] = pack_vec128(bf16(torch.rand(D) + 0.5))
    path = tmp_path / "unshared.safetensors"
    write_single_file(path, params, blocks, unq)
    model = nk.load_nunchaku_transformer(path)
    assert isinstance(model.single_blocks[1].linear1, ConcatOutputLinear)
    assert isinstance(model.single_blocks[0].linear1, W4A4Linear)


def test_generic_loader_detects_nunchaku_files(dev_checkpoint, tmp_path):
    from nunchaku_lite.loading import load_transformer
    params, truth, path = dev_checkpoint
    model = load_transformer(path, dtype=torch.float32, act_quant=False)
    assert model.quant_config["method"] == "nunchaku-import"
    assert isinstance(model.double_blocks[0].img_mlp[2], W4A4Linear) and model.double_blocks[0].img_mlp[2].act_unsigned
    assert not model.double_blocks[0].img_mlp[2].act_quant


def test_saved_import_metadata(dev_checkpoint, tmp_path):
    from nunchaku_lite.quant.format import read_metadata, save_quantized
    params, truth, path = dev_checkpoint
    meta = read_metadata(save_quantized(nk.load_nunchaku_transformer(path), tmp_path / "m.safetensors"))
    assert meta["method"] == "nunchaku-import" and meta["base_model"] == "dev"
    assert meta["rank"] == str(truth["transformer_blocks.0.qkv_proj"]["down"].shape[0])
    assert json.loads(meta["precision"])["double_blocks.0.img_mod.lin"] == "w4a16"


def test_w4a16_zero_padded_groups_are_accepted(tmp_path):
    """DeepCompressor's tinychat helper may pad the W4A16 group rows to a multiple of 16 with zeros (§3.6)."""
    params = tiny_params(guidance=False)
    truth, blocks, unq = build_truth(params, seed=7)
    plain = tmp_path / "plain.safetensors"
    write_single_file(plain, params, blocks, unq)
    for field in ("wscales", "wzeros"):
        key = f"transformer_blocks.0.norm1.linear.{field}"
        blocks[key] = torch.cat((blocks[key], torch.zeros(14, blocks[key].shape[1], dtype=blocks[key].dtype)))
    padded = tmp_path / "padded.safetensors"
    write_single_file(padded, params, blocks, unq)
    a, b = nk.load_nunchaku_transformer(plain), nk.load_nunchaku_transformer(padded)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    blocks["transformer_blocks.0.norm1.linear.wscales"][-1, 0] = 1.0
    write_single_file(padded, params, blocks, unq)
    with pytest.raises(ValueError, match="non-zero padding"):
        nk.load_nunchaku_transformer(padded)

# compute-sanitizer target: the power-of-two quantization (token-scale kernel + quantize kernel), every layout,
# plain and LayerNorm-fused, odd M (tile tails, padding tiles), ranks 0..128, shared tiles (split=5).
import os
import torch
from nunchaku_lite import native
torch.manual_seed(0)
for split in ("", "5"):
    os.environ["NUNCHAKU_LITE_QUANT_SPLIT"] = split
    for m, k, rank in [(300, 1024, 32), (77, 640, 0), (130, 512, 64), (45, 256, 128), (1, 3072, 32)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        down = torch.randn(rank, k, device="cuda", dtype=torch.bfloat16) if rank else None
        sh = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) * 0.1
        sm = torch.rand(k, device="cuda") + 0.5
        for layout in ("packed", "fp8_tiles", "s8_tiles"):
            for uns in (False, True):
                shift = 0.171875 if uns else 0.0
                native.quantize_act(x, sm, down, uns, shift, layout=layout, pow2=True)
                native.layernorm_quantize_act(x, sh, sh, None, sm, down, uns, shift, layout=layout, pow2=True)
            native.layernorm_quantize_act(x, sh, sh, None, sm, down, layout=layout, pow2=layout == "s8_tiles",
                                          return_y=True)
torch.cuda.synchronize()
print("memcheck target ok")

"""GPU probe behind the UNet layout choices (H200 log: eval/logs/h200/probe_diffusion_unet.log).

GroupNorm and conv3d cost per memory layout, then bench_diffusion variants with a CUDA-time
profile of one 3D step. Usage: python eval/probe_unet_layout.py medgen,medgen:cl,monai [sample]
"""
import sys, time
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_diffusion as B

dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
print(torch.__version__, torch.cuda.get_device_name(), flush=True)


def bench(f, n=20):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        f()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


# 1. GroupNorm + conv on layouts
x = torch.randn(16, 64, 32, 32, 32, device=dev, dtype=torch.bfloat16)
xl = x.contiguous(memory_format=torch.channels_last_3d)
w = torch.ones(64, device=dev, dtype=torch.bfloat16)
b = torch.zeros(64, device=dev, dtype=torch.bfloat16)
y = F.group_norm(xl, 32, w, b)
print("GN out channels_last?", y.is_contiguous(memory_format=torch.channels_last_3d))
print("GN bf16 cf ms", bench(lambda: F.group_norm(x, 32, w, b)), "cl ms", bench(lambda: F.group_norm(xl, 32, w, b)))
with torch.autocast("cuda", torch.bfloat16):
    print("GN autocast(fp32) cf ms", bench(lambda: F.group_norm(x, 32, w.float(), b.float())))
conv = torch.nn.Conv3d(64, 64, 3, padding=1).to(dev)
convl = torch.nn.Conv3d(64, 64, 3, padding=1).to(dev).to(memory_format=torch.channels_last_3d)
with torch.autocast("cuda", torch.bfloat16):
    tc = bench(lambda: conv(x)); tl = bench(lambda: convl(xl))
fl = 2 * 27 * 64 * 64 * 16 * 32**3 / 1e12
print(f"conv3d 64->64 fwd cf {tc:.3f} ms ({fl/tc*1e3:.0f} TF/s) cl {tl:.3f} ms ({fl/tl*1e3:.0f} TF/s)", flush=True)

# 2. training variants, 3D plan, no sampling
plan = B.PLANS["cuda"][3]
res = {}
for v in sys.argv[1].split(","):
    m, comp = B.build(v, 3, plan, dev)
    t0 = time.time()
    r = B.bench_train(m, comp, plan, dev, torch.bfloat16, 20, 5)
    res[v] = r
    print(f"3D {v}: {r['samples_per_s']:.1f} samples/s, {r['tflops']:.0f} TF/s, {r['peak_mem_gib']:.2f} GiB, warm {r['warmup_s']:.1f}s", flush=True)
    if v == "medgen" or v == "monai":
        from torch.profiler import profile, ProfilerActivity
        loss_fn = B.DiffusionLoss(B.NoiseSchedule().alphas_cumprod().to(dev))
        xx = torch.randn(16, *plan["latent"], device=dev)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                with torch.autocast("cuda", torch.bfloat16):
                    loss = loss_fn(m, xx)
                loss.backward()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70), flush=True)
    if "sample" in sys.argv[2:]:
        s = B.bench_sample(m, comp, plan, dev, torch.bfloat16, 100)
        print(f"3D {v} sampling: {s}", flush=True)
    del m
    torch.cuda.empty_cache()
plan2 = B.PLANS["cuda"][2]
for v in ["medgen", "medgen:cf", "monai"]:
    m, comp = B.build(v, 2, plan2, dev)
    r = B.bench_train(m, comp, plan2, dev, torch.bfloat16, 20, 5)
    print(f"2D {v}: {r['samples_per_s']:.1f} samples/s, {r['tflops']:.0f} TF/s, {r['peak_mem_gib']:.2f} GiB", flush=True)
    del m

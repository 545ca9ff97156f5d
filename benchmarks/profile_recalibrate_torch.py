"""Where foldkit.torch.recalibrate's time goes on a GPU (torch.profiler), against plain inference.

    python benchmarks/profile_recalibrate_torch.py [--model resnet18] [--batch 32] [--samples 128]
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from foldkit.torch import recalibrate  # noqa: E402
from models import resnet  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="resnet18")
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--samples", type=int, default=128)
a = ap.parse_args()
torch.backends.cudnn.benchmark = True
model = getattr(resnet, a.model)().cuda()
g = torch.Generator().manual_seed(0)
batches = [torch.randn(a.batch, 3, 224, 224, generator=g).cuda() for _ in range(a.samples // a.batch)]
for _ in range(2):
    recalibrate(model, batches)
    with torch.no_grad():
        model.eval()
        for b in batches:
            model(b)
torch.cuda.synchronize()
from torch.profiler import ProfilerActivity, profile  # noqa: E402

for name, fn in (("plain", lambda: [model.eval(), *[model(b) for b in batches]]), ("recalibrate", lambda: recalibrate(model, batches))):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
    print(f"== {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10))

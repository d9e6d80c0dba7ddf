"""Training-step speed: fp32 vs bf16 autocast, contiguous vs channels_last (batch 8 of 256x256 crops).

    .venv/bin/python benchmarks/bench_train_step.py [--steps N]

Also prints whether the CPU has bf16 units (AMX / AVX512-BF16), which `--precision auto` uses to choose.
"""
from __future__ import annotations

import argparse
import time

import torch

from nucleiseg.network import UNet
from nucleiseg.targets import loss
from nucleiseg.training import resolve_precision


def step_time(precision: str, channels_last: bool, steps: int = 8) -> float:
    torch.manual_seed(0)
    net = UNet(3).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.rand(8, 3, 256, 256).contiguous(memory_format=fmt)
    y = torch.randint(0, 3, (8, 1, 256, 256)).float()
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = net(x)
        value = loss(out, y, "contour")
        value.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:  # skip warm-up steps
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setting (after 2 warm-up steps)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, AMX {torch.cpu._is_amx_tile_supported()}, "
          f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}: --precision auto trains with "
          f"{resolve_precision('auto', 'cpu')}")
    base = None
    for precision in ("fp32", "bf16"):
        for cl in (False, True):
            t = step_time(precision, cl, args.steps)
            base = base or t
            print(f"{precision:>4} channels_last={cl!s:<5}  {t * 1000:7.0f} ms/step  {8 / t:5.1f} crops/s  x{base / t:.2f}")

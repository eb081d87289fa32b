"""Training-step time and peak memory of Perceiver IO, HiP-16 and HiP-256 vs image size.

    python -m benchmarks.model_speed [--sizes 64 128 224 384] [--mem-cap-gb 16] [--steps 3]

Full-width presets, batch 1, fp32, on this machine's CPU (or --device cuda). Each
configuration runs in its own subprocess so peak memory (VmHWM) is per configuration; a
process that grows past --mem-cap-gb is killed and reported as "> cap" instead of crashing
the benchmark. The table gives seconds per optimizer step (forward + backward + AdamW),
peak RSS, and Perceiver IO's step time divided by the model's (the paper's "x faster").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = ("perceiver_io", "hip16", "hip256")
TASKS = ("classify", "mae")


def run_one(name: str, task: str, size: int, steps: int, device: str) -> dict:
    """Child process body: time `steps` training steps after one warm-up step."""
    import torch

    from models import create_model

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    inputs = {"image": (size * size, 3)}
    model = create_model(name, inputs=inputs, task=task, num_classes=1000).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = {"image": torch.randn(1, size * size, 3, device=device)}
    y = torch.zeros(1, dtype=torch.long, device=device)

    def step() -> None:
        out = model(x)
        loss = out[0] if task == "mae" else torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, kernels, lazy state
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"step_s": (time.perf_counter() - start) / steps, "peak_gb": _vm_hwm_gb()}


def _vm_hwm_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def _rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024**2
    except FileNotFoundError:
        pass
    return 0.0


def measure(name: str, task: str, size: int, steps: int, cap_gb: float, device: str,
            timeout_s: float) -> dict:
    """Run one configuration in a subprocess, killing it above the memory cap."""
    cmd = [sys.executable, "-m", "benchmarks.model_speed", "--child",
           json.dumps({"name": name, "task": task, "size": size, "steps": steps,
                       "device": device})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, peak = time.monotonic(), 0.0
    while proc.poll() is None:
        peak = max(peak, _rss_gb(proc.pid))
        if peak > cap_gb:
            proc.kill()
            proc.wait()
            return {"status": "> cap", "peak_gb": peak}
        if time.monotonic() - start > timeout_s:
            proc.kill()
            proc.wait()
            return {"status": "timeout", "peak_gb": peak}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        tail = (err.strip().splitlines() or ["?"])[-1]
        return {"status": f"error: {tail[:60]}", "peak_gb": peak}
    return {"status": "ok", **json.loads(out.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224, 384])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--mem-cap-gb", type=float, default=16.0)
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_one(**spec)))
        return 0

    rows = []
    print(f"device={args.device} batch=1 fp32 steps={args.steps} cap={args.mem_cap_gb} GB",
          flush=True)
    for task in args.tasks:
        for size in args.sizes:
            base = None
            for name in args.models:
                r = measure(name, task, size, args.steps, args.mem_cap_gb, args.device,
                            args.timeout_s)
                if name == "perceiver_io" and r["status"] == "ok":
                    base = r["step_s"]
                ratio = (f"{base / r['step_s']:.1f}x" if base and r["status"] == "ok" else "-")
                step = f"{r['step_s']:.3f}" if r["status"] == "ok" else r["status"]
                rows.append((task, size, name, step, f"{r['peak_gb']:.2f}", ratio))
                print(f"  {task:8s} {size:4d} {name:13s} {step:>10s} s "
                      f"{r['peak_gb']:6.2f} GB  {ratio}", flush=True)
    print("\n| task | image | model | step (s) | peak RSS (GB) | vs perceiver_io |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A PyTorch load for the real-GPU comparison: matrix products on one GPU for
``duty`` of every 100 ms, idle for the rest, until killed."""

import sys
import time

import torch

duty = float(sys.argv[1])
size = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
a = torch.randn(size, size, device="cuda")
b = torch.randn(size, size, device="cuda")
torch.cuda.synchronize()
print("ready", flush=True)
while True:
    start = time.monotonic()
    while time.monotonic() - start < 0.1 * duty:
        (a @ b).sum()
        torch.cuda.synchronize()
    rest = 0.1 - (time.monotonic() - start)
    if rest > 0:
        time.sleep(rest)

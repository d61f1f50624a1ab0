"""How long the CUDA driver takes to allocate and free a fresh block of device memory: the cost a
swap pays for its weights arena and KV cache (run on a GPU machine)."""

import time

import torch

torch.cuda.init()
torch.empty(1, device="cuda")
for gib in (0.25, 1, 4, 8, 16):
    torch.cuda.synchronize()
    started = time.perf_counter()
    block = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    allocated = time.perf_counter()
    del block
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    freed = time.perf_counter()
    print(
        f"{gib:5} GiB: cudaMalloc {1e3 * (allocated - started):7.2f} ms, "
        f"cudaFree {1e3 * (freed - allocated):7.2f} ms"
    )

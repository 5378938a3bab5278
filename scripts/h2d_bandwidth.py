"""Host→GPU copy bandwidth with torch, pinned and pageable, for a buffer of N bytes (default: one
GLM-4.7-Flash expert materialised as f32, 37.7 MB). Prints one JSON line."""
import json
import sys
import time

import torch

n = int(sys.argv[1]) if len(sys.argv) > 1 else 9437184 * 4
res = {"bytes": n, "device": torch.cuda.get_device_name(0)}
dst = torch.empty(n, dtype=torch.uint8, device="cuda")
for kind, pin in [("pageable", False), ("pinned", True)]:
    src = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
    for _ in range(3):
        dst.copy_(src, non_blocking=pin)
    torch.cuda.synchronize()
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=pin)
    torch.cuda.synchronize()
    res[f"{kind}_GBps"] = n * reps / (time.perf_counter() - t) / 1e9
print(json.dumps(res))

"""Times libCacheSim's own (C) simulator on an oracleGeneral trace written by the `simulator`
benchmark (benches/simulator.rs), one global cache of unit-size objects, and prints one JSON line
per policy: {"policy", "accesses", "seconds", "hits"}. Needs `pip install libcachesim`.

Usage: python3 benches/libcachesim_compare.py TRACE.oracleGeneral CACHE_SIZE
"""
import json
import sys
import time

import libcachesim as lcs

path, size = sys.argv[1], int(sys.argv[2])
for name, cls in [("lru", lcs.LRU), ("lfu", lcs.LFU), ("belady", lcs.Belady)]:
    reader = lcs.TraceReader(trace=path, trace_type=lcs.TraceType.ORACLE_GENERAL_TRACE)
    cache = cls(cache_size=size)
    t = time.perf_counter()
    req_miss_ratio, _ = cache.process_trace(reader)
    dt = time.perf_counter() - t
    n = reader.get_num_of_req() if hasattr(reader, "get_num_of_req") else None
    print(json.dumps({"policy": name, "seconds": dt, "miss_ratio": req_miss_ratio, "accesses": n, "libcachesim": lcs.__version__ if hasattr(lcs, "__version__") else "?"}))

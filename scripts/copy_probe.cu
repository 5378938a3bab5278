// Copy-rate probe (docs/performance.md, issue 13, "Misses copied by the step's own gates"):
// one GLM-4.7-Flash MLX 4-bit expert's nine parts (three 1.57 MB word blocks, six 98 KB scale
// and bias blocks, laid out as MLX's stacked switch_mlp tensors, 64 experts) copied host→GPU
// 200 times, from a file's page-cache pages registered with the driver (mapped, read-only) and
// from a cudaHostAlloc buffer, by the copy engine (nine copies, or one copy of 5.31 contiguous
// bytes) and by a kernel whose threads read the host memory (every block walks every part).
// "sync 1": one expert at a time (the miss path's case), "sync 0": back to back.
// Build on the GPU machine (or here, with ../shared/tools/cuda-env.sh):
//   nvcc -O2 -arch=sm_90 -o copy_probe scripts/copy_probe.cu
// Run: ./copy_probe FILE [MISALIGN] [1: FILE exists, read it instead of writing it];
// ONLY_REG=1 skips the pinned half.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <chrono>
#include <algorithm>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <sys/stat.h>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)

struct Seg { const char* src; char* dst; unsigned long long len; };

__global__ void copy_segs(const Seg* segs, int n) {
  // every block walks every segment, grid-stride over 16-byte words (8-byte if misaligned)
  for (int s = 0; s < n; s++) {
    Seg g = segs[s];
    bool a16 = ((((unsigned long long)g.src) | ((unsigned long long)g.dst) | g.len) & 15) == 0;
    size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    if (a16) {
      const uint4* src = (const uint4*)g.src; uint4* dst = (uint4*)g.dst; size_t w = g.len / 16;
      size_t i = tid;
      for (; i + 3 * stride < w; i += 4 * stride) {
        uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
        dst[i] = a; dst[i + stride] = b; dst[i + 2 * stride] = c; dst[i + 3 * stride] = d;
      }
      for (; i < w; i += stride) dst[i] = src[i];
    } else {
      const uint2* src = (const uint2*)g.src; uint2* dst = (uint2*)g.dst; size_t w = g.len / 8;
      size_t i = tid;
      for (; i + 3 * stride < w; i += 4 * stride) {
        uint2 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
        dst[i] = a; dst[i + stride] = b; dst[i + 2 * stride] = c; dst[i + 3 * stride] = d;
      }
      for (; i < w; i += stride) dst[i] = src[i];
    }
  }
}

static const size_t E = 64;
static const size_t W = 1572864, S = 98304;
static const size_t sizes[9] = {W, S, S, W, S, S, W, S, S};

int main(int argc, char** argv) {
  const char* path = argc > 1 ? argv[1] : "/tmp/probe.bin";
  size_t off0 = argc > 2 ? atol(argv[2]) : 0; // misalignment of the data start
  size_t per = 0; for (int t = 0; t < 9; t++) per += sizes[t];
  size_t total = off0 + per * E;
  bool existing = argc > 3 && atoi(argv[3]) == 1;
  int fd;
  if (existing) {
    fd = open(path, O_RDONLY);
    struct stat st; fstat(fd, &st);
    if ((size_t)st.st_size < total) { printf("file too small\n"); return 1; }
    total = st.st_size < (off_t)(2 * total) ? total : total; // use the first `total` bytes
    // fault pages in (read them) so they are in the page cache
    std::vector<char> b(1 << 20); for (size_t w = 0; w < total; w += b.size()) { if (pread(fd, b.data(), std::min(b.size(), total - w), w) < 0) return 1; }
  } else {
  // file: write it so its pages are in the page cache
  fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
  std::vector<char> buf(1 << 20); for (size_t i = 0; i < buf.size(); i++) buf[i] = (char)(i * 131 + 7);
  for (size_t w = 0; w < total; w += buf.size()) { size_t n = std::min(buf.size(), total - w); if (write(fd, buf.data(), n) != (ssize_t)n) { printf("write\n"); return 1; } }
  fsync(fd);
  }
  char* map = (char*)mmap(nullptr, total, PROT_READ, MAP_SHARED, fd, 0);
  size_t page = 4096, regn = (total + page - 1) / page * page;
  CK(cudaSetDevice(0));
  cudaError_t re = cudaHostRegister(map, regn, cudaHostRegisterMapped | cudaHostRegisterReadOnly);
  if (re != cudaSuccess) { printf("register: %s\n", cudaGetErrorString(re)); return 1; }
  char* dmap; CK(cudaHostGetDevicePointer((void**)&dmap, map, 0));
  printf("map %p devptr %p (same=%d)\n", map, dmap, map == dmap);
  // tensor bases inside the file: tensor t holds E slices of sizes[t]
  size_t base[9]; size_t o = off0; for (int t = 0; t < 9; t++) { base[t] = o; o += sizes[t] * E; }
  // pinned copy of the whole thing
  char* pin; CK(cudaHostAlloc((void**)&pin, total, cudaHostAllocMapped)); memcpy(pin, map, total);
  char* dpin; CK(cudaHostGetDevicePointer((void**)&dpin, pin, 0));
  char* dev; CK(cudaMalloc(&dev, per * 8 + 4096 * 16));
  Seg* dsegs; CK(cudaMalloc(&dsegs, sizeof(Seg) * 9 * 16));
  cudaStream_t st; CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  srand(7);
  const int N = 200; // experts per trial
  std::vector<int> order(N); for (int i = 0; i < N; i++) order[i] = rand() % E;
  auto segs_of = [&](int e, bool pinned, bool device_view, int slot) {
    std::vector<Seg> v; size_t d = 0;
    for (int t = 0; t < 9; t++) {
      const char* hb = pinned ? (device_view ? dpin : pin) : (device_view ? dmap : map);
      v.push_back({hb + base[t] + e * sizes[t], dev + slot * (per + 4096) + d, sizes[t]});
      d += (sizes[t] + 255) / 256 * 256;
    }
    return v;
  };
  auto run = [&](const char* name, int mode, bool pinned, int batch, int grid, bool sync_each) {
    // mode 0: copy engine, 9 copies; 1: copy engine, 1 contiguous copy of `per` bytes; 2: kernel
    for (int rep = 0; rep < 2; rep++) {
      double t0 = 0; float ms_total = 0;
      CK(cudaStreamSynchronize(st));
      cudaEventRecord(a, st);
      auto wall0 = std::chrono::steady_clock::now();
      for (int i = 0; i < N; i += batch) {
        std::vector<Seg> segs;
        for (int j = 0; j < batch && i + j < N; j++) {
          auto v = segs_of(order[i + j], pinned, mode == 2, j);
          segs.insert(segs.end(), v.begin(), v.end());
        }
        if (mode == 0) for (auto& s : segs) CK(cudaMemcpyAsync(s.dst, s.src, s.len, cudaMemcpyHostToDevice, st));
        else if (mode == 1) for (int j = 0; j < batch && i + j < N; j++) {
          const char* hb = pinned ? pin : map;
          CK(cudaMemcpyAsync(dev + j * (per + 4096), hb + off0 + order[i + j] * per, per, cudaMemcpyHostToDevice, st));
        } else {
          CK(cudaMemcpyAsync(dsegs, segs.data(), sizeof(Seg) * segs.size(), cudaMemcpyHostToDevice, st));
          copy_segs<<<grid, 512, 0, st>>>(dsegs, (int)segs.size());
        }
        if (sync_each) CK(cudaStreamSynchronize(st));
      }
      cudaEventRecord(b, st); CK(cudaEventSynchronize(b));
      auto wall1 = std::chrono::steady_clock::now();
      cudaEventElapsedTime(&ms_total, a, b);
      double wall = std::chrono::duration<double>(wall1 - wall0).count();
      if (rep == 1) printf("%-48s batch %2d grid %4d sync %d: events %6.2f GB/s  wall %6.2f GB/s  (%.1f us/expert wall)\n", name, batch, grid, (int)sync_each,
        per * N / (ms_total * 1e6), per * N / (wall * 1e9), wall * 1e6 / N);
      (void)t0;
    }
  };
  for (int pinned = 0; pinned < (getenv("ONLY_REG") ? 1 : 2); pinned++) {
    const char* src = pinned ? "pinned" : "registered";
    char name[128];
    snprintf(name, sizeof name, "%s: copy engine, 9 copies", src); run(name, 0, pinned, 1, 0, false); run(name, 0, pinned, 1, 0, true);
    snprintf(name, sizeof name, "%s: copy engine, 1 copy (contig)", src); run(name, 1, pinned, 1, 0, false); run(name, 1, pinned, 1, 0, true);
    for (int g : {sms, 2 * sms, 4 * sms}) {
      snprintf(name, sizeof name, "%s: SM kernel", src); run(name, 2, pinned, 1, g, false); run(name, 2, pinned, 1, g, true);
    }
    snprintf(name, sizeof name, "%s: SM kernel", src); run(name, 2, pinned, 4, 2 * sms, true);
    snprintf(name, sizeof name, "%s: copy engine, 9 copies", src); run(name, 0, pinned, 4, 0, true);
  }
  // verify kernel copy correctness once
  auto v = segs_of(5, false, true, 0);
  CK(cudaMemcpy(dsegs, v.data(), sizeof(Seg) * 9, cudaMemcpyHostToDevice));
  copy_segs<<<sms, 512>>>(dsegs, 9); CK(cudaDeviceSynchronize());
  std::vector<char> back(sizes[0]); CK(cudaMemcpy(back.data(), v[0].dst, sizes[0], cudaMemcpyDeviceToHost));
  printf("verify: %s\n", memcmp(back.data(), map + base[0] + 5 * sizes[0], sizes[0]) == 0 ? "ok" : "MISMATCH");
  return 0;
}

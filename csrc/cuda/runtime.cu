// Host helpers shared by the launchers: the device guard, the SM count cache, dtype checks.
#include <mutex>
#include <vector>

#include "common.cuh"

namespace memloc::cuda {

DeviceGuard::DeviceGuard(int device) : device_(device) {
  int count = 0;
  MEMLOC_CUDA_CHECK(cudaGetDeviceCount(&count));
  MEMLOC_REQUIRE(device >= 0 && device < count,
                 "CUDA device index " + std::to_string(device) + " out of range (" + std::to_string(count) +
                     " devices)");
  MEMLOC_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device_) MEMLOC_CUDA_CHECK(cudaSetDevice(device_));
}

DeviceGuard::~DeviceGuard() {
  // A destructor must not throw; a failure to switch back leaves the device the caller asked for.
  if (previous_ >= 0 && previous_ != device_) (void)cudaSetDevice(previous_);
}

int sm_count(int device) {
  static std::mutex mutex;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int count = 0;
    MEMLOC_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device] = count > 0 ? count : 1;
  }
  return cache[device];
}

DType checked_dtype(int code, const char* what, bool allow_float64) {
  const int max_code = allow_float64 ? static_cast<int>(DType::kFloat64) : static_cast<int>(DType::kFloat32);
  MEMLOC_REQUIRE(code >= 0 && code <= max_code,
                 std::string(what) + ": unsupported dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

}  // namespace memloc::cuda

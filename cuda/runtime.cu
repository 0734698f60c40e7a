// CUDA runtime queries used by the bindings: device count (never throws; 0 without a driver),
// pointer kinds, stream ordering, launch checks. The emulated build (RA_EMULATE) has one "device"
// whose memory is host memory.
#include "common.cuh"

namespace ringattn {
namespace gpu {

#ifdef RA_EMULATE
int device_count() { return 1; }
const char* device_error() { return ""; }
bool is_device_pointer(const void*) { return true; }
void stream_wait(void*, void*) {}
void synchronize(void*) {}
void check_launch(const char*) {}
const char* compiled_archs() { return "emulated"; }
#else

namespace {
[[noreturn]] void fail(const char* what, cudaError_t err) {
  throw std::runtime_error(std::string("ringattn CUDA: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}
// cudaGetDeviceCount fails without a driver (or with a driver too old for this runtime); keep the
// first error's text for the message the bindings raise.
std::string g_device_error;
}  // namespace

int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    g_device_error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error state of this thread
    return 0;
  }
  if (n == 0) g_device_error = "the CUDA driver reports no devices";
  return n;
}

const char* device_error() { return g_device_error.c_str(); }

bool is_device_pointer(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

void stream_wait(void* consumer, void* producer) {
  if (consumer == producer) return;
  cudaEvent_t ev;
  cudaError_t err = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
  if (err != cudaSuccess) fail("cudaEventCreate", err);
  err = cudaEventRecord(ev, static_cast<cudaStream_t>(producer));
  if (err == cudaSuccess) err = cudaStreamWaitEvent(static_cast<cudaStream_t>(consumer), ev, 0);
  cudaEventDestroy(ev);  // safe: destruction is deferred until the event completes
  if (err != cudaSuccess) fail("cudaStreamWaitEvent", err);
}

void synchronize(void* stream) {
  const cudaError_t err = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) fail("cudaStreamSynchronize", err);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail(what, err);
}

const char* compiled_archs() {
#ifdef RA_CUDA_ARCHS
  return RA_CUDA_ARCHS;
#else
  return "unknown";
#endif
}
#endif

}  // namespace gpu
}  // namespace ringattn

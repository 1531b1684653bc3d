#include "platform.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace bct {

const char* IsaName(Isa isa) {
  switch (isa) {
    case kAmx: return "amx";
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "scalar";
  }
}

namespace {

// AMX needs the OS's permission to use the tile data state: on Linux one arch_prctl
// (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) per process, asked once (thread-safe static
// initialization); without it the first tile instruction would fault, so no AMX then.
bool AmxPermitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

bool CpuHasAvx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
}

}  // namespace

Isa DetectIsa() {
  if (CpuHasAvx512()) {
    if (__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") && AmxPermitted())
      return kAmx;
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kScalar;
}

bool AmxEmulated() {
  const char* e = std::getenv("BCTONNX_AMX_EMULATE");
  return e != nullptr && std::strcmp(e, "1") == 0 && DetectIsa() == kAvx512;
}

Isa ChooseIsa(const char* request) {
  const Isa best = DetectIsa();
  if (request == nullptr || *request == '\0') return best;
  Isa cap;
  if (std::strcmp(request, "amx") == 0) {
    cap = kAmx;
  } else if (std::strcmp(request, "avx512") == 0) {
    cap = kAvx512;
  } else if (std::strcmp(request, "avx2") == 0) {
    cap = kAvx2;
  } else if (std::strcmp(request, "scalar") == 0) {
    cap = kScalar;
  } else {
    throw std::runtime_error(std::string("bctonnx: BCTONNX_ISA=") + request +
                             " is not one of amx, avx512, avx2, scalar");
  }
  if (cap == kAmx && best == kAvx512 && AmxEmulated()) return kAmx;
  return cap < best ? cap : best;
}

Isa ChooseIsa() { return ChooseIsa(std::getenv("BCTONNX_ISA")); }

bool CpuHasAvx512Vbmi() {
  static const bool ok = CpuHasAvx512() && __builtin_cpu_supports("avx512vbmi");
  return ok;
}

bool CpuHasAvx512Cd() {
  static const bool ok = CpuHasAvx512() && __builtin_cpu_supports("avx512cd");
  return ok;
}

}  // namespace bct

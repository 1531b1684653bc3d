// The one place that picks the instruction set of every kernel (as MLAS's platform.cpp).
//
// A kernel asks ChooseIsa() when a session creates it: the best instruction set this CPU (and
// its OS, for AMX) supports, capped by the environment variable BCTONNX_ISA
// (amx|avx512|avx2|scalar), so tests can compare every path on one machine. The library is
// compiled without -march: each path is a function with __attribute__((target)) or inline
// assembly, called only when its instruction set was chosen.
#pragma once

namespace bct {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

const char* IsaName(Isa isa);

// AVX-512 here means F, BW, DQ, VL and VNNI; avx2 means AVX2 + FMA; amx adds AMX-TILE/INT8 and
// the OS's permission to use the tile state.
Isa DetectIsa();

// The best supported ISA capped by `request` ("amx", "avx512", "avx2", "scalar"; null or "" =
// no cap). Throws std::runtime_error naming the variable for any other value.
Isa ChooseIsa(const char* request);

// ChooseIsa(getenv("BCTONNX_ISA")).
Isa ChooseIsa();

// Test hook: BCTONNX_AMX_EMULATE=1 with BCTONNX_ISA=amx on a CPU without AMX runs the AMX path
// with its tile instructions emulated in plain C++ (everything else of that path, the float
// steps included, is the real code). Only for tests: it is very slow.
bool AmxEmulated();

// Extra AVX-512 features some kernels use beyond the avx512 level.
bool CpuHasAvx512Vbmi();
bool CpuHasAvx512Cd();

}  // namespace bct

// The x86 SIMD intrinsics, included warning-free.
//
// GCC 12's intrinsic headers define _mm512_undefined_*() as a self-initialised variable
// (`__m512i __Y = __Y;`), which -Wall reports as "used uninitialized" wherever an intrinsic that
// uses it is inlined (GCC bug 105593, fixed in GCC 13). The diagnostics are located in the
// header, so silencing them for the header's lines alone keeps -Wall -Wextra meaningful for
// our own code.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

namespace bct {

// acc += u8(a) . s8(b) per 32-bit lane (vpdpbusd). Inline asm: GCC 12 surrounds the intrinsic
// with register copies when the accumulators live in arrays (measured ~2x slower loops).
__attribute__((target("avx512f,avx512vnni"))) inline __m512i Dpbusd(__m512i acc, __m512i a,
                                                                  __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// Keeps a rounded float32 product from being contracted into the addition after it.
__attribute__((target("avx512f"))) inline __m512 Rounded(__m512 v) {
  asm("" : "+v"(v));
  return v;
}

}  // namespace bct

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

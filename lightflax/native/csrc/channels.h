// The channel counts the hand-written loops are compiled for (the study's models: 8, 16, 32; 64 for
// wider ones): a compile-time count lets the per-row channel loop unroll into vector code. Others
// (0) run the same loop with the count read at run time. Results do not depend on which runs.
// Dependency-free: the standalone loop benchmark (benchmarks/native_loops) includes it too.
#pragma once

#include <cstdint>
#include <type_traits>

namespace lf {

// Calls f(std::integral_constant<int, C>{}) for C = c when c is one of 8, 16, 32, 64, else C = 0.
template <typename F>
void WithChannels(int64_t c, F&& f) {
  switch (c) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

}  // namespace lf

// The C++ tests' one assertion: CHECK(condition, ...) prints where and why it failed and exits
// non-zero (ctest then reports the test failed). Always on, whatever NDEBUG says.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>

#define CHECK(condition, ...)                                                   \
  do {                                                                          \
    if (!(condition)) {                                                         \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #condition); \
      std::fprintf(stderr, __VA_ARGS__);                                        \
      std::fprintf(stderr, "\n");                                               \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)

// |actual - expected| <= atol + rtol * |expected|
inline bool close(double actual, double expected, double rtol, double atol) {
  return std::fabs(actual - expected) <= atol + rtol * std::fabs(expected);
}

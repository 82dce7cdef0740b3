// Portable float16/bfloat16 <-> float32 conversions by bit manipulation (no F16C, no -march).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace memloc {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Exact float16 -> float32, written with masks instead of branches so that loops over rows
// vectorize. The exponent is rebased by 112; inf/NaN get the remaining 112 to reach 255 (payload
// kept); for subnormals (exponent 0) the value m * 2^-24 is formed as (2^-14 + m * 2^-24) - 2^-14,
// which is exact (Sterbenz) and never produces a float32 subnormal.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t body = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exp = body & 0x0f800000u;
  const uint32_t inf_nan = 0u - static_cast<uint32_t>(exp == 0x0f800000u);
  const uint32_t subnormal = 0u - static_cast<uint32_t>(exp == 0u);
  const uint32_t normal = body + (112u << 23) + (inf_nan & (112u << 23));
  const uint32_t small = float_to_bits(bits_to_float(body + (113u << 23)) - bits_to_float(113u << 23));
  return bits_to_float(sign | (subnormal & small) | (~subnormal & normal));
}

// |float16| as float32 (the sign bit dropped before converting: what the scores need).
inline float half_abs_to_float(uint16_t h) { return half_to_float(static_cast<uint16_t>(h & 0x7fffu)); }

inline float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

inline float bf16_abs_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b & 0x7fffu) << 16); }

// float32 -> float16, round to nearest even; overflow gives inf, NaN gives the quiet NaN 0x7e00
// (with the sign), as c10::Half does. Integer-only, so it does not depend on the FPU's
// flush-to-zero state.
inline uint16_t float_to_half(float f) {
  const uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;
  if (ax >= 0x47800000u) return sign | 0x7c00u;  // >= 65536 (65520..65536 round up below)
  if (ax >= 0x38800000u) {                        // normal float16 range, >= 2^-14
    const uint32_t odd = (ax >> 13) & 1u;
    return sign | static_cast<uint16_t>((ax - (112u << 23) + 0xfffu + odd) >> 13);
  }
  if (ax < 0x33000000u) return sign;  // < 2^-25: rounds to (signed) zero
  // float16 subnormal: value = m * 2^(e - 150), unit 2^-24, so the result is m >> (126 - e).
  const uint32_t e = ax >> 23;
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14 .. 24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;  // may carry into the smallest normal: correct
  return sign | static_cast<uint16_t>(q);
}

// float32 -> bfloat16, round to nearest even; NaN gives the quiet NaN 0x7fc0, as c10::BFloat16 does.
inline uint16_t float_to_bf16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Element types: the storage type, the value as float32 (`load`), |value| as float32 (`abs`: the
// score's first factor) and float32 -> storage with round to nearest even (`store`).
struct Half {
  using storage = uint16_t;
  static float load(uint16_t v) { return half_to_float(v); }
  static float abs(uint16_t v) { return half_abs_to_float(v); }
  static uint16_t store(float f) { return float_to_half(f); }
};
struct BFloat16 {
  using storage = uint16_t;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static float abs(uint16_t v) { return bf16_abs_to_float(v); }
  static uint16_t store(float f) { return float_to_bf16(f); }
};
struct Float {
  using storage = float;
  static float load(float v) { return v; }
  static float abs(float v) { return std::fabs(v); }
  static float store(float f) { return f; }
};

}  // namespace memloc

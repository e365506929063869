/* float32 ln and exp shared by tbfunc's CPU kernels: Cephes' polynomials (Moshier), written
 * without branches or calls so that gcc and clang vectorise the loops that use them. The
 * constants are float32 values spelled in hex (tbfunc._philox uses the very same ones for the
 * noise's ln). Each function's steps are fixed: the noise kernel builds with -ffp-contract=off,
 * so its callers round alike and as tbfunc._philox does; the training kernels (_train.c)
 * contract into FMAs, which round otherwise, and need agree with tensor ops only to rounding. */

#ifndef TBFUNC_CEPHES_H
#define TBFUNC_CEPHES_H

#include <stdint.h>

#define SQRT_HALF 0x1.6a09e6p-1f
#define LOG_P0 0x1.204376p-4f /* Cephes logf: 7.0376836292E-2, ... */
#define LOG_P1 -0x1.d7a37p-4f
#define LOG_P2 0x1.de4a34p-4f
#define LOG_P3 -0x1.fcba9ep-4f
#define LOG_P4 0x1.23d37ep-3f
#define LOG_P5 -0x1.555cap-3f
#define LOG_P6 0x1.999d58p-3f
#define LOG_P7 -0x1.fffff8p-3f
#define LOG_P8 0x1.555554p-2f
#define LN2_LO -0x1.bd0106p-13f
#define LN2_HI 0x1.63p-1f
#define LOG2E 0x1.715476p+0f
#define EXP_P0 0x1.a0d2cep-13f /* Cephes expf: 1.9875691500E-4, ... */
#define EXP_P1 0x1.6e879cp-10f
#define EXP_P2 0x1.111210p-7f
#define EXP_P3 0x1.555382p-5f
#define EXP_P4 0x1.555554p-3f
#define EXP_P5 0x1.000000p-1f

typedef union {
    float f;
    int32_t i;
} word32;

static inline float ln32(float value) {
    /* ln of a positive normal float32 */
    word32 u = {.f = value};
    int32_t e = (u.i >> 23) - 126; /* value = m * 2**e, m in [0.5, 1) */
    word32 m = {.i = (u.i & 0x007FFFFF) | 0x3F000000};
    int32_t below = m.f < SQRT_HALF;
    float wide = (m.f + m.f) - 1.0f, narrow = m.f - 1.0f;
    float x = below ? wide : narrow;
    e = e - below;
    float z = x * x;
    float y = LOG_P0;
    y = y * x + LOG_P1;
    y = y * x + LOG_P2;
    y = y * x + LOG_P3;
    y = y * x + LOG_P4;
    y = y * x + LOG_P5;
    y = y * x + LOG_P6;
    y = y * x + LOG_P7;
    y = y * x + LOG_P8;
    y = y * x * z;
    float fe = (float)e;
    y = y + LN2_LO * fe;
    y = y + -0.5f * z;
    x = x + y;
    return x + LN2_HI * fe;
}

static inline float exp32(float x) {
    /* e**x for x <= 0 (the kernels' only use: exp(-|rho|)). Below -87 the power of two is
     * applied in two steps, so the result runs on into the subnormals (and rounds to 0 below
     * about -104) instead of stopping at 2**-126. */
    int32_t deep = x < -87.0f;
    x = deep ? x + 32.0f / LOG2E : x; /* + 32 ln 2 */
    x = x < -87.0f ? -87.0f : x;
    float n = __builtin_floorf(x * LOG2E + 0.5f);
    float r = x - n * LN2_HI;
    r = r - n * LN2_LO;
    float z = r * r;
    float p = EXP_P0;
    p = p * r + EXP_P1;
    p = p * r + EXP_P2;
    p = p * r + EXP_P3;
    p = p * r + EXP_P4;
    p = p * r + EXP_P5;
    p = p * z + r + 1.0f;
    word32 scale = {.i = ((int32_t)n + 127) << 23};
    return deep ? p * scale.f * 0x1p-32f : p * scale.f;
}

#endif

/* Exact k-nearest centroids with a bfloat16 prefilter (AMX tiles, or portable C).

   A descriptor's k nearest centroids (squared L2, ties to the lower id) are found in two steps:

   1. every centroid gets an approximate proximity p^(c) = <x^, c^> - |c|^2 / 2 from bfloat16
      copies x^, c^ (products exact in float32, float32 sums), with a proven bound E(x) on
      |p(c) - p^(c)|, where p(c) = <x, c> - |c|^2 / 2 is the exact proximity (larger = nearer);
   2. only centroids with p^(c) >= P_k - 2 E(x), P_k the k-th largest p^, can be among the k
      nearest; their exact squared distances sum(x_d - c_d)^2 are taken in double precision and
      ranked.

   So the result is the exact one, whatever the prefilter's rounding: the AMX kernel and the
   portable one (a plain loop, the same layout) give identical ids. The bound is
   E(x) = |x| max|c - c^| + |x - x^| max|c^| + (2 D + 8) u (max|c|^2 + |x^| max|c^|) + 1e-30
   (u = 2^-24): the rounding of x and c to bfloat16 (Cauchy-Schwarz), float32 accumulation of at
   most D + 1 terms, the float32 norms and the threshold's own rounding, each bounded generously
   (float32 underflow costs at most 1e-36 here, inside the 1e-30). A row whose proximities could
   overflow float32, or with too many candidates to keep, is ranked exactly over every centroid. */
#ifndef ASMK_NEAREST_BF16_H
#define ASMK_NEAREST_BF16_H

#include <stdint.h>

/* centroids per group (one tile's columns) and dimensions per step (one tile's depth) */
#define ASMK_BF16_GROUP 16
#define ASMK_BF16_STEP 32
/* padded sizes: centroids to pairs of groups, dimensions to whole steps */
#define ASMK_BF16_CENTROID_ALIGN 32
/* descriptors per work unit (one thread's block): their bfloat16 copies (64 x 128 x 2 bytes)
   stay in L1 while every centroid pair streams past (the tile products alone, 4096 words, one
   core: 1.0 us per descriptor against 1.4 us with blocks of 32) */
#define ASMK_BF16_ROWS_PER_BLOCK 64

/* Statistics of the packed centroids that the bound E(x) needs. */
typedef struct {
    double max_rounding_norm;   /* max_c |c - c^| */
    double max_rounded_norm;    /* max_c |c^| */
    double max_squared_norm;    /* max_c |c|^2 */
} asmk_bf16_stats;

/* 1 when this build has the AMX kernel, the CPU has AMX-TILE, AMX-BF16 and AVX-512 F/DQ/BW/VL,
   the OS saves tile state and granted this process the tile data permission; else 0. */
int asmk_bf16_amx_usable(void);

/* Pack (K, D) float32 centroids for the prefilter:
   packed: (Kp / 16) * (Dp / 32) tiles of 16 x 16 x 2 bfloat16 (pairs of dimensions), i.e. element
           ((g * (Dp / 32) + s) * 16 + p) * 32 + n * 2 + h holds dimension s * 32 + 2 p + h of
           centroid g * 16 + n (0 beyond D or K);
   half_norms: (Kp,) float32, -|c|^2 / 2 (NaN for the padding centroids, which never qualify).
   Kp = K rounded up to 32, Dp = D rounded up to 32. */
void asmk_bf16_pack_centroids(const float *centroids, int64_t K, int64_t D, uint16_t *packed,
                              float *half_norms, asmk_bf16_stats *stats);

/* The k nearest of K centroids for each of n descriptors (n, D) float32, written to out (n, k)
   int64, nearest first. use_amx: 1 for the AMX kernel (must be usable), 0 for the portable one.
   Returns 0, -1 when memory ran out, -2 when AMX was asked for and is not usable. */
int asmk_bf16_nearest(const float *descriptors, int64_t n, const float *centroids, int64_t K,
                      int64_t D, const uint16_t *packed, const float *half_norms,
                      const asmk_bf16_stats *stats, int64_t k, int use_amx, int threads,
                      int64_t *out, int64_t *n_exact_rows, int64_t *n_candidates);

#endif

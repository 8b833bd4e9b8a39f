/* Exact k-nearest centroids with a bfloat16 prefilter: see _nearest_bf16.h for the method and
   the bound. The AMX kernel needs ASMK_HAVE_AMX at build time (setup.py defines it when the
   compiler knows the AMX intrinsics) and a CPU and OS that allow it at run time. */
#include "_nearest_bf16.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(ASMK_HAVE_AMX) && defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define ASMK_AMX_BUILD 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define ASMK_AMX_TARGET \
    __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl")))
#else
#define ASMK_AMX_BUILD 0
#endif

#define ROWS_PER_BLOCK ASMK_BF16_ROWS_PER_BLOCK
/* the AMX path scans a block's approximate proximities to the first "seed" centroids in two
   passes, which set every row's threshold near its final value at once, then those to the other
   centroids in one pass, a 32 x 32 tile block at a time while the tile unit sums the next (1.25-
   1.55x faster than two passes over chunks of 4096 for k = 1). Seeds: 256 centroids for k = 1;
   1024 for k > 1, whose thresholds rise later (k = 5: 20 -> 15 hits per row, 7% faster) */
#define SEED_CENTROIDS_ONE 256
#define SEED_CENTROIDS_MANY 1024
/* floats between two rows of the seed buffer: a row plus one cache line, so the 16 rows of a
   tile store do not all fall in the same L1 set */
#define SEED_STRIDE (SEED_CENTROIDS_MANY + 16)
/* candidates kept per row before a compaction; a row still over half full after one is ranked
   exactly over all centroids */
#define CANDIDATE_CAPACITY 128
#define UNIT_ROUNDOFF (1.0 / 16777216.0) /* float32: 2^-24 */
/* rows whose proximities could come near float32's largest value (3.4e38) are ranked exactly */
#define OVERFLOW_GUARD 1e37
#define TILE_ELEMENTS (ASMK_BF16_GROUP * ASMK_BF16_STEP) /* bfloat16 per packed tile */

static inline int64_t round_up(int64_t value, int64_t step)
{
    return (value + step - 1) / step * step;
}

/* float32 -> bfloat16, round to nearest even (finite input; huge values may become inf). */
static inline uint16_t float_to_bf16(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float bf16_to_float(uint16_t value)
{
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

/* ------------------------------------------------------------------------------------------- */
/* packing                                                                                      */

void asmk_bf16_pack_centroids(const float *centroids, int64_t K, int64_t D, uint16_t *packed,
                              float *half_norms, asmk_bf16_stats *stats)
{
    const int64_t Kp = round_up(K, ASMK_BF16_CENTROID_ALIGN), Dp = round_up(D, ASMK_BF16_STEP);
    const int64_t steps = Dp / ASMK_BF16_STEP;
    double max_rounding = 0.0, max_rounded = 0.0, max_squared = 0.0;
    memset(packed, 0, (size_t)(Kp * Dp) * sizeof(uint16_t));
    for (int64_t c = 0; c < K; c++) {
        const float *row = centroids + c * D;
        const int64_t group = c / ASMK_BF16_GROUP, column = c % ASMK_BF16_GROUP;
        double squared = 0.0, rounding = 0.0, rounded = 0.0;
        for (int64_t d = 0; d < D; d++) {
            const uint16_t value = float_to_bf16(row[d]);
            const double exact = row[d], approximate = bf16_to_float(value);
            const int64_t step = d / ASMK_BF16_STEP, pair = (d % ASMK_BF16_STEP) / 2;
            packed[((group * steps + step) * ASMK_BF16_GROUP + pair) * 2 * ASMK_BF16_GROUP
                   + column * 2 + d % 2] = value;
            squared += exact * exact;
            rounding += (exact - approximate) * (exact - approximate);
            rounded += approximate * approximate;
        }
        half_norms[c] = (float)(-0.5 * squared);
        if (!(squared <= max_squared)) max_squared = squared;      /* NaN/inf propagate */
        if (!(rounding <= max_rounding)) max_rounding = rounding;
        if (!(rounded <= max_rounded)) max_rounded = rounded;
    }
    for (int64_t c = K; c < Kp; c++) half_norms[c] = NAN; /* padding: never a candidate */
    stats->max_rounding_norm = sqrt(max_rounding);
    stats->max_rounded_norm = sqrt(max_rounded);
    stats->max_squared_norm = max_squared;
}

/* ------------------------------------------------------------------------------------------- */
/* per-row candidate bookkeeping                                                                */

typedef struct {
    float threshold; /* a centroid is a candidate when its p^ >= threshold (+inf: none) */
    float window;    /* 2 E(x) */
    int32_t count;   /* candidates kept */
    int32_t exact;   /* 1: rank this row exactly over every centroid */
} row_state;

typedef struct {
    uint16_t *rows;          /* ROWS_PER_BLOCK x Dp bfloat16 descriptors */
    float *block;            /* ROWS_PER_BLOCK x SEED_STRIDE approximate proximities to the seed
                                centroids (AMX), or 32 x 32 (portable) */
    float *ring;             /* 2 x 32 x 32: the last two tile blocks of the one-pass scan (AMX) */
    float *lane_best;        /* ROWS_PER_BLOCK x 16: per row and lane, the largest p^ so far */
    float *block_best;       /* ROWS_PER_BLOCK x SEED_CENTROIDS_MANY / 32: per row, each seed
                                centroid pair's largest p^ (AMX) */
    row_state *state;        /* ROWS_PER_BLOCK */
    float *best;             /* ROWS_PER_BLOCK x k largest p^ so far, descending */
    float *candidate_value;  /* ROWS_PER_BLOCK x CANDIDATE_CAPACITY */
    int64_t *candidate_id;
    double *rank_distance;   /* k: the exact ranking's scratch */
    int64_t *rank_id;
} workspace;

static void workspace_free(workspace *w)
{
    if (w == NULL) return;
    free(w->rows); free(w->block); free(w->ring); free(w->lane_best); free(w->block_best);
    free(w->state); free(w->best); free(w->candidate_value); free(w->candidate_id);
    free(w->rank_distance); free(w->rank_id);
    free(w);
}

static void *aligned(size_t bytes)
{
    void *memory = NULL;
    if (posix_memalign(&memory, 64, (size_t)round_up((int64_t)bytes, 64)) != 0) return NULL;
    return memory;
}

static workspace *workspace_new(int64_t Dp, int64_t k, int use_amx)
{
    workspace *w = calloc(1, sizeof(workspace));
    if (w == NULL) return NULL;
    w->rows = aligned((size_t)(ROWS_PER_BLOCK * Dp) * sizeof(uint16_t));
    w->block = aligned((use_amx ? ROWS_PER_BLOCK * SEED_STRIDE : 32 * 32) * sizeof(float));
    w->ring = aligned(2 * 32 * 32 * sizeof(float));
    w->lane_best = aligned(ROWS_PER_BLOCK * 16 * sizeof(float));
    w->block_best = aligned(ROWS_PER_BLOCK * (SEED_CENTROIDS_MANY / 32) * sizeof(float));
    w->state = malloc(ROWS_PER_BLOCK * sizeof(row_state));
    w->best = malloc((size_t)(ROWS_PER_BLOCK * k) * sizeof(float));
    w->candidate_value = malloc(ROWS_PER_BLOCK * CANDIDATE_CAPACITY * sizeof(float));
    w->candidate_id = malloc(ROWS_PER_BLOCK * CANDIDATE_CAPACITY * sizeof(int64_t));
    w->rank_distance = malloc((size_t)k * sizeof(double));
    w->rank_id = malloc((size_t)k * sizeof(int64_t));
    if (!w->rows || !w->block || !w->ring || !w->lane_best || !w->block_best || !w->state ||
        !w->best || !w->candidate_value || !w->candidate_id || !w->rank_distance || !w->rank_id) {
        workspace_free(w);
        return NULL;
    }
    return w;
}

/* Helpers that the AVX-512 code calls are inlined into it, so that they run as AVX-512 code: a
   plain x86-64 function called with the vector registers' upper halves in use made the whole
   search 1.7x slower (record_hits, see below). */
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Keep a candidate (compacting the row's list when full; a row still over half full after a
   compaction is ranked exactly over every centroid instead). */
static ALWAYS_INLINE void keep_candidate(row_state *state, float *values, int64_t *ids, float value,
                                         int64_t id)
{
    if (state->count == CANDIDATE_CAPACITY) {
        int32_t kept = 0;
        for (int32_t i = 0; i < state->count; i++) {
            if (values[i] >= state->threshold) {
                values[kept] = values[i];
                ids[kept] = ids[i];
                kept++;
            }
        }
        state->count = kept;
        if (kept > CANDIDATE_CAPACITY / 2) {
            state->exact = 1;
            state->threshold = INFINITY;
            return;
        }
    }
    values[state->count] = value;
    ids[state->count] = id;
    state->count++;
}

/* Some of a row's 32 approximate proximities (bits of `hits`) reached its threshold: first raise
   the row's k largest with all of them (and so the threshold), then keep those still reaching
   it, so that a chunk that moves the threshold far adds no stale candidates. (Called out of line
   from the AVX-512 scan, it made the whole search 1.7x slower.) */
static ALWAYS_INLINE void record_hits(row_state *state, float *best, float *values, int64_t *ids,
                                      int64_t k, const float *chunk, uint32_t hits,
                                      int64_t first_centroid)
{
    if (state->exact) return;
    for (uint32_t rest = hits; rest != 0; rest &= rest - 1) {
        const float value = chunk[__builtin_ctz(rest)];
        if (value > best[k - 1]) {
            int64_t at = k - 1;
            while (at > 0 && best[at - 1] < value) {
                best[at] = best[at - 1];
                at--;
            }
            best[at] = value;
        }
    }
    if (best[k - 1] - state->window > state->threshold)
        state->threshold = best[k - 1] - state->window;
    for (uint32_t rest = hits; rest != 0 && !state->exact; rest &= rest - 1) {
        const int j = __builtin_ctz(rest);
        if (chunk[j] >= state->threshold)
            keep_candidate(state, values, ids, chunk[j], first_centroid + j);
    }
}

/* Exact squared distance in double precision: float32 differences are exact in double; eight
   running sums (dimension d into sum d % 8), each difference squared then added (setup.py turns
   floating-point contraction off, so no FMA fuses them), combined in a fixed order. The AVX-512
   version below does the very same operations, so both give the same bits. */
typedef double (*distance_function)(const float *x, const float *c, int64_t D);

static double exact_squared_distance(const float *x, const float *c, int64_t D)
{
    double sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        for (int lane = 0; lane < 8; lane++) {
            const double difference = (double)x[d + lane] - (double)c[d + lane];
            sums[lane] += difference * difference;
        }
    }
    for (; d < D; d++) {
        const double difference = (double)x[d] - (double)c[d];
        sums[d % 8] += difference * difference;
    }
    return ((sums[0] + sums[1]) + (sums[2] + sums[3]))
           + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
}

/* The k nearest of the given centroids (ids, or all K when ids is NULL) by exact distance,
   ties to the lower id, into out (k). */
static void rank_exactly(const float *x, const float *centroids, int64_t D, const int64_t *ids,
                         int64_t count, int64_t k, distance_function distance_of,
                         double *distance, int64_t *rank, int64_t *out)
{
    for (int64_t i = 0; i < k; i++) {
        distance[i] = INFINITY;
        rank[i] = -1;
    }
    for (int64_t i = 0; i < count; i++) {
        const int64_t id = ids != NULL ? ids[i] : i;
        const double value = distance_of(x, centroids + id * D, D);
        if (rank[k - 1] >= 0 && (value > distance[k - 1] ||
                                 (value == distance[k - 1] && id > rank[k - 1])))
            continue;
        int64_t at = k - 1;
        while (at > 0 && (rank[at - 1] < 0 || value < distance[at - 1] ||
                          (value == distance[at - 1] && id < rank[at - 1]))) {
            distance[at] = distance[at - 1];
            rank[at] = rank[at - 1];
            at--;
        }
        distance[at] = value;
        rank[at] = id;
    }
    memcpy(out, rank, (size_t)k * sizeof(int64_t));
}

/* ------------------------------------------------------------------------------------------- */
/* the two kernels of one 32 x 32 block of approximate proximities                              */

/* block[i][j] = -|c_j|^2 / 2 + sum_d x^_i[d] c^_j[d] for 32 rows and the centroid pair's 32
   columns, summed in the order the loops give (the bound holds for any order). */
static void proximities_portable(const uint16_t *rows, int64_t Dp, const uint16_t *pair,
                                 int64_t steps, const float *half_norms, float *block)
{
    for (int64_t i = 0; i < 32; i++) {
        for (int64_t j = 0; j < 32; j++) {
            const uint16_t *tiles = pair + (j / ASMK_BF16_GROUP) * steps * TILE_ELEMENTS;
            const int64_t column = j % ASMK_BF16_GROUP;
            float sum = 0.0f;
            for (int64_t d = 0; d < Dp; d++) {
                const uint16_t c = tiles[(d / ASMK_BF16_STEP) * TILE_ELEMENTS
                                         + ((d % ASMK_BF16_STEP) / 2) * 2 * ASMK_BF16_GROUP
                                         + column * 2 + d % 2];
                sum += bf16_to_float(rows[i * Dp + d]) * bf16_to_float(c);
            }
            block[i * 32 + j] = sum + half_norms[j];
        }
    }
}

static void scan_block_portable(workspace *w, const float *block, int64_t first_row,
                                int64_t n_rows, int64_t k, int64_t first_centroid)
{
    for (int64_t i = 0; i < n_rows; i++) {
        const int64_t r = first_row + i;
        row_state *state = w->state + r;
        uint32_t hits = 0;
        for (int j = 0; j < 32; j++)
            hits |= (uint32_t)(block[i * 32 + j] >= state->threshold) << j;
        if (hits)
            record_hits(state, w->best + r * k, w->candidate_value + r * CANDIDATE_CAPACITY,
                        w->candidate_id + r * CANDIDATE_CAPACITY, k, block + i * 32, hits,
                        first_centroid);
    }
}

/* Approximate proximities of a block's rows to every centroid pair, portable loops. */
static void scan_centroids_portable(workspace *w, int64_t n_rows, int64_t Dp,
                                    const uint16_t *packed, int64_t steps,
                                    const float *half_norms, int64_t pairs, int64_t k)
{
    for (int64_t p = 0; p < pairs; p++) {
        for (int64_t r = 0; r < n_rows; r += 32) {
            proximities_portable(w->rows + r * Dp, Dp, packed + 2 * p * steps * TILE_ELEMENTS,
                                 steps, half_norms + p * 32, w->block);
            scan_block_portable(w, w->block, r, n_rows - r < 32 ? n_rows - r : 32, k, p * 32);
        }
    }
}

#if ASMK_AMX_BUILD
typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* tiles 0-3: 16 x 16 float32 sums (rows 0-15 / 16-31 x centroids 0-15 / 16-31 of the pair);
   4-5: 16 rows x 32 bfloat16 dimensions; 6-7: 16 dimension pairs x 16 centroids x 2 */
ASMK_AMX_TARGET static void amx_configure(void)
{
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.bytes_per_row[t] = 64;
    }
    /* an asm with the config as its memory operand: GCC 12 drops the stores that fill it when
       they only feed the _tile_loadconfig builtin */
    __asm__ volatile("ldtilecfg %0" : : "m"(config));
}

ASMK_AMX_TARGET static void amx_release(void) { _tile_release(); }

/* The sums of one 32 x 32 block live in tiles 0-3 (rows 0-15 / 16-31 x centroids 0-15 / 16-31
   of the pair); they start from 0 (loading -|c|^2 / 2 with a zero row stride made the whole
   search 2.6x slower) and the scans add the half norms. */
ASMK_AMX_TARGET static ALWAYS_INLINE void zero_proximities_amx(void)
{
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

/* Add step s (32 dimensions) of a block's products; it runs in the tile unit while the core goes
   on. rows: the block's 32 bfloat16 rows (stride Dp); pair: the centroid pair's packed tiles. */
ASMK_AMX_TARGET static ALWAYS_INLINE void multiply_step_amx(const uint16_t *rows, int64_t Dp,
                                                            const uint16_t *pair, int64_t steps,
                                                            int64_t s)
{
    _tile_loadd(4, rows + s * ASMK_BF16_STEP, Dp * 2);
    _tile_loadd(5, rows + 16 * Dp + s * ASMK_BF16_STEP, Dp * 2);
    _tile_loadd(6, pair + s * TILE_ELEMENTS, 64);
    _tile_loadd(7, pair + (steps + s) * TILE_ELEMENTS, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
}

ASMK_AMX_TARGET static inline void start_proximities_amx(const uint16_t *rows, int64_t Dp,
                                                         const uint16_t *pair, int64_t steps)
{
    zero_proximities_amx();
    for (int64_t s = 0; s < steps; s++) multiply_step_amx(rows, Dp, pair, steps, s);
}

/* Store the block's sums: row i, centroid j of the pair at out[i * stride + j]. */
ASMK_AMX_TARGET static inline void store_proximities_amx(float *out, int64_t stride)
{
    _tile_stored(0, out, stride * 4);
    _tile_stored(1, out + 16, stride * 4);
    _tile_stored(2, out + 16 * stride, stride * 4);
    _tile_stored(3, out + 16 * stride + 16, stride * 4);
}

/* The k-th largest of 16 lane maxima (k <= 16): they belong to 16 different centroids, so it is
   at most the row's k-th largest approximate proximity. */
static ALWAYS_INLINE float kth_largest_lane(const float *lanes, int64_t k)
{
    float top[16];
    int64_t count = 0;
    for (int lane = 0; lane < 16; lane++) {
        const float value = lanes[lane];
        int64_t at = count < k ? count++ : k;
        if (at == k && !(value > top[k - 1])) continue;
        if (at == k) at = k - 1;
        while (at > 0 && top[at - 1] < value) {
            top[at] = top[at - 1];
            at--;
        }
        top[at] = value;
    }
    return count < k ? -INFINITY : top[k - 1];
}

/* First pass over one 32 x 32 block (rows first_row.., the centroid pair at `first`), while the
   block is still in L1: add the half norms (in place) and raise the rows' lane maxima. */
ASMK_AMX_TARGET static void fold_block_avx512(workspace *w, float *block, int64_t stride,
                                              int64_t first_row, int64_t n_rows,
                                              const float *half_norms, int64_t pair)
{
    const __m512 norms_low = _mm512_loadu_ps(half_norms);
    const __m512 norms_high = _mm512_loadu_ps(half_norms + 16);
    for (int64_t i = 0; i < n_rows; i++) {
        float *values = block + i * stride;
        float *lanes = w->lane_best + (first_row + i) * 16;
        const __m512 low = _mm512_add_ps(_mm512_load_ps(values), norms_low);
        const __m512 high = _mm512_add_ps(_mm512_load_ps(values + 16), norms_high);
        _mm512_store_ps(values, low);
        _mm512_store_ps(values + 16, high);
        /* a NaN value (padding) keeps the lane; the pair's maximum is -inf when all are NaN */
        const __m512 pair_lanes =
            _mm512_max_ps(high, _mm512_max_ps(low, _mm512_set1_ps(-INFINITY)));
        _mm512_store_ps(lanes, _mm512_max_ps(pair_lanes, _mm512_load_ps(lanes)));
        w->block_best[(first_row + i) * (SEED_CENTROIDS_MANY / 32) + pair] =
            _mm512_reduce_max_ps(pair_lanes);
    }
}

/* Second pass over one row's approximate proximities to the seed centroids 0..columns-1: the
   k-th largest lane maximum raises the threshold at once (so hits that a later centroid makes
   stale are rare), then only the centroid pairs whose maximum reaches it are read again. */
ASMK_AMX_TARGET static void scan_row_avx512(workspace *w, int64_t r, const float *values,
                                            int64_t columns, int64_t k)
{
    row_state *state = w->state + r;
    if (state->exact) return;
    if (k <= 16) {
        const float bound = kth_largest_lane(w->lane_best + r * 16, k) - state->window;
        if (bound > state->threshold) state->threshold = bound;
    }
    const float *pair_best = w->block_best + r * (SEED_CENTROIDS_MANY / 32);
    for (int64_t pairs = columns / 32, p0 = 0; p0 < pairs; p0 += 16) {
        const __mmask16 valid = pairs - p0 >= 16 ? 0xffff : (__mmask16)((1u << (pairs - p0)) - 1);
        uint32_t pair_hits = _mm512_mask_cmp_ps_mask(
            valid, _mm512_maskz_loadu_ps(valid, pair_best + p0),
            _mm512_set1_ps(state->threshold), _CMP_GE_OQ);
        for (; pair_hits != 0; pair_hits &= pair_hits - 1) {
            const int64_t j = (p0 + __builtin_ctz(pair_hits)) * 32;
            const __m512 threshold = _mm512_set1_ps(state->threshold);
            const uint32_t hits =
                (uint32_t)_mm512_cmp_ps_mask(_mm512_load_ps(values + j), threshold, _CMP_GE_OQ)
                | ((uint32_t)_mm512_cmp_ps_mask(_mm512_load_ps(values + j + 16), threshold,
                                                _CMP_GE_OQ) << 16);
            if (hits)
                record_hits(state, w->best + r * k, w->candidate_value + r * CANDIDATE_CAPACITY,
                            w->candidate_id + r * CANDIDATE_CAPACITY, k, values + j, hits, j);
        }
    }
}

/* Rows [from, to) of a finished 32 x 32 block (stride 32; rows first_row.., the centroids from
   first_centroid), one pass: add the half norms, compare with each row's threshold and record
   the hits. */
ASMK_AMX_TARGET static ALWAYS_INLINE void record_block_rows_avx512(
    workspace *w, const float *block, int64_t first_row, int64_t from, int64_t to,
    __m512 norms_low, __m512 norms_high, int64_t first_centroid, int64_t k)
{
    for (int64_t i = from; i < to; i++) {
        const int64_t r = first_row + i;
        row_state *state = w->state + r;
        const __m512 threshold = _mm512_set1_ps(state->threshold);
        const __m512 low = _mm512_add_ps(_mm512_load_ps(block + i * 32), norms_low);
        const __m512 high = _mm512_add_ps(_mm512_load_ps(block + i * 32 + 16), norms_high);
        const uint32_t hits = (uint32_t)_mm512_cmp_ps_mask(low, threshold, _CMP_GE_OQ)
                              | ((uint32_t)_mm512_cmp_ps_mask(high, threshold, _CMP_GE_OQ) << 16);
        if (hits) {
            float values[32] __attribute__((aligned(64)));
            _mm512_store_ps(values, low);
            _mm512_store_ps(values + 16, high);
            record_hits(state, w->best + r * k, w->candidate_value + r * CANDIDATE_CAPACITY,
                        w->candidate_id + r * CANDIDATE_CAPACITY, k, values, hits,
                        first_centroid);
        }
    }
}

/* The same rows, for k = 1 first one test for all of them (the same sums and comparisons, the
   masks only OR-ed): a quarter block has a hit 14-20% of the time with k = 1, 50-58% with k = 5,
   for which each row is tested on its own (6% faster than the shared test). */
ASMK_AMX_TARGET static ALWAYS_INLINE void scan_block_rows_avx512(
    workspace *w, const float *block, int64_t first_row, int64_t from, int64_t to,
    __m512 norms_low, __m512 norms_high, int64_t first_centroid, int64_t k)
{
    if (k > 1) {
        record_block_rows_avx512(w, block, first_row, from, to, norms_low, norms_high,
                                 first_centroid, k);
        return;
    }
    __mmask16 any = 0;
    for (int64_t i = from; i < to; i++) {
        const __m512 threshold = _mm512_set1_ps(w->state[first_row + i].threshold);
        const __m512 low = _mm512_add_ps(_mm512_load_ps(block + i * 32), norms_low);
        const __m512 high = _mm512_add_ps(_mm512_load_ps(block + i * 32 + 16), norms_high);
        any = _kor_mask16(any, _kor_mask16(_mm512_cmp_ps_mask(low, threshold, _CMP_GE_OQ),
                                           _mm512_cmp_ps_mask(high, threshold, _CMP_GE_OQ)));
    }
    if (__builtin_expect(any != 0, 0))
        record_block_rows_avx512(w, block, first_row, from, to, norms_low, norms_high,
                                 first_centroid, k);
}

/* Two passes over the seed centroid pairs (0..seed_pairs-1): the tile unit sums block b + 1
   while the core folds block b (first pass), then each row's second pass. */
ASMK_AMX_TARGET static void scan_seed_amx(workspace *w, int64_t n_rows, int64_t Dp,
                                          const uint16_t *packed, int64_t steps,
                                          const float *half_norms, int64_t seed_pairs, int64_t k)
{
    const int64_t row_groups = (n_rows + 31) / 32, blocks = seed_pairs * row_groups;
    for (int64_t r = 0; r < n_rows; r++)
        _mm512_store_ps(w->lane_best + r * 16, _mm512_set1_ps(-INFINITY));
    for (int64_t b = 0; b <= blocks; b++) {
        if (b < blocks) {
            const int64_t p = b / row_groups, g = b % row_groups;
            start_proximities_amx(w->rows + g * 32 * Dp, Dp,
                                  packed + 2 * p * steps * TILE_ELEMENTS, steps);
        }
        if (b > 0) {
            const int64_t p = (b - 1) / row_groups, g = (b - 1) % row_groups;
            fold_block_avx512(w, w->block + g * 32 * SEED_STRIDE + p * 32, SEED_STRIDE, g * 32,
                              n_rows - g * 32 < 32 ? n_rows - g * 32 : 32, half_norms + p * 32,
                              p);
        }
        if (b < blocks) {
            const int64_t p = b / row_groups, g = b % row_groups;
            store_proximities_amx(w->block + g * 32 * SEED_STRIDE + p * 32, SEED_STRIDE);
        }
    }
    for (int64_t r = 0; r < n_rows; r++)
        scan_row_avx512(w, r, w->block + r * SEED_STRIDE, seed_pairs * 32, k);
}

/* One pass over the centroid pairs first_pair..pairs-1: while the tile unit sums block b, the
   core scans block b - 1 (from the ring), a quarter of its rows after each step's products. */
ASMK_AMX_TARGET static void scan_rest_amx(workspace *w, int64_t n_rows, int64_t Dp,
                                          const uint16_t *packed, int64_t steps,
                                          const float *half_norms, int64_t first_pair,
                                          int64_t pairs, int64_t k)
{
    const int64_t row_groups = (n_rows + 31) / 32, blocks = (pairs - first_pair) * row_groups;
    for (int64_t b = 0; b <= blocks; b++) {
        /* the block to scan: b - 1 */
        int64_t rows_before = 0, first_row = 0, first_centroid = 0;
        __m512 norms_low = _mm512_setzero_ps(), norms_high = _mm512_setzero_ps();
        const float *before = w->ring + ((b + 1) & 1) * 32 * 32;
        if (b > 0) {
            const int64_t p = first_pair + (b - 1) / row_groups, g = (b - 1) % row_groups;
            first_row = g * 32;
            rows_before = n_rows - first_row < 32 ? n_rows - first_row : 32;
            first_centroid = p * 32;
            norms_low = _mm512_loadu_ps(half_norms + first_centroid);
            norms_high = _mm512_loadu_ps(half_norms + first_centroid + 16);
        }
        if (b == blocks) {
            scan_block_rows_avx512(w, before, first_row, 0, rows_before, norms_low, norms_high,
                                   first_centroid, k);
            break;
        }
        const int64_t p = first_pair + b / row_groups, g = b % row_groups;
        const int64_t rows_per_step = (rows_before + steps - 1) / steps;
        zero_proximities_amx();
        for (int64_t s = 0; s < steps; s++) {
            multiply_step_amx(w->rows + g * 32 * Dp, Dp, packed + 2 * p * steps * TILE_ELEMENTS,
                              steps, s);
            const int64_t from = s * rows_per_step;
            const int64_t to = from + rows_per_step < rows_before ? from + rows_per_step
                                                                   : rows_before;
            if (from < to)
                scan_block_rows_avx512(w, before, first_row, from, to, norms_low, norms_high,
                                       first_centroid, k);
        }
        store_proximities_amx(w->ring + (b & 1) * 32 * 32, 32);
    }
}

/* The AMX path of one block of rows: the seed centroids in two passes, the rest in one. */
ASMK_AMX_TARGET static void scan_centroids_amx(workspace *w, int64_t n_rows, int64_t Dp,
                                               const uint16_t *packed, int64_t steps,
                                               const float *half_norms, int64_t pairs, int64_t k)
{
    const int64_t seed = (k == 1 ? SEED_CENTROIDS_ONE : SEED_CENTROIDS_MANY) / 32;
    const int64_t seed_pairs = pairs < seed ? pairs : seed;
    scan_seed_amx(w, n_rows, Dp, packed, steps, half_norms, seed_pairs, k);
    if (seed_pairs < pairs)
        scan_rest_amx(w, n_rows, Dp, packed, steps, half_norms, seed_pairs, pairs, k);
}

ASMK_AMX_TARGET static double exact_squared_distance_avx512(const float *x, const float *c,
                                                            int64_t D)
{
    __m512d sums = _mm512_setzero_pd();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        const __m512d difference = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + d)),
                                                 _mm512_cvtps_pd(_mm256_loadu_ps(c + d)));
        sums = _mm512_add_pd(sums, _mm512_mul_pd(difference, difference));
    }
    double lanes[8];
    _mm512_storeu_pd(lanes, sums);
    for (; d < D; d++) {
        const double difference = (double)x[d] - (double)c[d];
        lanes[d % 8] += difference * difference;
    }
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
           + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

int asmk_bf16_amx_usable(void)
{
    static int usable = -1;
    if (usable >= 0) return usable;
    unsigned int a, b, c, d;
    int result = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 24) & 1u) /* AMX-TILE */
        && ((d >> 22) & 1u) /* AMX-BF16 */
        && (b & 0xc0030000u) == 0xc0030000u /* AVX-512 F (16), DQ (17), BW (30), VL (31) */
        && __get_cpuid(1, &a, &b, &c, &d) && ((c >> 27) & 1u) /* OSXSAVE */) {
        unsigned int low, high;
        __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
        const uint64_t xcr0 = ((uint64_t)high << 32) | low;
        const uint64_t needed = (3ull << 17) /* tile config + data */ | 0xe6ull /* AVX-512 */;
        /* Linux: ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, once per process */
        result = (xcr0 & needed) == needed && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    }
    usable = result;
    return result;
}
#else
int asmk_bf16_amx_usable(void) { return 0; }
#endif

/* ------------------------------------------------------------------------------------------- */
/* driver                                                                                       */

/* Start a row's bookkeeping from |x|^2, |x - x^|^2 and |x^|^2 (x^ = bfloat16(x)): its window
   2 E(x) (see _nearest_bf16.h), no candidate yet. */
static ALWAYS_INLINE void start_row(workspace *w, int64_t r, double squared, double rounding,
                                    double rounded, int64_t D, int64_t k,
                                    const asmk_bf16_stats *stats)
{
    const double rounded_norm = sqrt(rounded);
    const double bound = sqrt(squared) * stats->max_rounding_norm
                         + sqrt(rounding) * stats->max_rounded_norm
                         + (2.0 * (double)D + 8.0) * UNIT_ROUNDOFF
                           * (stats->max_squared_norm + rounded_norm * stats->max_rounded_norm)
                         + 1e-30;
    row_state *state = w->state + r;
    const float window = nextafterf((float)(2.0 * bound), INFINITY);
    state->window = window;
    state->count = 0;
    /* the bound assumes no float32 overflow: |p^| <= |x^| max|c^| + max|c|^2 / 2 */
    state->exact = !(isfinite(bound) && isfinite(window)
                     && rounded_norm * stats->max_rounded_norm + stats->max_squared_norm
                        < OVERFLOW_GUARD);
    state->threshold = state->exact ? INFINITY : -INFINITY;
    for (int64_t i = 0; i < k; i++) w->best[r * k + i] = -INFINITY;
}

/* Copy one block's descriptors to bfloat16 (rows and dimensions beyond them zero) and start
   their rows' bookkeeping. */
static void start_block(workspace *w, const float *descriptors, int64_t n_rows, int64_t D,
                        int64_t Dp, int64_t k, const asmk_bf16_stats *stats)
{
    memset(w->rows, 0, (size_t)(ROWS_PER_BLOCK * Dp) * sizeof(uint16_t));
    for (int64_t r = 0; r < n_rows; r++) {
        const float *x = descriptors + r * D;
        double squared = 0.0, rounding = 0.0, rounded = 0.0;
        for (int64_t d = 0; d < D; d++) {
            const uint16_t value = float_to_bf16(x[d]);
            const double exact = x[d], approximate = bf16_to_float(value);
            w->rows[r * Dp + d] = value;
            squared += exact * exact;
            rounding += (exact - approximate) * (exact - approximate);
            rounded += approximate * approximate;
        }
        start_row(w, r, squared, rounding, rounded, D, k, stats);
    }
}

#if ASMK_AMX_BUILD
/* start_block, 16 dimensions at a time: the same bfloat16 values (round to nearest even on the
   bits), the three sums in another order (they only feed the bound, which has slack for it). */
ASMK_AMX_TARGET static void start_block_avx512(workspace *w, const float *descriptors,
                                               int64_t n_rows, int64_t D, int64_t Dp, int64_t k,
                                               const asmk_bf16_stats *stats)
{
    memset(w->rows, 0, (size_t)(ROWS_PER_BLOCK * Dp) * sizeof(uint16_t));
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i high_half = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t r = 0; r < n_rows; r++) {
        const float *x = descriptors + r * D;
        __m512d squared = _mm512_setzero_pd(), rounding = _mm512_setzero_pd();
        __m512d rounded = _mm512_setzero_pd();
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 valid = D - d >= 16 ? 0xffff : (__mmask16)((1u << (D - d)) - 1);
            const __m512i bits = _mm512_castps_si512(_mm512_maskz_loadu_ps(valid, x + d));
            const __m512i even = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
            const __m512i nearest = _mm512_and_si512(
                _mm512_add_epi32(bits, _mm512_add_epi32(bias, even)), high_half);
            _mm256_mask_storeu_epi16(w->rows + r * Dp + d, valid,
                                     _mm512_cvtepi32_epi16(_mm512_srli_epi32(nearest, 16)));
            const __m512 exact = _mm512_castsi512_ps(bits);
            const __m512 approximate = _mm512_castsi512_ps(nearest);
            for (int half = 0; half < 2; half++) {
                const __m256 e = half ? _mm512_extractf32x8_ps(exact, 1)
                                      : _mm512_castps512_ps256(exact);
                const __m256 a = half ? _mm512_extractf32x8_ps(approximate, 1)
                                      : _mm512_castps512_ps256(approximate);
                const __m512d e64 = _mm512_cvtps_pd(e), a64 = _mm512_cvtps_pd(a);
                const __m512d difference = _mm512_sub_pd(e64, a64);
                squared = _mm512_fmadd_pd(e64, e64, squared);
                rounding = _mm512_fmadd_pd(difference, difference, rounding);
                rounded = _mm512_fmadd_pd(a64, a64, rounded);
            }
        }
        start_row(w, r, _mm512_reduce_add_pd(squared), _mm512_reduce_add_pd(rounding),
                  _mm512_reduce_add_pd(rounded), D, k, stats);
    }
}
#endif

static void finish_block(workspace *w, const float *descriptors, int64_t n_rows,
                         const float *centroids, int64_t K, int64_t D, int64_t k,
                         distance_function distance_of, int64_t *out, int64_t *exact_rows,
                         int64_t *candidates)
{
    for (int64_t r = 0; r < n_rows; r++) {
        row_state *state = w->state + r;
        float *values = w->candidate_value + r * CANDIDATE_CAPACITY;
        int64_t *ids = w->candidate_id + r * CANDIDATE_CAPACITY;
        if (state->exact || !(w->best[r * k + k - 1] > -INFINITY)) {
            rank_exactly(descriptors + r * D, centroids, D, NULL, K, k, distance_of,
                         w->rank_distance, w->rank_id, out + r * k);
            *exact_rows += 1;
            continue;
        }
        int32_t kept = 0;
        for (int32_t i = 0; i < state->count; i++) {
            if (values[i] >= state->threshold) ids[kept++] = ids[i];
        }
        rank_exactly(descriptors + r * D, centroids, D, ids, kept, k, distance_of,
                     w->rank_distance, w->rank_id, out + r * k);
        *candidates += kept;
    }
}

int asmk_bf16_nearest(const float *descriptors, int64_t n, const float *centroids, int64_t K,
                      int64_t D, const uint16_t *packed, const float *half_norms,
                      const asmk_bf16_stats *stats, int64_t k, int use_amx, int threads,
                      int64_t *out, int64_t *n_exact_rows, int64_t *n_candidates)
{
    if (use_amx && !asmk_bf16_amx_usable()) return -2;
    const int64_t Kp = round_up(K, ASMK_BF16_CENTROID_ALIGN), Dp = round_up(D, ASMK_BF16_STEP);
    const int64_t steps = Dp / ASMK_BF16_STEP, pairs = Kp / ASMK_BF16_CENTROID_ALIGN;
    const int64_t blocks = (n + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
    distance_function distance_of = exact_squared_distance;
#if ASMK_AMX_BUILD
    if (use_amx) distance_of = exact_squared_distance_avx512;
#endif
    int failed = 0;
    int64_t exact_rows = 0, candidates = 0;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(+ : exact_rows, candidates)
#endif
    {
        workspace *w = workspace_new(Dp, k, use_amx);
        if (w == NULL) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#if ASMK_AMX_BUILD
        if (w != NULL && use_amx) amx_configure();
#endif
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t b = 0; b < blocks; b++) {
            if (w == NULL) continue;
            const int64_t first = b * ROWS_PER_BLOCK;
            const int64_t n_rows = n - first < ROWS_PER_BLOCK ? n - first : ROWS_PER_BLOCK;
            const float *x = descriptors + first * D;
#if ASMK_AMX_BUILD
            if (use_amx) {
                start_block_avx512(w, x, n_rows, D, Dp, k, stats);
                scan_centroids_amx(w, n_rows, Dp, packed, steps, half_norms, pairs, k);
            } else
#endif
            {
                start_block(w, x, n_rows, D, Dp, k, stats);
                scan_centroids_portable(w, n_rows, Dp, packed, steps, half_norms, pairs, k);
            }
            finish_block(w, x, n_rows, centroids, K, D, k, distance_of, out + first * k,
                         &exact_rows, &candidates);
        }
#if ASMK_AMX_BUILD
        if (w != NULL && use_amx) amx_release();
#endif
        workspace_free(w);
    }
    *n_exact_rows = exact_rows;
    *n_candidates = candidates;
    return failed ? -1 : 0;
}

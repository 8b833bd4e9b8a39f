# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled ASMK* hot loops: stable counting / per-image radix sorts, residual aggregation (with a
finiteness probe), inverted-file scans, k-nearest-centroid ranking, and the exact nearest-centroid
search with a bfloat16 (AMX) prefilter of ``_nearest_bf16.c``.

Everything works on plain C-contiguous arrays and releases the GIL. Index building (grouping and
aggregation) shares images among OpenMP threads when built with OpenMP; results never depend on
the thread count. Binary codes are packed into
uint64 words (``W = ceil(D / 64)``; dimension ``j`` is bit ``63 - j % 64`` of word ``j // 64``,
unused tail bits are 0). Scores are accumulated per query word in ascending word order, the first
and the second half of the query's words apart and then added, so the full scan and the per-image
forward-index scoring add the very same terms in the very same order.
"""
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.math cimport sqrt
from libc.string cimport memcpy
from cython.parallel cimport prange

cdef extern from *:
    """
    #include <stdint.h>
    #include <stdlib.h>
    #include <math.h>
    #include <string.h>
    #ifdef _OPENMP
    #include <omp.h>
    #endif

    /* Pairs below which grouping/aggregation runs on one thread (start-up costs more than it
       saves). A query's scan uses two threads only where no BLAS product precedes it (see
       asmk.py, SCAN_THREAD_QUANTIZERS): after one, the idle OpenBLAS workers keep spinning, and
       two spinning thread pools on the same cores made queries 1.6-3.2x slower (2 cores, 4096
       and 65536 words). Concurrent queries from several Python threads do run in parallel:
       every kernel releases the GIL. */
    #define ASMK_GROUP_PAIRS_PER_THREAD 16384

    static void asmk_set_max_threads(int count) {
    #ifdef _OPENMP
        omp_set_num_threads(count > 0 ? count : 1);
    #else
        (void)count;
    #endif
    }

    /* Threads for a loop of `work` units: 1 below `minimum` units per thread (start-up costs
       more than it saves), else up to omp_get_max_threads(). */
    static int asmk_threads_for(int64_t work, int64_t minimum) {
    #ifdef _OPENMP
        const int64_t most = omp_get_max_threads();
        int64_t threads = work / (minimum > 0 ? minimum : 1);
        if (threads > most) threads = most;
        return threads < 1 ? 1 : (int)threads;
    #else
        (void)work; (void)minimum;
        return 1;
    #endif
    }

    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    #define ASMK_POPCNT_ATTR __attribute__((target("popcnt")))
    #define ASMK_HAVE_POPCNT_DISPATCH 1
    #else
    #define ASMK_POPCNT_ATTR
    #define ASMK_HAVE_POPCNT_DISPATCH 0
    #endif

    static inline int asmk_cpu_has_popcnt(void) {
    #if ASMK_HAVE_POPCNT_DISPATCH
        __builtin_cpu_init();
        return __builtin_cpu_supports("popcnt");
    #else
        return 0;
    #endif
    }

    /* Full scan of the posting lists of the query's words (binary codes).
       Each list is short (hundreds of postings) and lies elsewhere in memory, so the hardware
       prefetcher starts cold on every one: while a list is scanned, the next word's list is
       prefetched at the same pace (one 64-byte line of codes every 4 postings, one of doc ids
       every 16, i.e. as fast as 128-bit codes are read). 1.45x faster scans measured (4096
       words, 10k images, 2 cores: 1.09 against 1.58 ms); the sums and their order are unchanged. */
    #define ASMK_PREFETCH_NEXT_LIST(step)                                                      \\
        if (((step) & 3) == 0) {                                                               \\
            if (next_code < next_code_end) { __builtin_prefetch(next_code); next_code += 64; } \\
            if (((step) & 15) == 0 && next_doc < next_doc_end) {                               \\
                __builtin_prefetch(next_doc);                                                  \\
                next_doc += 64;                                                                \\
            }                                                                                  \\
        }
    #define ASMK_DEFINE_SCAN_BINARY(NAME, ATTR)                                                \\
    static ATTR void NAME(const uint64_t *qcodes, const int64_t *qwords, const double *qweights, \\
                          int64_t nq, const int64_t *offsets, const uint64_t *codes,           \\
                          const uint32_t *docs, int64_t W, const double *lut, double *acc) {   \\
        for (int64_t i = 0; i < nq; ++i) {                                                     \\
            const uint64_t *q = qcodes + i * W;                                                \\
            const int64_t w = qwords[i];                                                       \\
            const double weight = qweights[i];                                                 \\
            const int64_t start = offsets[w], end = offsets[w + 1];                            \\
            const int64_t next = i + 1 < nq ? qwords[i + 1] : w;                               \\
            const int64_t next_start = i + 1 < nq ? offsets[next] : offsets[next + 1];         \\
            const char *next_code = (const char *)(codes + next_start * W);                    \\
            const char *next_code_end = (const char *)(codes + offsets[next + 1] * W);         \\
            const char *next_doc = (const char *)(docs + next_start);                          \\
            const char *next_doc_end = (const char *)(docs + offsets[next + 1]);               \\
            if (W == 2) {                                                                      \\
                const uint64_t q0 = q[0], q1 = q[1];                                           \\
                for (int64_t p = start; p < end; ++p) {                                        \\
                    ASMK_PREFETCH_NEXT_LIST(p - start)                                         \\
                    const int h = __builtin_popcountll(q0 ^ codes[2 * p])                      \\
                                + __builtin_popcountll(q1 ^ codes[2 * p + 1]);                 \\
                    /* branch-free: adding +0.0 leaves every sum (never -0.0) unchanged */    \\
                    acc[docs[p]] += weight * lut[h];                                           \\
                }                                                                              \\
            } else {                                                                           \\
                for (int64_t p = start; p < end; ++p) {                                        \\
                    ASMK_PREFETCH_NEXT_LIST(p - start)                                         \\
                    const uint64_t *c = codes + p * W;                                         \\
                    int h = 0;                                                                 \\
                    for (int64_t j = 0; j < W; ++j) h += __builtin_popcountll(q[j] ^ c[j]);    \\
                    const double s = lut[h];                                                   \\
                    if (s != 0.0) acc[docs[p]] += weight * s;                                  \\
                }                                                                              \\
            }                                                                                  \\
        }                                                                                      \\
    }

    /* Score selected images through the doc-major forward index (binary codes): a merge of the
       doc's sorted posting positions with the query words' sorted position ranges. The terms of
       the query words before `split` and from it are summed apart and then added, as the full
       scan does (scan_binary), so both give the same bits. */
    #define ASMK_DEFINE_SCORE_BINARY(NAME, ATTR)                                               \\
    static ATTR void NAME(const uint64_t *qcodes, const int64_t *qwords, const double *qweights, \\
                          int64_t nq, int64_t split, const int64_t *offsets, int64_t K,         \\
                          const uint64_t *codes, int64_t W, const uint32_t *fwd_positions,      \\
                          const int64_t *fwd_offsets, const int64_t *local_docs, int64_t nc,    \\
                          const double *lut, double *out) {                                     \\
        for (int64_t c = 0; c < nc; ++c) {                                                     \\
            const int64_t d = local_docs[c];                                                   \\
            double halves[2] = {0.0, 0.0}; /* query words before / from `split` */             \\
            int64_t qi = 0;                                                                    \\
            for (int64_t t = fwd_offsets[d]; t < fwd_offsets[d + 1]; ++t) {                    \\
                const int64_t pos = fwd_positions[t];                                          \\
                while (qi < nq && offsets[qwords[qi] + 1] <= pos) ++qi;                        \\
                if (qi == nq) break;                                                           \\
                if (offsets[qwords[qi]] > pos) continue; /* word not in the query */           \\
                const uint64_t *q = qcodes + qi * W;                                           \\
                const uint64_t *cc = codes + pos * W;                                          \\
                int h = 0;                                                                     \\
                for (int64_t j = 0; j < W; ++j) h += __builtin_popcountll(q[j] ^ cc[j]);       \\
                const double s = lut[h];                                                       \\
                if (s != 0.0) halves[qi >= split] += qweights[qi] * s;                         \\
            }                                                                                  \\
            out[c] = halves[0] + halves[1];                                                    \\
        }                                                                                      \\
    }

    ASMK_DEFINE_SCAN_BINARY(asmk_scan_binary_popcnt, ASMK_POPCNT_ATTR)
    ASMK_DEFINE_SCAN_BINARY(asmk_scan_binary_generic, )
    ASMK_DEFINE_SCORE_BINARY(asmk_score_binary_popcnt, ASMK_POPCNT_ATTR)
    ASMK_DEFINE_SCORE_BINARY(asmk_score_binary_generic, )

    #if defined(__SSE2__)
    #include <emmintrin.h>
    static const uint8_t asmk_reverse4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    #endif

    #define ASMK_PREFETCH_AHEAD 8

    /* Residual sums per run of (descriptor, word) pairs; see aggregate_residuals(). Groups are
       independent: with OpenMP (compile with -fopenmp) they are shared among threads, each with
       its own accumulator. Returns 0, 1 when a descriptor row holds NaN or inf, or -1 when out
       of memory. */
    static int asmk_aggregate(const float *restrict X, const float *restrict C, int64_t D,
                              const int64_t *restrict pair_descriptor,
                              const int64_t *restrict pair_word,
                              const int64_t *restrict group_starts, int64_t G, int64_t n_pairs,
                              int binary, uint64_t *restrict codes, float *restrict vecs) {
        const int64_t W = (D + 63) / 64;
        int failed = 0, nonfinite = 0;
        const int threads = asmk_threads_for(n_pairs, ASMK_GROUP_PAIRS_PER_THREAD);
    #ifdef _OPENMP
        #pragma omp parallel num_threads(threads) if(threads > 1) reduction(|:failed) reduction(|:nonfinite)
    #endif
        {
        float *restrict acc = (float *)malloc((size_t)D * sizeof(float));
        if (acc == NULL) failed = 1;
    #ifdef _OPENMP
        #pragma omp for schedule(dynamic, 4096)
    #endif
        for (int64_t g = 0; g < G; ++g) {
            if (acc == NULL) continue;
            const int64_t end = g + 1 < G ? group_starts[g + 1] : n_pairs;
            for (int64_t j = 0; j < D; ++j) acc[j] = 0.0f;
            for (int64_t p = group_starts[g]; p < end; ++p) {
                const float *restrict x = X + pair_descriptor[p] * D;
                const float *restrict c = C + pair_word[p] * D;
                if (p + ASMK_PREFETCH_AHEAD < n_pairs) {  /* rows of a pair a few steps ahead */
                    const char *next_x = (const char *)(X + pair_descriptor[p + ASMK_PREFETCH_AHEAD] * D);
                    const char *next_c = (const char *)(C + pair_word[p + ASMK_PREFETCH_AHEAD] * D);
                    for (int64_t b = 0; b < D * (int64_t)sizeof(float); b += 64) {
                        __builtin_prefetch(next_x + b);
                        __builtin_prefetch(next_c + b);
                    }
                }
                for (int64_t j = 0; j < D; ++j) acc[j] += x[j] - c[j];
            }
            {   /* finiteness probe: is some acc[j] NaN or inf? A non-finite descriptor
                   always makes its sums non-finite, so a finite acc proves its rows finite */
                uint32_t all_ones_exponent = 0;  /* bitwise, so that the loop vectorises */
                for (int64_t j = 0; j < D; ++j) {
                    uint32_t u;
                    memcpy(&u, acc + j, sizeof u);
                    all_ones_exponent |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
                }
                if (all_ones_exponent) {
                    for (int64_t p = group_starts[g]; p < end; ++p) {
                        const float *restrict x = X + pair_descriptor[p] * D;
                        for (int64_t j = 0; j < D; ++j)
                            if (!(x[j] - x[j] == 0.0f)) nonfinite = 1;
                    }
                }
            }
            if (binary) {
                uint64_t *restrict out = codes + g * W;
                for (int64_t k = 0; k < W; ++k) {
                    uint64_t bits = 0;
                    const int64_t stop = (k + 1) * 64 < D ? (k + 1) * 64 : D;
                    int64_t j = k * 64;
    #if defined(__SSE2__)
                    const __m128 zero = _mm_setzero_ps();
                    for (; j + 4 <= stop; j += 4) {  /* 4 sign bits at once, MSB first */
                        const int mask = _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(acc + j), zero));
                        bits |= (uint64_t)asmk_reverse4[mask] << (60 - (j & 63));
                    }
    #endif
                    for (; j < stop; ++j)
                        bits |= (uint64_t)(acc[j] > 0.0f) << (63 - (j & 63));
                    out[k] = bits;
                }
            } else {
                double norm = 0.0;
                for (int64_t j = 0; j < D; ++j) norm += (double)acc[j] * (double)acc[j];
                const float denominator = (float)sqrt(norm) + 1e-6f;
                float *restrict out = vecs + g * D;
                for (int64_t j = 0; j < D; ++j) out[j] = acc[j] / denominator;
            }
        }
        free(acc);
        }
        return failed ? -1 : (nonfinite ? 1 : 0);
    }

    /* Stable sort of n (word, descriptor) items by word (words < 2^bits): insertion sort for
       short runs, else LSD radix sort with digits of at most 8 bits; tmp_* are scratch of n. */
    static void asmk_sort_by_word(int64_t *w, int64_t *d, int64_t *tmp_w, int64_t *tmp_d,
                                  int64_t n, int bits) {
        if (n <= 48) {
            for (int64_t i = 1; i < n; ++i) {
                const int64_t kw = w[i], kd = d[i];
                int64_t j = i;
                while (j > 0 && w[j - 1] > kw) { w[j] = w[j - 1]; d[j] = d[j - 1]; --j; }
                w[j] = kw; d[j] = kd;
            }
            return;
        }
        const int passes = bits <= 0 ? 0 : (bits + 7) / 8;
        if (passes == 0) return;
        const int digit = (bits + passes - 1) / passes;
        const int64_t buckets = (int64_t)1 << digit;
        int64_t counts[256];
        int64_t *src_w = w, *src_d = d, *dst_w = tmp_w, *dst_d = tmp_d;
        for (int pass = 0; pass < passes; ++pass) {
            const int shift = pass * digit;
            for (int64_t b = 0; b < buckets; ++b) counts[b] = 0;
            for (int64_t i = 0; i < n; ++i) ++counts[(src_w[i] >> shift) & (buckets - 1)];
            int64_t total = 0;
            for (int64_t b = 0; b < buckets; ++b) { const int64_t c = counts[b]; counts[b] = total; total += c; }
            for (int64_t i = 0; i < n; ++i) {
                const int64_t at = counts[(src_w[i] >> shift) & (buckets - 1)]++;
                dst_w[at] = src_w[i]; dst_d[at] = src_d[i];
            }
            int64_t *t;
            t = src_w; src_w = dst_w; dst_w = t;
            t = src_d; src_d = dst_d; dst_d = t;
        }
        if (src_w != w) {
            for (int64_t i = 0; i < n; ++i) { w[i] = src_w[i]; d[i] = src_d[i]; }
        }
    }

    /* Group the (descriptor, word) pairs of every image run by word; see group_pairs(). Images
       are independent (each owns pair positions image_starts[i] * ma onwards), so threads share
       them; a prefix sum of the per-image group counts then numbers the groups. Returns the
       number of groups G, or -1 when out of memory. */
    static int64_t asmk_group_pairs(const int64_t *restrict words, int64_t ma,
                                    const int64_t *restrict descriptor_order,
                                    const int64_t *restrict image_starts, int64_t n_images,
                                    int bits, int64_t *restrict pair_descriptor,
                                    int64_t *restrict pair_word, int64_t *restrict group_starts,
                                    int64_t *restrict group_image) {
        int64_t longest = 0;
        for (int64_t i = 0; i < n_images; ++i) {
            const int64_t n = (image_starts[i + 1] - image_starts[i]) * ma;
            if (n > longest) longest = n;
        }
        int64_t *image_groups = (int64_t *)calloc((size_t)n_images + 1, sizeof(int64_t));
        if (image_groups == NULL) return -1;
        const int threads = asmk_threads_for(image_starts[n_images] * ma,
                                             ASMK_GROUP_PAIRS_PER_THREAD);
        int failed = 0;
    #ifdef _OPENMP
        #pragma omp parallel num_threads(threads) if(threads > 1) reduction(|:failed)
    #endif
        {
        int64_t *tmp = (int64_t *)malloc((size_t)(2 * longest + 2) * sizeof(int64_t));
        if (tmp == NULL) failed = 1;
    #ifdef _OPENMP
        #pragma omp for schedule(dynamic, 64)
    #endif
        for (int64_t i = 0; i < n_images; ++i) {
            if (tmp == NULL) continue;
            const int64_t first = image_starts[i] * ma;
            const int64_t n = (image_starts[i + 1] - image_starts[i]) * ma;
            int64_t *w = pair_word + first, *d = pair_descriptor + first;
            int64_t k = 0;
            for (int64_t t = image_starts[i]; t < image_starts[i + 1]; ++t) {
                const int64_t desc = descriptor_order ? descriptor_order[t] : t;
                for (int64_t a = 0; a < ma; ++a, ++k) { w[k] = words[desc * ma + a]; d[k] = desc; }
            }
            asmk_sort_by_word(w, d, tmp, tmp + longest + 1, n, bits);
            int64_t groups = 0;
            for (int64_t p = 0; p < n; ++p) groups += (p == 0 || w[p] != w[p - 1]);
            image_groups[i + 1] = groups;
        }
        free(tmp);
        }
        if (failed) { free(image_groups); return -1; }
        for (int64_t i = 0; i < n_images; ++i) image_groups[i + 1] += image_groups[i];
    #ifdef _OPENMP
        #pragma omp parallel for num_threads(threads) if(threads > 1) schedule(dynamic, 256)
    #endif
        for (int64_t i = 0; i < n_images; ++i) {
            const int64_t first = image_starts[i] * ma;
            const int64_t n = (image_starts[i + 1] - image_starts[i]) * ma;
            const int64_t *w = pair_word + first;
            int64_t g = image_groups[i];
            for (int64_t p = 0; p < n; ++p) {
                if (p == 0 || w[p] != w[p - 1]) { group_starts[g] = first + p; group_image[g] = i; ++g; }
            }
        }
        const int64_t G = image_groups[n_images];
        free(image_groups);
        return G;
    }

    static inline double asmk_selectivity(float u, double alpha, double threshold) {
        if ((double)u < threshold) return 0.0;
        if (alpha == 3.0) return (double)u * (double)u * (double)u;
        return pow((double)u, alpha);
    }

    static inline float asmk_dot(const float *a, const float *b, int64_t D) {
        float s = 0.0f;
        for (int64_t j = 0; j < D; ++j) s += a[j] * b[j];
        return s;
    }

    /* Full scan, real-valued (L2-normalised) aggregated vectors. */
    static void asmk_scan_float(const float *qvecs, const int64_t *qwords, const double *qweights,
                                int64_t nq, const int64_t *offsets, const float *vecs,
                                const uint32_t *docs, int64_t D, double alpha, double threshold,
                                double *acc) {
        for (int64_t i = 0; i < nq; ++i) {
            const float *q = qvecs + i * D;
            const int64_t w = qwords[i];
            for (int64_t p = offsets[w]; p < offsets[w + 1]; ++p) {
                const double s = asmk_selectivity(asmk_dot(q, vecs + p * D, D), alpha, threshold);
                if (s != 0.0) acc[docs[p]] += qweights[i] * s;
            }
        }
    }

    static void asmk_score_float(const float *qvecs, const int64_t *qwords, const double *qweights,
                                 int64_t nq, int64_t split, const int64_t *offsets, int64_t K,
                                 const float *vecs, int64_t D, const uint32_t *fwd_positions,
                                 const int64_t *fwd_offsets, const int64_t *local_docs,
                                 int64_t nc, double alpha, double threshold, double *out) {
        for (int64_t c = 0; c < nc; ++c) {
            const int64_t d = local_docs[c];
            double halves[2] = {0.0, 0.0};
            int64_t qi = 0;
            for (int64_t t = fwd_offsets[d]; t < fwd_offsets[d + 1]; ++t) {
                const int64_t pos = fwd_positions[t];
                while (qi < nq && offsets[qwords[qi] + 1] <= pos) ++qi;
                if (qi == nq) break;
                if (offsets[qwords[qi]] > pos) continue;
                const double s = asmk_selectivity(asmk_dot(qvecs + qi * D, vecs + pos * D, D),
                                                  alpha, threshold);
                if (s != 0.0) halves[qi >= split] += qweights[qi] * s;
            }
            out[c] = halves[0] + halves[1];
        }
    }
    /* Exact k nearest centroids, one block of centroids at a time: ip (rows, cols) inner products
       of descriptors with centroids col_offset.., col_norms their squared norms. Distances are
       ranked as |c|^2 - 2<x, c> (|x - c|^2 minus the row's constant |x|^2). best_d/best_i
       (rows, k) hold each row's running k nearest, ascending; a candidate enters only when
       strictly nearer than the current k-th, so ties keep the lower centroid id first. */
    #define ASMK_NEAREST_BLOCK 16
    static void asmk_merge_nearest(const float *restrict ip, int64_t rows, int64_t cols,
                                   int64_t ip_stride, const float *restrict col_norms,
                                   int64_t col_offset, int64_t k, float *restrict best_d,
                                   int64_t *restrict best_i) {
        /* one thread: ranking costs ~1/10 of the BLAS product that precedes it, and a second
           thread pool would contend with BLAS's own (measured 2x slower on 2 cores) */
        for (int64_t r = 0; r < rows; ++r) {
            const float *restrict line = ip + r * ip_stride;
            float *restrict bd = best_d + r * k;
            int64_t *restrict bi = best_i + r * k;
            float worst = bd[k - 1];
            for (int64_t j0 = 0; j0 < cols; j0 += ASMK_NEAREST_BLOCK) {
                const int64_t n = cols - j0 < ASMK_NEAREST_BLOCK ? cols - j0 : ASMK_NEAREST_BLOCK;
                float d[ASMK_NEAREST_BLOCK];
                int any = 0;  /* integer OR of comparisons: the block test vectorises */
                for (int64_t t = 0; t < n; ++t) {
                    d[t] = col_norms[j0 + t] - 2.0f * line[j0 + t];
                    any |= d[t] < worst;
                }
                if (!any) continue;
                for (int64_t t = 0; t < n; ++t) {
                    if (!(d[t] < worst)) continue;
                    int64_t at = k - 1;  /* insertion into the sorted list */
                    while (at > 0 && d[t] < bd[at - 1]) { bd[at] = bd[at - 1]; bi[at] = bi[at - 1]; --at; }
                    bd[at] = d[t];
                    bi[at] = col_offset + j0 + t;
                    worst = bd[k - 1];
                }
            }
        }
    }
    """
    int asmk_cpu_has_popcnt()
    int omp_threads "asmk_threads_for"(int64_t work, int64_t minimum) nogil
    void asmk_set_max_threads(int count) nogil
    void asmk_merge_nearest(const float *ip, int64_t rows, int64_t cols, int64_t ip_stride,
                            const float *col_norms, int64_t col_offset, int64_t k, float *best_d,
                            int64_t *best_i) nogil
    void asmk_scan_binary_popcnt(const uint64_t *qcodes, const int64_t *qwords,
                                 const double *qweights, int64_t nq, const int64_t *offsets,
                                 const uint64_t *codes, const uint32_t *docs, int64_t W,
                                 const double *lut, double *acc) nogil
    void asmk_scan_binary_generic(const uint64_t *qcodes, const int64_t *qwords,
                                  const double *qweights, int64_t nq, const int64_t *offsets,
                                  const uint64_t *codes, const uint32_t *docs, int64_t W,
                                  const double *lut, double *acc) nogil
    void asmk_score_binary_popcnt(const uint64_t *qcodes, const int64_t *qwords,
                                  const double *qweights, int64_t nq, int64_t split,
                                  const int64_t *offsets, int64_t K, const uint64_t *codes,
                                  int64_t W, const uint32_t *fwd_positions,
                                  const int64_t *fwd_offsets,
                                  const int64_t *local_docs, int64_t nc, const double *lut,
                                  double *out) nogil
    void asmk_score_binary_generic(const uint64_t *qcodes, const int64_t *qwords,
                                   const double *qweights, int64_t nq, int64_t split,
                                   const int64_t *offsets, int64_t K, const uint64_t *codes,
                                   int64_t W, const uint32_t *fwd_positions,
                                   const int64_t *fwd_offsets,
                                   const int64_t *local_docs, int64_t nc, const double *lut,
                                   double *out) nogil
    int64_t asmk_group_pairs(const int64_t *words, int64_t ma, const int64_t *descriptor_order,
                             const int64_t *image_starts, int64_t n_images, int bits,
                             int64_t *pair_descriptor, int64_t *pair_word, int64_t *group_starts,
                             int64_t *group_image) nogil
    int asmk_aggregate(const float *X, const float *C, int64_t D, const int64_t *pair_descriptor,
                       const int64_t *pair_word, const int64_t *group_starts, int64_t G,
                       int64_t n_pairs, int binary, uint64_t *codes, float *vecs) nogil
    void asmk_scan_float(const float *qvecs, const int64_t *qwords, const double *qweights,
                         int64_t nq, const int64_t *offsets, const float *vecs,
                         const uint32_t *docs, int64_t D, double alpha, double threshold,
                         double *acc) nogil
    void asmk_score_float(const float *qvecs, const int64_t *qwords, const double *qweights,
                          int64_t nq, int64_t split, const int64_t *offsets, int64_t K,
                          const float *vecs, int64_t D, const uint32_t *fwd_positions,
                          const int64_t *fwd_offsets,
                          const int64_t *local_docs, int64_t nc, double alpha, double threshold,
                          double *out) nogil

cdef extern from "_nearest_bf16.h":
    ctypedef struct asmk_bf16_stats:
        double max_rounding_norm
        double max_rounded_norm
        double max_squared_norm
    int ASMK_BF16_CENTROID_ALIGN
    int ASMK_BF16_STEP
    int ASMK_BF16_ROWS_PER_BLOCK
    int asmk_bf16_amx_usable() nogil
    void asmk_bf16_pack_centroids(const float *centroids, int64_t K, int64_t D, uint16_t *packed,
                                  float *half_norms, asmk_bf16_stats *stats) nogil
    int asmk_bf16_nearest(const float *descriptors, int64_t n, const float *centroids, int64_t K,
                          int64_t D, const uint16_t *packed, const float *half_norms,
                          const asmk_bf16_stats *stats, int64_t k, int use_amx, int threads,
                          int64_t *out, int64_t *n_exact_rows, int64_t *n_candidates) nogil

import numpy as np

cdef bint _HAS_POPCNT = asmk_cpu_has_popcnt() != 0
# bytes below which a row copy (scatter, segment merge) runs on one thread
cdef int64_t COPY_BYTES_PER_THREAD = 1 << 20


def max_threads():
    """Threads the compiled loops may use (OpenMP's limit, e.g. OMP_NUM_THREADS; 1 when the
    kernels were built without OpenMP)."""
    return omp_threads(1 << 62, 1)


def set_max_threads(int count):
    """Limit the compiled loops to ``count`` (>= 1) threads: the calling thread's OpenMP limit,
    which other OpenMP code of the process sharing the runtime (torch's CPU ops) also reads. No
    effect without OpenMP. Results do not depend on it."""
    if count < 1:
        raise ValueError(f"thread count must be >= 1, got {count}")
    asmk_set_max_threads(count)


def has_popcnt():
    """Whether the scans use the CPU's popcnt instruction (else a portable bit count)."""
    return bool(_HAS_POPCNT)


def stable_argsort_by(const int64_t[::1] keys, int64_t n_keys, const int64_t[::1] order):
    """Return ``order`` stably re-sorted by ``keys[order]`` (counting sort, O(n + n_keys)).

    keys: (N,) int64 in [0, n_keys); order: (M,) int64 indices into keys. Returns (M,) int64.
    """
    cdef Py_ssize_t m = order.shape[0], i
    cdef int64_t k
    counts_array = np.zeros(n_keys + 1, dtype=np.int64)
    result = np.empty(m, dtype=np.int64)
    cdef int64_t[::1] counts = counts_array
    cdef int64_t[::1] out = result
    with nogil:
        for i in range(m):
            counts[keys[order[i]] + 1] += 1
        for k in range(n_keys):
            counts[k + 1] += counts[k]
        for i in range(m):
            k = keys[order[i]]
            out[counts[k]] = order[i]
            counts[k] += 1
    return result


def group_pairs(const int64_t[:, ::1] words, const int64_t[::1] image_starts, int64_t n_words,
                descriptor_order=None):
    """Group the (descriptor, word) pairs of every image by word, keeping descriptor order.

    words: (N, ma) int64 in [0, n_words); image_starts: (n_images + 1,) int64, image ``i`` owns
    positions ``image_starts[i] .. image_starts[i+1]-1`` of ``descriptor_order`` (N,) int64
    (``None``: the identity, i.e. each image's descriptors are contiguous). Returns
    (pair_descriptor (P,), pair_word (P,), group_starts (G,), group_image (G,)), all int64,
    P = N * ma: pairs sorted by (image, word), stable, and the first pair and image of every
    (image, word) group. Each image is sorted on its own (cache-resident radix sort).
    """
    cdef int64_t n = words.shape[0], ma = words.shape[1]
    cdef int64_t n_images = image_starts.shape[0] - 1
    cdef int64_t n_pairs = n * ma
    cdef int bits = 0
    while (<int64_t>1 << bits) < n_words:
        bits += 1
    cdef const int64_t[::1] order_view
    cdef const int64_t *order_pointer = NULL
    if descriptor_order is not None:
        order_view = descriptor_order
        if order_view.shape[0] != n:
            raise ValueError("descriptor_order must have one entry per descriptor")
        if n:
            order_pointer = &order_view[0]
    if n_images < 0 or image_starts[0] != 0 or image_starts[n_images] != n:
        raise ValueError("image_starts must run from 0 to the number of descriptors")
    pair_descriptor_array = np.empty(n_pairs, dtype=np.int64)
    pair_word_array = np.empty(n_pairs, dtype=np.int64)
    group_starts_array = np.empty(n_pairs, dtype=np.int64)
    group_image_array = np.empty(n_pairs, dtype=np.int64)
    if n_pairs == 0:
        return pair_descriptor_array, pair_word_array, group_starts_array, group_image_array
    cdef int64_t[::1] pair_descriptor = pair_descriptor_array, pair_word = pair_word_array
    cdef int64_t[::1] group_starts = group_starts_array, group_image = group_image_array
    cdef int64_t G
    with nogil:
        G = asmk_group_pairs(&words[0, 0], ma, order_pointer, &image_starts[0], n_images, bits,
                             &pair_descriptor[0], &pair_word[0], &group_starts[0],
                             &group_image[0])
    if G < 0:
        raise MemoryError("group_pairs: no memory for the sort buffers")
    return (pair_descriptor_array, pair_word_array, group_starts_array[:G].copy(),
            group_image_array[:G].copy())


def word_major_positions(const int64_t[::1] words, int64_t n_words):
    """Stable counting sort of postings by word: (offsets (n_words + 1,) int64, position (n,)
    int64 = where every posting goes in word-major order)."""
    cdef Py_ssize_t n = words.shape[0], i
    cdef int64_t k
    offsets_array = np.zeros(n_words + 1, dtype=np.int64)
    position_array = np.empty(n, dtype=np.int64)
    cursor_array = np.empty(n_words, dtype=np.int64)
    cdef int64_t[::1] offsets = offsets_array, position = position_array, cursor = cursor_array
    with nogil:
        for i in range(n):
            offsets[words[i] + 1] += 1
        for k in range(n_words):
            offsets[k + 1] += offsets[k]
            cursor[k] = offsets[k]
        for i in range(n):
            k = words[i]
            position[i] = cursor[k]
            cursor[k] += 1
    return offsets_array, position_array


def aggregate_residuals(const float[:, ::1] descriptors, const float[:, ::1] centroids,
                        const int64_t[::1] pair_descriptor, const int64_t[::1] pair_word,
                        const int64_t[::1] group_starts, bint binary, bint report_finite=False):
    """Sum residuals per group of (descriptor, word) pairs and binarise or L2-normalise them.

    Pairs are ordered so that each group (one image and word) is a run starting at
    ``group_starts[g]`` (the last group ends at the number of pairs); within a run the residuals
    ``x - c_word`` are summed as float32 in the given order. Returns (G, ceil(D/64)) uint64 packed
    sign bits (bit set where the sum > 0) when ``binary``, else (G, D) float32 ``v / (|v| + 1e-6)``;
    with ``report_finite`` the pair (vectors, whether every descriptor row read was finite).
    """
    cdef int64_t D = descriptors.shape[1]
    cdef int64_t G = group_starts.shape[0]
    cdef int64_t n_pairs = pair_descriptor.shape[0]
    cdef int64_t W = (D + 63) // 64
    codes_array = np.zeros((G if binary else 0, W), dtype=np.uint64)
    vecs_array = np.zeros((0 if binary else G, D), dtype=np.float32)
    cdef uint64_t[:, ::1] codes = codes_array
    cdef float[:, ::1] vecs = vecs_array
    cdef uint64_t *codes_pointer = NULL
    cdef float *vecs_pointer = NULL
    if G == 0:
        return ((codes_array if binary else vecs_array), True) if report_finite else \
            (codes_array if binary else vecs_array)
    if binary:
        codes_pointer = &codes[0, 0]
    else:
        vecs_pointer = &vecs[0, 0]
    cdef int status
    with nogil:
        status = asmk_aggregate(&descriptors[0, 0], &centroids[0, 0], D, &pair_descriptor[0],
                                &pair_word[0], &group_starts[0], G, n_pairs, binary,
                                codes_pointer, vecs_pointer)
    if status < 0:
        raise MemoryError("aggregate_residuals: no memory for the accumulators")
    result = codes_array if binary else vecs_array
    return (result, status == 0) if report_finite else result


cdef void _scan_binary_words(const uint64_t *query_codes, const int64_t *query_words,
                             const double *query_weights, int64_t first, int64_t last,
                             const int64_t *offsets, const uint64_t *codes, const uint32_t *docs,
                             int64_t W, const double *lut, double *acc) noexcept nogil:
    """acc[doc] += weight_i * lut[hamming(q_i, code)] for query words first..last-1."""
    if last <= first:
        return
    if _HAS_POPCNT:
        asmk_scan_binary_popcnt(query_codes + first * W, query_words + first, query_weights + first,
                                last - first, offsets, codes, docs, W, lut, acc)
    else:
        asmk_scan_binary_generic(query_codes + first * W, query_words + first,
                                 query_weights + first, last - first, offsets, codes, docs, W, lut,
                                 acc)


def scan_binary(const uint64_t[:, ::1] query_codes, const int64_t[::1] query_words,
                const double[::1] query_weights, int64_t split, const int64_t[::1] offsets,
                const uint64_t[:, ::1] codes, const uint32_t[::1] docs, const double[::1] lut,
                double[::1] first_half, double[::1] second_half, int threads):
    """first_half[doc] += weight_i * lut[hamming(q_i, code)] over every posting of the query
    words i < split, second_half[doc] likewise for i >= split (the caller adds the two, as
    score_binary does). With ``threads`` >= 2 the halves are scanned by two threads at once."""
    cdef int64_t nq = query_codes.shape[0], W = query_codes.shape[1]
    cdef Py_ssize_t half
    if nq == 0 or codes.shape[0] == 0:
        return
    if not 0 <= split <= nq:
        raise ValueError(f"split must be in [0, {nq}], got {split}")
    with nogil:
        if threads >= 2:
            for half in prange(2, num_threads=2, schedule="static"):
                if half == 0:
                    _scan_binary_words(&query_codes[0, 0], &query_words[0], &query_weights[0], 0,
                                       split, &offsets[0], &codes[0, 0], &docs[0], W, &lut[0],
                                       &first_half[0])
                else:
                    _scan_binary_words(&query_codes[0, 0], &query_words[0], &query_weights[0],
                                       split, nq, &offsets[0], &codes[0, 0], &docs[0], W,
                                       &lut[0], &second_half[0])
        else:
            _scan_binary_words(&query_codes[0, 0], &query_words[0], &query_weights[0], 0, split,
                               &offsets[0], &codes[0, 0], &docs[0], W, &lut[0], &first_half[0])
            _scan_binary_words(&query_codes[0, 0], &query_words[0], &query_weights[0], split, nq,
                               &offsets[0], &codes[0, 0], &docs[0], W, &lut[0], &second_half[0])


def score_binary(const uint64_t[:, ::1] query_codes, const int64_t[::1] query_words,
                 const double[::1] query_weights, int64_t split, const int64_t[::1] offsets,
                 const uint64_t[:, ::1] codes, const uint32_t[::1] fwd_positions,
                 const int64_t[::1] fwd_offsets, const int64_t[::1] local_docs,
                 const double[::1] lut, double[::1] out):
    """out[c] = sum over shared words of weight * lut[hamming], for segment-local docs only; the
    words before ``split`` and from it summed apart, then added (scan_binary's arithmetic)."""
    cdef int64_t nq = query_codes.shape[0], W = query_codes.shape[1]
    cdef int64_t K = offsets.shape[0] - 1, nc = local_docs.shape[0]
    if nc == 0:
        return
    if nq == 0 or codes.shape[0] == 0:
        out[:] = 0.0
        return
    with nogil:
        if _HAS_POPCNT:
            asmk_score_binary_popcnt(&query_codes[0, 0], &query_words[0], &query_weights[0], nq,
                                     split, &offsets[0], K, &codes[0, 0], W, &fwd_positions[0],
                                     &fwd_offsets[0], &local_docs[0], nc, &lut[0], &out[0])
        else:
            asmk_score_binary_generic(&query_codes[0, 0], &query_words[0], &query_weights[0], nq,
                                      split, &offsets[0], K, &codes[0, 0], W, &fwd_positions[0],
                                      &fwd_offsets[0], &local_docs[0], nc, &lut[0], &out[0])


cdef void _scan_float_words(const float *query_vecs, const int64_t *query_words,
                            const double *query_weights, int64_t first, int64_t last,
                            const int64_t *offsets, const float *vecs, const uint32_t *docs,
                            int64_t D, double alpha, double threshold,
                            double *acc) noexcept nogil:
    """acc[doc] += weight_i * sigma(<q_i, v>) for query words first..last-1."""
    if last > first:
        asmk_scan_float(query_vecs + first * D, query_words + first, query_weights + first,
                        last - first, offsets, vecs, docs, D, alpha, threshold, acc)


def scan_float(const float[:, ::1] query_vecs, const int64_t[::1] query_words,
               const double[::1] query_weights, int64_t split, const int64_t[::1] offsets,
               const float[:, ::1] vecs, const uint32_t[::1] docs, double alpha,
               double threshold, double[::1] first_half, double[::1] second_half, int threads):
    """scan_binary for real-valued aggregated vectors: weight_i * sigma(<q_i, v>)."""
    cdef int64_t nq = query_vecs.shape[0], D = query_vecs.shape[1]
    cdef Py_ssize_t half
    if nq == 0 or vecs.shape[0] == 0:
        return
    if not 0 <= split <= nq:
        raise ValueError(f"split must be in [0, {nq}], got {split}")
    with nogil:
        if threads >= 2:
            for half in prange(2, num_threads=2, schedule="static"):
                if half == 0:
                    _scan_float_words(&query_vecs[0, 0], &query_words[0], &query_weights[0], 0,
                                      split, &offsets[0], &vecs[0, 0], &docs[0], D, alpha,
                                      threshold, &first_half[0])
                else:
                    _scan_float_words(&query_vecs[0, 0], &query_words[0], &query_weights[0],
                                      split, nq, &offsets[0], &vecs[0, 0], &docs[0], D, alpha,
                                      threshold, &second_half[0])
        else:
            _scan_float_words(&query_vecs[0, 0], &query_words[0], &query_weights[0], 0, split,
                              &offsets[0], &vecs[0, 0], &docs[0], D, alpha, threshold,
                              &first_half[0])
            _scan_float_words(&query_vecs[0, 0], &query_words[0], &query_weights[0], split, nq,
                              &offsets[0], &vecs[0, 0], &docs[0], D, alpha, threshold,
                              &second_half[0])


def score_float(const float[:, ::1] query_vecs, const int64_t[::1] query_words,
                const double[::1] query_weights, int64_t split, const int64_t[::1] offsets,
                const float[:, ::1] vecs, const uint32_t[::1] fwd_positions,
                const int64_t[::1] fwd_offsets, const int64_t[::1] local_docs, double alpha,
                double threshold, double[::1] out):
    """Forward-index scoring of segment-local docs for real-valued aggregated vectors (halves
    split as in score_binary)."""
    cdef int64_t nq = query_vecs.shape[0], D = query_vecs.shape[1]
    cdef int64_t K = offsets.shape[0] - 1, nc = local_docs.shape[0]
    if nc == 0:
        return
    if nq == 0 or vecs.shape[0] == 0:
        out[:] = 0.0
        return
    with nogil:
        asmk_score_float(&query_vecs[0, 0], &query_words[0], &query_weights[0], nq, split,
                         &offsets[0], K, &vecs[0, 0], D, &fwd_positions[0], &fwd_offsets[0],
                         &local_docs[0], nc, alpha, threshold, &out[0])


def merge_nearest(const float[:, :] inner_products, const float[::1] centroid_norms,
                  int64_t first_centroid, float[:, ::1] best_distances, int64_t[:, ::1] best_ids):
    """Fold one block of inner products into running k-nearest-centroid lists.

    inner_products (rows, cols) float32 (rows C-contiguous; may be a slice of a wider buffer):
    <x_r, c_j> for centroids ``first_centroid + j``; centroid_norms (cols,) their squared norms.
    best_distances / best_ids (rows, k): each row's k smallest ``|c|^2 - 2 <x, c>`` so far,
    ascending (start with +inf / -1); updated in place. Ties keep the lower centroid id first.
    """
    cdef int64_t rows = inner_products.shape[0], cols = inner_products.shape[1]
    cdef int64_t k = best_distances.shape[1]
    if centroid_norms.shape[0] != cols or best_distances.shape[0] != rows or \
            best_ids.shape[0] != rows or best_ids.shape[1] != k or k < 1:
        raise ValueError("merge_nearest: shapes differ")
    if cols > 1 and inner_products.strides[1] != sizeof(float):
        raise ValueError("merge_nearest: inner product rows must be contiguous")
    if rows == 0 or cols == 0:
        return
    with nogil:
        asmk_merge_nearest(&inner_products[0, 0], rows, cols,
                           inner_products.strides[0] // sizeof(float), &centroid_norms[0],
                           first_centroid, k, &best_distances[0, 0], &best_ids[0, 0])


cdef inline bint _ranks_before(double score_a, int64_t id_a, double score_b,
                               int64_t id_b) noexcept nogil:
    """Whether a ranks before b: higher score, then lower id."""
    return score_a > score_b or (score_a == score_b and id_a < id_b)


cdef void _sift_down(double *score, int64_t *id_, int64_t *pos, Py_ssize_t size,
                     Py_ssize_t at) noexcept nogil:
    """Restore the heap below ``at``: every parent ranks after its children (root = worst)."""
    cdef Py_ssize_t child, worst
    while True:
        worst = at
        child = 2 * at + 1
        if child < size and _ranks_before(score[worst], id_[worst], score[child], id_[child]):
            worst = child
        if child + 1 < size and _ranks_before(score[worst], id_[worst], score[child + 1],
                                              id_[child + 1]):
            worst = child + 1
        if worst == at:
            return
        score[at], score[worst] = score[worst], score[at]
        id_[at], id_[worst] = id_[worst], id_[at]
        pos[at], pos[worst] = pos[worst], pos[at]
        at = worst


def top_k(const double[::1] scores, const int64_t[::1] ids, Py_ssize_t k):
    """Positions (min(k, n),) int64 of the k best scores, best first, ties by the lower id.

    One pass with a k-entry heap whose root is the worst kept (O(n + k log k) for typical
    inputs); NaN scores never enter.
    """
    cdef Py_ssize_t n = scores.shape[0], size = 0, i, last
    if ids.shape[0] != n:
        raise ValueError("top_k: scores and ids differ in length")
    if k < 0:
        raise ValueError(f"top_k: k must be >= 0, got {k}")
    k = min(k, n)
    heap_score_array = np.empty(k, dtype=np.float64)
    heap_id_array = np.empty(k, dtype=np.int64)
    heap_pos_array = np.empty(k, dtype=np.int64)
    if k == 0:
        return heap_pos_array
    cdef double[::1] heap_score = heap_score_array
    cdef int64_t[::1] heap_id = heap_id_array, heap_pos = heap_pos_array
    with nogil:
        for i in range(n):
            if scores[i] != scores[i]:
                continue
            if size < k:  # fill, then heapify once full
                heap_score[size] = scores[i]
                heap_id[size] = ids[i]
                heap_pos[size] = i
                size += 1
                if size == k:
                    for last in range(k // 2 - 1, -1, -1):
                        _sift_down(&heap_score[0], &heap_id[0], &heap_pos[0], k, last)
            elif _ranks_before(scores[i], ids[i], heap_score[0], heap_id[0]):
                heap_score[0] = scores[i]
                heap_id[0] = ids[i]
                heap_pos[0] = i
                _sift_down(&heap_score[0], &heap_id[0], &heap_pos[0], k, 0)
        if size < k:  # fewer non-NaN scores than k
            for last in range(size // 2 - 1, -1, -1):
                _sift_down(&heap_score[0], &heap_id[0], &heap_pos[0], size, last)
        # pop the worst to the back, one at a time: best first at the end
        last = size - 1
        while last > 0:
            heap_score[0], heap_score[last] = heap_score[last], heap_score[0]
            heap_id[0], heap_id[last] = heap_id[last], heap_id[0]
            heap_pos[0], heap_pos[last] = heap_pos[last], heap_pos[0]
            _sift_down(&heap_score[0], &heap_id[0], &heap_pos[0], last, 0)
            last -= 1
    return heap_pos_array[:size]


def scatter_rows(const unsigned char[:, ::1] rows, const int64_t[::1] position,
                 unsigned char[:, ::1] out):
    """out[position[i]] = rows[i] for every row (byte views of any C-contiguous rows); position
    must be a permutation of range(len(out)). Rows are shared among threads."""
    cdef Py_ssize_t n = rows.shape[0], i
    cdef Py_ssize_t width = rows.shape[1]
    if n != position.shape[0] or n != out.shape[0] or width != out.shape[1]:
        raise ValueError("scatter_rows: shapes differ")
    if n == 0 or width == 0:
        return
    cdef int threads = omp_threads(n * width, COPY_BYTES_PER_THREAD)
    for i in prange(n, nogil=True, num_threads=threads, schedule="static"):
        memcpy(&out[position[i], 0], &rows[i, 0], width)


def gather_positions(const int64_t[::1] table, const uint32_t[::1] index, uint32_t[::1] out):
    """out[i] = table[index[i]] (uint32; the caller guarantees the values fit)."""
    cdef Py_ssize_t n = index.shape[0], i
    if out.shape[0] != n:
        raise ValueError("gather_positions: shapes differ")
    cdef int threads = omp_threads(n * 8, COPY_BYTES_PER_THREAD)
    for i in prange(n, nogil=True, num_threads=threads, schedule="static"):
        out[i] = <uint32_t>table[index[i]]


cdef inline void _copy_run(unsigned char *out, const unsigned char *rows, int64_t count,
                           int64_t width, int64_t *position, int64_t first) noexcept nogil:
    """Copy ``count`` rows of ``width`` bytes and record where row i went (first + i)."""
    cdef int64_t i
    memcpy(out, rows, count * width)
    for i in range(count):
        position[i] = first + i


def merge_postings(const int64_t[::1] first_offsets, const unsigned char[:, ::1] first_rows,
                   const int64_t[::1] second_offsets, const unsigned char[:, ::1] second_rows,
                   unsigned char[:, ::1] out_rows, int64_t[::1] first_position,
                   int64_t[::1] second_position):
    """Interleave two word-major posting tables (rows as bytes: a doc id, a code, ...): per word,
    the first table's rows then the second's. Writes ``out_rows`` (n1 + n2, width) and where every
    row went (``first_position`` (n1,), ``second_position`` (n2,)). Word w starts at
    ``first_offsets[w] + second_offsets[w]``, so words are shared among threads."""
    cdef Py_ssize_t K = first_offsets.shape[0] - 1, w
    cdef Py_ssize_t width = out_rows.shape[1]
    cdef int64_t pos, start, count, second_pos
    if second_offsets.shape[0] != K + 1 or out_rows.shape[0] != first_rows.shape[0] + \
            second_rows.shape[0] or first_position.shape[0] != first_rows.shape[0] or \
            second_position.shape[0] != second_rows.shape[0]:
        raise ValueError("merge_postings: shapes differ")
    cdef int threads = omp_threads(out_rows.shape[0] * width, COPY_BYTES_PER_THREAD)
    for w in prange(K, nogil=True, num_threads=threads, schedule="guided"):
        pos = first_offsets[w] + second_offsets[w]
        start = first_offsets[w]
        count = first_offsets[w + 1] - start
        if count > 0:
            _copy_run(&out_rows[pos, 0], &first_rows[start, 0], count, width,
                      &first_position[start], pos)
        second_pos = pos + count
        start = second_offsets[w]
        count = second_offsets[w + 1] - start
        if count > 0:
            _copy_run(&out_rows[second_pos, 0], &second_rows[start, 0], count, width,
                      &second_position[start], second_pos)


# proximities (descriptors x centroids) per OpenMP thread, at least, in the bfloat16-prefiltered
# nearest-centroid search (about 30 us of one core's work; threads share blocks of
# ASMK_BF16_ROWS_PER_BLOCK descriptors): a query's 250 descriptors x 4096 words take 2 threads
# (quantization 0.72 against 1.4 ms, the whole search 2.2 against 3.0 ms on 2 cores: no BLAS
# thread pool spins here)
cdef int64_t BF16_WORK_PER_THREAD = 1 << 16


cdef inline int64_t _round_up(int64_t value, int64_t step) noexcept nogil:
    return (value + step - 1) // step * step


def bf16_amx_usable():
    """Whether the bfloat16 prefilter can run on AMX tiles here (built with the AMX kernel, a CPU
    with AMX-BF16, and the OS granted this process the tile state)."""
    return asmk_bf16_amx_usable() != 0


def bf16_pack_centroids(const float[:, ::1] centroids):
    """Pack (K, D) float32 centroids for :func:`bf16_nearest`.

    Returns (packed, half_norms, stats): packed (Kp * Dp,) uint16 bfloat16 tiles, half_norms (Kp,)
    float32 ``-|c|^2 / 2`` (NaN padding), stats (max |c - bf16(c)|, max |bf16(c)|, max |c|^2);
    Kp = K rounded up to 32, Dp = D rounded up to 32.
    """
    cdef int64_t K = centroids.shape[0], D = centroids.shape[1]
    if K < 1 or D < 1:
        raise ValueError("bf16_pack_centroids: need at least one centroid and one dimension")
    cdef int64_t Kp = _round_up(K, ASMK_BF16_CENTROID_ALIGN), Dp = _round_up(D, ASMK_BF16_STEP)
    packed_array = np.empty(Kp * Dp, dtype=np.uint16)
    norms_array = np.empty(Kp, dtype=np.float32)
    cdef uint16_t[::1] packed = packed_array
    cdef float[::1] norms = norms_array
    cdef asmk_bf16_stats stats
    with nogil:
        asmk_bf16_pack_centroids(&centroids[0, 0], K, D, &packed[0], &norms[0], &stats)
    return packed_array, norms_array, (stats.max_rounding_norm, stats.max_rounded_norm,
                                       stats.max_squared_norm)


def bf16_nearest(const float[:, ::1] descriptors, const float[:, ::1] centroids,
                 const uint16_t[::1] packed, const float[::1] half_norms, tuple stats,
                 int64_t k, bint use_amx):
    """Exact k nearest centroids (squared L2, ties to the lower id) of (N, D) float32 descriptors,
    prefiltered in bfloat16 (``use_amx``: AMX tiles, else the portable loop; same result).

    packed, half_norms, stats: from :func:`bf16_pack_centroids` of ``centroids`` (K, D).
    Returns (ids (N, k) int64 nearest first, rows ranked over every centroid, candidates ranked
    exactly over the other rows).
    """
    cdef int64_t n = descriptors.shape[0], D = descriptors.shape[1], K = centroids.shape[0]
    cdef int64_t Kp = _round_up(K, ASMK_BF16_CENTROID_ALIGN), Dp = _round_up(D, ASMK_BF16_STEP)
    if centroids.shape[1] != D:
        raise ValueError(f"bf16_nearest: descriptors have {D} dimensions, centroids "
                         f"{centroids.shape[1]}")
    if packed.shape[0] != Kp * Dp or half_norms.shape[0] != Kp or len(stats) != 3:
        raise ValueError("bf16_nearest: packed centroids do not match the centroids")
    if not 1 <= k <= K:
        raise ValueError(f"k must be in [1, {K}], got {k}")
    out_array = np.empty((n, k), dtype=np.int64)
    if n == 0:
        return out_array, 0, 0
    cdef int64_t[:, ::1] out = out_array
    cdef asmk_bf16_stats c_stats
    c_stats.max_rounding_norm, c_stats.max_rounded_norm, c_stats.max_squared_norm = stats
    cdef int threads = omp_threads(n * Kp, BF16_WORK_PER_THREAD)
    threads = min(threads, _round_up(n, ASMK_BF16_ROWS_PER_BLOCK) // ASMK_BF16_ROWS_PER_BLOCK)
    cdef int64_t exact_rows = 0, candidates = 0
    cdef int status
    with nogil:
        status = asmk_bf16_nearest(&descriptors[0, 0], n, &centroids[0, 0], K, D, &packed[0],
                                   &half_norms[0], &c_stats, k, use_amx, threads, &out[0, 0],
                                   &exact_rows, &candidates)
    if status == -2:
        raise RuntimeError("bf16_nearest: AMX is not usable on this machine (bf16_amx_usable())")
    if status != 0:
        raise MemoryError("bf16_nearest: out of memory for the per-thread workspaces")
    return out_array, exact_rows, candidates

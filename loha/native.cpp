// The fused CPU kernels of loha/math.py's stacked build and its gradients, fp32: each reads W (or G) and the
// small factors once and never writes the pair P1 = W1a·W1b, P2 = W2a·W2b, which math.py's torch form writes,
// multiplies and reads back through memory (BENCHMARKS.md section 2, lever 25). Built on first use by
// loha/native.py and called through ctypes; math.py stays the reference every test compares these with.
//
// Layout (all contiguous): a (n, 2, O, R) and b (n, 2, R, I) are the stacked factors, half 1 at index 0;
// w and g are n pointers to (O, I) matrices; out (n, O, I); da, db like a, b; coef (n, O) or null for c.
//     out = W + coef·P1⊙P2        ∂P1 = coef·G⊙P2   ∂P2 = coef·G⊙P1   ∂Wka = ∂Pk·Wkbᵀ   ∂Wkb = Wkaᵀ·∂Pk
#include <cstdint>
#include <cstring>

namespace {

// The gradient kernel's vector width V and rows a block, by target: its M·R vector accumulators of ∂Wka must
// live in registers, or every FMA pays a spill. AVX-512 (32 registers of 16): 4 rows, measured best on a
// Zen 4 (2, 3 and 4 within 2 %). AVX2 (16 registers of 8): 1 row of 8 lanes, measured on a Zen 3: the tiny
// UNet's 263 layers at rank 8 take 9.3 ms where 16 lanes and 4 rows (the AVX-512 shape, twice the registers
// there are) took 28, and 8 lanes with 2 or 4 rows 11.4 and 13.6. Elsewhere one register of 4 lanes: 2 rows
// with NEON's 32 registers, 1 with SSE's 16, by the same count, not measured. -DLOHA_LANES / -DLOHA_ROWS
// override (tests/test_native.py builds each of the four shapes on any machine).
#ifndef LOHA_LANES
#if defined(__AVX512F__)
#define LOHA_LANES 16
#define LOHA_ROWS 4
#elif defined(__AVX__)
#define LOHA_LANES 8
#define LOHA_ROWS 1
#elif defined(__aarch64__)
#define LOHA_LANES 4
#define LOHA_ROWS 2
#else
#define LOHA_LANES 4
#define LOHA_ROWS 1
#endif
#endif
constexpr int V = LOHA_LANES;
constexpr int ROWS = LOHA_ROWS;
static_assert(V == 4 || V == 8 || V == 16, "LOHA_LANES must be 4, 8 or 16");
static_assert(ROWS >= 1 && ROWS <= 8, "LOHA_ROWS must be 1 to 8");
typedef float v16 __attribute__((vector_size(64)));  // the build's: AVX-512, two AVX2 or four NEON registers
typedef float vg __attribute__((vector_size(4 * V)));  // the gradient kernel's
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline vg loadg(const float* p) { vg v; std::memcpy(&v, p, sizeof v); return v; }
inline void storeg(float* p, vg v) { std::memcpy(p, &v, sizeof v); }
inline float sum4(v4 a) { return (a[0] + a[2]) + (a[1] + a[3]); }
inline float sum8(v8 v) {
  v4 a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
  return sum4(a + b);
}
inline float lanes_sum(vg v) {  // by halves: a few vector adds, not V lane extractions
  if constexpr (V == 16) {
    v8 lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return sum8(lo + hi);
  } else if constexpr (V == 8) {
    v8 x;
    std::memcpy(&x, &v, sizeof x);
    return sum8(x);
  } else {
    v4 x;
    std::memcpy(&x, &v, sizeof x);
    return sum4(x);
  }
}

// One layer's W + coef·P1⊙P2: per row o and 16 columns, both products in registers from R broadcasts.
template <int R>
void build_layer(const float* __restrict__ w, const float* __restrict__ a, const float* __restrict__ b,
                 const float* coef, float c, float* __restrict__ out, int64_t O, int64_t I) {
  const float* a2 = a + O * R;
  const float* b2 = b + R * I;
  const int64_t full = I / 16 * 16;
  for (int64_t o = 0; o < O; ++o) {
    const float* r1 = a + o * R;
    const float* r2 = a2 + o * R;
    const float k = coef ? coef[o] : c;
    const int64_t ahead = (o + 2 < O ? o + 2 : o) * I;  // W and out stream from memory: fetch two rows ahead
    for (int64_t i = 0; i < full; i += 16) {
      v16 p1 = r1[0] * load(b + i), p2 = r2[0] * load(b2 + i);
      for (int j = 1; j < R; ++j) { p1 += r1[j] * load(b + j * I + i); p2 += r2[j] * load(b2 + j * I + i); }
      __builtin_prefetch(w + ahead + i);  // -0.3 to -0.5 ms a step (tiny UNet, lever 29)
      __builtin_prefetch(out + ahead + i, 1);
      store(out + o * I + i, load(w + o * I + i) + k * p1 * p2);
    }
    for (int64_t i = full; i < I; ++i) {
      float p1 = 0.f, p2 = 0.f;
      for (int j = 0; j < R; ++j) { p1 += r1[j] * b[j * I + i]; p2 += r2[j] * b2[j * I + i]; }
      out[o * I + i] = w[o * I + i] + k * p1 * p2;
    }
  }
}

// One half k's factor gradients for M consecutive rows: ∂Pk = coef·G⊙(the other half's product, recomputed
// in registers), ∂Wka's M rows summed in vector accumulators, ∂Wkb's R rows (in cache) updated once for the
// M rows (ROWS, by target, above). On AVX-512, M = 4 reads and writes ∂Wkb a quarter as often as row by row:
// 1.75 vs 2.9 ns an element at rank 8.
// The factor rows are read through pointers the loop cannot prove invariant, so their 2·M·R broadcasts stay
// memory operands of the FMAs instead of being hoisted into registers and spilled: 4.9 -> 4.1 ms for the
// tiny UNet's 263 layers (AMD EPYC, rank 8). A transposing tree for the closing lane sums gained 3 %: not kept.
template <int R, int M>
void half_rows(const float* __restrict__ g, const float* next, const float* k, const float* __restrict__ own_a,
               const float* __restrict__ own_b, const float* __restrict__ other_a, const float* __restrict__ other_b,
               float* __restrict__ da, float* __restrict__ db, int64_t I) {
  const int64_t full = I / V * V;
  vg s[M][R];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < R; ++j) s[m][j] = vg{};
  for (int64_t i = 0; i < full; i += V) {
    const float* oa = other_a;
    const float* wa = own_a;
    __asm__("" : "+r"(oa), "+r"(wa));  // no hoisting of the 2·M·R broadcasts out of the loop (they would spill)
    vg d[M];
    // G was written long before this backward reads it (a stack's layers are spread over the UNet): the
    // next block's rows are fetched while this one computes: -0.1 to -0.7 ms a step (tiny UNet, lever 29)
    for (int m = 0; m < M; ++m) __builtin_prefetch(next + m * I + i);
    for (int m = 0; m < M; ++m) {
      vg p = oa[m * R] * loadg(other_b + i);
      for (int j = 1; j < R; ++j) p += oa[m * R + j] * loadg(other_b + j * I + i);
      d[m] = k[m] * loadg(g + m * I + i) * p;
    }
    for (int j = 0; j < R; ++j) {
      const vg bj = loadg(own_b + j * I + i);
      vg acc = loadg(db + j * I + i);
      for (int m = 0; m < M; ++m) {
        s[m][j] += d[m] * bj;
        acc += wa[m * R + j] * d[m];
      }
      storeg(db + j * I + i, acc);
    }
  }
  for (int m = 0; m < M; ++m) {
    float t[R];
    for (int j = 0; j < R; ++j) t[j] = lanes_sum(s[m][j]);
    for (int64_t i = full; i < I; ++i) {
      float p = 0.f;
      for (int j = 0; j < R; ++j) p += other_a[m * R + j] * other_b[j * I + i];
      const float dv = k[m] * g[m * I + i] * p;
      for (int j = 0; j < R; ++j) {
        t[j] += dv * own_b[j * I + i];
        db[j * I + i] += own_a[m * R + j] * dv;
      }
    }
    for (int j = 0; j < R; ++j) da[m * R + j] = t[j];
  }
}

// One layer's factor gradients: blocks of ROWS rows (then single rows), a pass per half.
template <int R>
void grads_layer(const float* __restrict__ g, const float* __restrict__ a, const float* __restrict__ b,
                 const float* coef, float c, float* __restrict__ da, float* __restrict__ db, int64_t O, int64_t I) {
  const float* a2 = a + O * R;
  const float* b2 = b + R * I;
  std::memset(db, 0, sizeof(float) * 2 * R * I);
  int64_t o = 0;
  for (; o + ROWS - 1 < O; o += ROWS) {
    float k[ROWS];
    for (int m = 0; m < ROWS; ++m) k[m] = coef ? coef[o + m] : c;
    const float* next = g + (o + 2 * ROWS - 1 < O ? o + ROWS : o) * I;  // the next block's rows, where there is one
    half_rows<R, ROWS>(g + o * I, next, k, a + o * R, b, a2 + o * R, b2, da + o * R, db, I);
    half_rows<R, ROWS>(g + o * I, next, k, a2 + o * R, b2, a + o * R, b, da + O * R + o * R, db + R * I, I);
  }
  for (; o < O; ++o) {
    const float k[1] = {coef ? coef[o] : c};
    half_rows<R, 1>(g + o * I, g + o * I, k, a + o * R, b, a2 + o * R, b2, da + o * R, db, I);
    half_rows<R, 1>(g + o * I, g + o * I, k, a2 + o * R, b2, a + o * R, b, da + O * R + o * R, db + R * I, I);
  }
}

template <int R>
void build_stack(int64_t n, int64_t O, int64_t I, const float* const* w, const float* a, const float* b,
                 const float* coef, float c, float* out) {
  for (int64_t l = 0; l < n; ++l)
    build_layer<R>(w[l], a + l * 2 * O * R, b + l * 2 * R * I, coef ? coef + l * O : nullptr, c, out + l * O * I, O, I);
}

template <int R>
void grads_stack(int64_t n, int64_t O, int64_t I, const float* const* g, const float* a, const float* b,
                 const float* coef, float c, float* da, float* db) {
  for (int64_t l = 0; l < n; ++l)
    grads_layer<R>(g[l], a + l * 2 * O * R, b + l * 2 * R * I, coef ? coef + l * O : nullptr, c,
                   da + l * 2 * O * R, db + l * 2 * R * I, O, I);
}

}  // namespace

#define LOHA_RANKS(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(10) X(12) X(16)

extern "C" {

// The ranks compiled in, for loha/native.py to read: their number, and the list at ``ranks``.
int loha_ranks(int* ranks, int capacity) {
  const int list[] = {
#define LOHA_LIST(r) r,
      LOHA_RANKS(LOHA_LIST)};
  const int count = sizeof list / sizeof list[0];
  for (int k = 0; k < count && k < capacity; ++k) ranks[k] = list[k];
  return count;
}

// 0 on success, -1 for a rank not compiled in (the caller then uses the torch form).
int loha_build(int64_t n, int64_t O, int64_t I, int64_t R, const float* const* w, const float* a, const float* b,
               const float* coef, float c, float* out) {
  switch (R) {
#define LOHA_BUILD(r) case r: build_stack<r>(n, O, I, w, a, b, coef, c, out); return 0;
    LOHA_RANKS(LOHA_BUILD)
    default: return -1;
  }
}

int loha_grads(int64_t n, int64_t O, int64_t I, int64_t R, const float* const* g, const float* a, const float* b,
               const float* coef, float c, float* da, float* db) {
  switch (R) {
#define LOHA_GRADS(r) case r: grads_stack<r>(n, O, I, g, a, b, coef, c, da, db); return 0;
    LOHA_RANKS(LOHA_GRADS)
    default: return -1;
  }
}

}  // extern "C"

// CPU emulation of the CUDA kernels' data movement, built with a plain C++ compiler by
// tests/test_csrc_compile.py (no GPU, no nvcc needed). It uses the kernels' own index maps (csrc/ik_layout.h) and
// an independent model of the hardware instructions written from the PTX ISA:
//   ldmatrix.x4 (.trans): lanes 8i..8i+7 supply the 8 row addresses of matrix i; lane L receives of matrix i
//     the elements (row L/4, cols 2(L%4), 2(L%4)+1)  -- .trans: (rows 2(L%4), 2(L%4)+1, col L/4);
//   mma.m16n8k16: a0 (g, 2t..) a1 (g+8, 2t..) a2 (g, 2t+8..) a3 (g+8, 2t+8..); b0 (k 2t.., n g) b1 (k 2t+8.., n g);
//     c0,c1 (g, 2t..2t+1) c2,c3 (g+8, 2t..2t+1), lane = 4g + t.
// and checks that the kernels' loops, driven by those maps, compute exact matrix products (small integers in
// doubles: no rounding), that every shared-memory slot is written exactly once, and that every ldmatrix phase
// is free of bank conflicts.
//
// Usage: host_layout_test attention | qmm | shuffle B side r C v1|v2   (the last prints the gather map)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../ik_layout.h"

namespace {

struct Pair {
  double lo = 0, hi = 0;
};
using Regs = Pair[32][4];  // [lane][register]

int g_fail = 0;
#define CHECK(cond, ...)                  \
  do {                                    \
    if (!(cond)) {                        \
      if (g_fail < 20) {                  \
        std::printf("FAIL: " __VA_ARGS__); \
        std::printf("\n");                \
      }                                   \
      ++g_fail;                           \
    }                                     \
  } while (0)

// ldmatrix.x4 on a shared tile of 16-bit elements held as doubles; addr[lane] = element offset of a row start.
void ldsm(const std::vector<double>& s, const int (&addr)[32], bool trans, Regs& out, const char* what) {
  for (int i = 0; i < 4; ++i) {
    // bank check: the 8 row addresses of matrix i are read in one phase; 16-byte groups (8 of them per 128 bytes)
    bool used[8] = {false, false, false, false, false, false, false, false};
    for (int r = 0; r < 8; ++r) {
      const int a = addr[8 * i + r];
      CHECK(a % 8 == 0, "%s: row address %d not 16-byte aligned", what, a);
      const int group = (a * 2 / 16) % 8;
      CHECK(!used[group], "%s: bank conflict in matrix %d (16-byte group %d twice)", what, i, group);
      used[group] = true;
    }
  }
  for (int L = 0; L < 32; ++L)
    for (int i = 0; i < 4; ++i) {
      if (!trans) {
        const int base = addr[8 * i + (L >> 2)];
        out[L][i] = {s[base + 2 * (L & 3)], s[base + 2 * (L & 3) + 1]};
      } else {
        const int col = L >> 2;
        const int r0 = 2 * (L & 3);
        out[L][i] = {s[addr[8 * i + r0] + col], s[addr[8 * i + r0 + 1] + col]};
      }
    }
}

// c[lane][0..3] += A(16x16) * B(16x8) with A from a[lane][0..3] and B from b0[lane], b1[lane].
void mma(double (&c)[32][4], const Pair (&a)[32][4], const Pair (&b0)[32], const Pair (&b1)[32]) {
  double A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L >> 2, t = L & 3;
    A[g][2 * t] = a[L][0].lo, A[g][2 * t + 1] = a[L][0].hi;
    A[g + 8][2 * t] = a[L][1].lo, A[g + 8][2 * t + 1] = a[L][1].hi;
    A[g][2 * t + 8] = a[L][2].lo, A[g][2 * t + 9] = a[L][2].hi;
    A[g + 8][2 * t + 8] = a[L][3].lo, A[g + 8][2 * t + 9] = a[L][3].hi;
    B[2 * t][g] = b0[L].lo, B[2 * t + 1][g] = b0[L].hi;
    B[2 * t + 8][g] = b1[L].lo, B[2 * t + 9][g] = b1[L].hi;
  }
  for (int L = 0; L < 32; ++L) {
    const int g = L >> 2, t = L & 3;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
      double s = 0;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      c[L][e] += s;
    }
  }
}

void pick(const Regs& r, int reg, Pair (&out)[32]) {
  for (int L = 0; L < 32; ++L) out[L] = r[L][reg];
}

// ------------------------------------------------------------------------------------------------ attention
template <int D>
void check_attention(std::mt19937& rng) {
  const int fails0 = g_fail;
  constexpr int BM = 64, BN = 64, THREADS = 128, CPR = D / 8;
  std::uniform_int_distribution<int> dist(-3, 3);
  std::vector<double> Q(BM * D), K(BN * D), V(BN * D);
  for (auto* m : {&Q, &K, &V})
    for (auto& v : *m) v = dist(rng);
  // load_tile: thread tid copies chunks idx = tid + i*128 -> (idx / CPR, idx % CPR) to swz(r, c)
  std::vector<double> sQ(BM * D, NAN), sK(BN * D, NAN), sV(BN * D, NAN);
  std::vector<int> hits(BM * D, 0);
  for (int tid = 0; tid < THREADS; ++tid)
    for (int i = 0; i < BM * CPR / THREADS; ++i) {
      const int idx = tid + i * THREADS, r = idx / CPR, c = idx % CPR;
      CHECK(c == tid % CPR, "attention D=%d: chunk column of thread %d is not fixed", D, tid);
      for (int e = 0; e < 8; ++e) {
        const int o = ik::swz<D>(r, c) + e;
        CHECK(o >= 0 && o < BM * D, "attention D=%d: swizzled offset %d out of the tile", D, o);
        hits[o]++;
        sQ[o] = Q[r * D + c * 8 + e];
        sK[o] = K[r * D + c * 8 + e];
        sV[o] = V[r * D + c * 8 + e];
      }
    }
  for (int o = 0; o < BM * D; ++o) CHECK(hits[o] == 1, "attention D=%d: smem slot %d written %d times", D, o, hits[o]);
  // cp.async write phases: 8 consecutive threads write one 128-byte line each phase -> distinct 16-byte groups
  for (int tid0 = 0; tid0 < THREADS; tid0 += 8) {
    bool used[8] = {false, false, false, false, false, false, false, false};
    for (int tid = tid0; tid < tid0 + 8; ++tid) {
      const int r = tid / CPR, c = tid % CPR;
      const int group = (ik::swz<D>(r, c) * 2 / 16) % 8;
      CHECK(!used[group], "attention D=%d: cp.async bank conflict at threads %d..", D, tid0);
      used[group] = true;
    }
  }

  for (int warp = 0; warp < 4; ++warp) {
    // Q fragments
    static Regs qf[D / 16];
    for (int kk = 0; kk < D / 16; ++kk) {
      int addr[32];
      for (int L = 0; L < 32; ++L) addr[L] = ik::swz<D>(warp * 16 + ik::ldsm_a_row(L), 2 * kk + ik::ldsm_a_chunk(L));
      ldsm(sQ, addr, false, qf[kk], "Q");
    }
    // S = Q K^T
    double s[BN / 8][32][4] = {};
    for (int kk = 0; kk < D / 16; ++kk)
      for (int np = 0; np < BN / 16; ++np) {
        int addr[32];
        for (int L = 0; L < 32; ++L) addr[L] = ik::swz<D>(np * 16 + ik::ldsm_b_row(L), 2 * kk + ik::ldsm_b_chunk(L));
        Regs kf;
        ldsm(sK, addr, false, kf, "K");
        Pair b0[32], b1[32], b2[32], b3[32];
        pick(kf, 0, b0), pick(kf, 1, b1), pick(kf, 2, b2), pick(kf, 3, b3);
        mma(s[2 * np], qf[kk], b0, b1);
        mma(s[2 * np + 1], qf[kk], b2, b3);
      }
    double S[16][BN];
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < BN; ++n) {
        double ref = 0;
        for (int d = 0; d < D; ++d) ref += Q[(warp * 16 + r) * D + d] * K[n * D + d];
        S[r][n] = ref;
      }
    for (int L = 0; L < 32; ++L)
      for (int nt = 0; nt < BN / 8; ++nt)
        for (int c = 0; c < 4; ++c) {
          const int row = (L >> 2) + 8 * (c >> 1), key = nt * 8 + 2 * (L & 3) + (c & 1);
          CHECK(s[nt][L][c] == S[row][key], "attention D=%d: S[%d][%d] = %g, want %g", D, row, key, s[nt][L][c],
                S[row][key]);
        }
    // O = P V with P taken from the S accumulators as A fragments
    double o[D / 8][32][4] = {};
    for (int kk = 0; kk < BN / 16; ++kk) {
      Regs pa;
      for (int L = 0; L < 32; ++L) {
        pa[L][0] = {s[2 * kk][L][0], s[2 * kk][L][1]};
        pa[L][1] = {s[2 * kk][L][2], s[2 * kk][L][3]};
        pa[L][2] = {s[2 * kk + 1][L][0], s[2 * kk + 1][L][1]};
        pa[L][3] = {s[2 * kk + 1][L][2], s[2 * kk + 1][L][3]};
      }
      for (int dp = 0; dp < D / 16; ++dp) {
        int addr[32];
        for (int L = 0; L < 32; ++L) addr[L] = ik::swz<D>(kk * 16 + ik::ldsm_a_row(L), 2 * dp + ik::ldsm_a_chunk(L));
        Regs vf;
        ldsm(sV, addr, true, vf, "V");
        Pair b0[32], b1[32], b2[32], b3[32];
        pick(vf, 0, b0), pick(vf, 1, b1), pick(vf, 2, b2), pick(vf, 3, b3);
        mma(o[2 * dp], pa, b0, b1);
        mma(o[2 * dp + 1], pa, b2, b3);
      }
    }
    double O[16][D];
    for (int r = 0; r < 16; ++r)
      for (int d = 0; d < D; ++d) {
        double ref = 0;
        for (int n = 0; n < BN; ++n) ref += S[r][n] * V[n * D + d];
        O[r][d] = ref;
      }
    // epilogue: stage in this warp's rows of sQ (2 values per store at swz(r0, i) + 2t), read back 16-byte chunks
    std::vector<double> sO(BM * D, NAN);
    for (int L = 0; L < 32; ++L) {
      const int r0 = warp * 16 + (L >> 2), t2 = 2 * (L & 3);
      for (int i = 0; i < D / 8; ++i) {
        sO[ik::swz<D>(r0, i) + t2] = o[i][L][0];
        sO[ik::swz<D>(r0, i) + t2 + 1] = o[i][L][1];
        sO[ik::swz<D>(r0 + 8, i) + t2] = o[i][L][2];
        sO[ik::swz<D>(r0 + 8, i) + t2 + 1] = o[i][L][3];
      }
    }
    for (int i = 0; i < 16 * CPR / 32; ++i)
      for (int L = 0; L < 32; ++L) {
        const int idx = L + i * 32, r = idx / CPR, c = idx % CPR;
        for (int e = 0; e < 8; ++e) {
          const double got = sO[ik::swz<D>(warp * 16 + r, c) + e];
          CHECK(got == O[r][c * 8 + e], "attention D=%d warp %d: O[%d][%d] = %g, want %g", D, warp, r, c * 8 + e, got,
                O[r][c * 8 + e]);
        }
      }
  }
  std::printf("attention D=%d: fragment maps %s\n", D, g_fail == fails0 ? "OK" : "WRONG");
}

// --------------------------------------------------------------------------------------------- quant_matmul
void check_qmm(std::mt19937& rng, int bits, bool act_order, int zero_offset) {
  using namespace ik::qmm;
  const int fails0 = g_fail;
  const int K = 192, N = 32, M = 16, gs = 32, G = K / gs;  // 3 chunks of 64, one CTA column tile
  const int per = values_per_word(bits), qmax = (1 << bits) - 1;
  std::uniform_int_distribution<int> code(0, qmax), xd(-3, 3), sd(1, 8);
  std::vector<int> q(K * N), z(G * N), gidx(K);
  std::vector<double> sc(G * N), x(M * K);
  for (auto& v : q) v = code(rng);
  for (auto& v : z) v = std::max(zero_offset, code(rng));  // v1 cannot store zero 0 (stored = zero - 1)
  for (auto& v : sc) v = sd(rng) / 8.0;
  for (auto& v : x) v = xd(rng);
  for (int k = 0; k < K; ++k) gidx[k] = k / gs;
  if (act_order)
    for (int k = K - 1; k > 0; --k) std::swap(gidx[k], gidx[std::uniform_int_distribution<int>(0, k)(rng)]);
  // pack (format definition, docs/design.md §2)
  std::vector<uint32_t> qweight((K / per) * N, 0u), qzeros(G * (N / per), 0u);
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n) qweight[(k / per) * N + n] |= static_cast<uint32_t>(q[k * N + n]) << (bits * (k % per));
  for (int g = 0; g < G; ++g)
    for (int n = 0; n < N; ++n)
      qzeros[g * (N / per) + n / per] |= (static_cast<uint32_t>(z[g * N + n] - zero_offset) & qmax) << (bits * (n % per));

  double acc[4][32][4] = {};
  for (int chunk = 0; chunk < K / 64; ++chunk) {
    Regs a_kk[4];
    Pair bfr[4][4][2][32];  // [kk][j][half][lane]
    for (int L = 0; L < 32; ++L) {
      const int g = L >> 2, t = L & 3;
      const int kbase = chunk * 64 + local_k(t, 0, 0, 0);
      // x words (pairs of consecutive k) of rows g and g+8
      Pair xa[8], xb[8];
      for (int w = 0; w < 8; ++w) {
        xa[w] = {x[g * K + kbase + 2 * w], x[g * K + kbase + 2 * w + 1]};
        xb[w] = {x[(g + 8) * K + kbase + 2 * w], x[(g + 8) * K + kbase + 2 * w + 1]};
      }
      for (int kk = 0; kk < 4; ++kk) {
        a_kk[kk][L][0] = xa[kk], a_kk[kk][L][1] = xb[kk], a_kk[kk][L][2] = xa[4 + kk], a_kk[kk][L][3] = xb[4 + kk];
      }
      uint32_t qw[4][4];
      for (int w = 0; w < 16 / per; ++w)
        for (int j = 0; j < 4; ++j) qw[w][j] = qweight[(kbase / per + w) * N + load_col(g, j)];
      const int col0 = load_col(g, 0);
      for (int j = 0; j < 4; ++j)
        CHECK(zero_word(col0 + j, bits) == zero_word(col0, bits), "qmm: the 4 zeros of a lane span two words");
      for (int kk = 0; kk < 4; ++kk)
        for (int half = 0; half < 2; ++half)
          for (int j = 0; j < 4; ++j) {
            double w2[2];
            for (int jj = 0; jj < 2; ++jj) {
              const int e = local_k(0, kk, half, jj);
              const int grp = gidx[kbase + e];
              const double s = sc[grp * N + col0 + j];
              const uint32_t zw = qzeros[grp * (N / per) + zero_word(col0, bits)];
              const int zz = static_cast<int>((zw >> zero_shift(col0 + j, bits)) & qmax) + zero_offset;
              const int qv = static_cast<int>((qw[e / per][j] >> (bits * (e % per))) & qmax);
              w2[jj] = (qv - zz) * s;
            }
            bfr[kk][j][half][L] = {w2[0], w2[1]};
          }
    }
    for (int kk = 0; kk < 4; ++kk)
      for (int j = 0; j < 4; ++j) mma(acc[j], a_kk[kk], bfr[kk][j][0], bfr[kk][j][1]);
  }
  for (int L = 0; L < 32; ++L) {
    const int g = L >> 2, t = L & 3;
    for (int j = 0; j < 4; ++j)
      for (int c = 0; c < 4; ++c) {
        const int m = out_row(g, c), n = out_col(t, c, j);
        double ref = 0;
        for (int k = 0; k < K; ++k) {
          const int grp = gidx[k];
          ref += x[m * K + k] * (q[k * N + n] - z[grp * N + n]) * sc[grp * N + n];
        }
        CHECK(std::fabs(acc[j][L][c] - ref) < 1e-9, "qmm bits=%d act_order=%d: out[%d][%d] = %g, want %g", bits,
              act_order, m, n, acc[j][L][c], ref);
      }
  }
  // every (row, column) of the CTA tile is produced exactly once
  int seen[16][32] = {};
  for (int L = 0; L < 32; ++L)
    for (int j = 0; j < 4; ++j)
      for (int c = 0; c < 4; ++c) seen[out_row(L >> 2, c)][out_col(L & 3, c, j)]++;
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 32; ++n) CHECK(seen[r][n] == 1, "qmm: output (%d, %d) produced %d times", r, n, seen[r][n]);
  std::printf("qmm bits=%d act_order=%d zero_offset=%d: fragment maps %s\n", bits, act_order, zero_offset,
              g_fail == fails0 ? "OK" : "WRONG");
}

// PTX prmt (default mode): result byte i = byte (sel nibble i & 7) of {a bytes 0-3, b bytes 4-7}.
uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  const uint64_t ab = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((ab >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}

// The exact-integer path of quant_matmul (no g_idx, group_size % 64 == 0), bit-level for the x pairs: x elements
// are 16-bit labels packed two per word exactly as in memory; the A registers are rebuilt with the kernels' PRMT
// selectors and decoded back to values.
void check_qmm_int(std::mt19937& rng, int bits, int zero_offset) {
  using namespace ik::qmm;
  const int fails0 = g_fail;
  const int K = 256, N = 32, M = 16, gs = 128, G = K / gs;
  const int per = values_per_word(bits), qmax = (1 << bits) - 1;
  std::uniform_int_distribution<int> code(0, qmax), xd(-3, 3), sd(1, 8);
  std::vector<int> q(K * N), z(G * N);
  std::vector<double> sc(G * N), x(M * K);
  for (auto& v : q) v = code(rng);
  for (auto& v : z) v = std::max(zero_offset, code(rng));
  for (auto& v : sc) v = sd(rng) / 8.0;
  for (auto& v : x) v = xd(rng);
  std::vector<uint32_t> qweight((K / per) * N, 0u), qzeros(G * (N / per), 0u);
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n) qweight[(k / per) * N + n] |= static_cast<uint32_t>(q[k * N + n]) << (bits * (k % per));
  for (int g = 0; g < G; ++g)
    for (int n = 0; n < N; ++n)
      qzeros[g * (N / per) + n / per] |= (static_cast<uint32_t>(z[g * N + n] - zero_offset) & qmax) << (bits * (n % per));
  // x as 16-bit labels: label = m * K + k (+1, so 0 means "not an x element"); decode label -> value
  auto label_value = [&](uint32_t lab) { return (lab == 0 || lab > x.size()) ? NAN : x[lab - 1]; };
  const uint32_t field = bits == 4 ? 0xFu : 0xFFu;

  double acc[4][32][4] = {};
  for (int chunk = 0; chunk < K / 64; ++chunk) {
    const int grp = chunk * 64 / gs;
    double d[4][32][4] = {};
    for (int kk = 0; kk < 4; ++kk) {
      Regs a;
      Pair b[4][2][32];
      for (int L = 0; L < 32; ++L) {
        const int g = L >> 2, t = L & 3;
        const int kbase = chunk * 64 + local_k_int(bits, t, 0, 0, 0);
        CHECK(kbase == chunk * 64 + 16 * t, "qmm-int: lane run does not start at 16t");
        uint32_t wa[8], wb[8];  // the 16-element x runs of rows g, g+8 as memory words
        for (int w = 0; w < 8; ++w) {
          wa[w] = static_cast<uint32_t>(g * K + kbase + 2 * w + 1) | (static_cast<uint32_t>(g * K + kbase + 2 * w + 2) << 16);
          wb[w] = static_cast<uint32_t>((g + 8) * K + kbase + 2 * w + 1) |
                  (static_cast<uint32_t>((g + 8) * K + kbase + 2 * w + 2) << 16);
        }
        for (int half = 0; half < 2; ++half) {
          const int e0 = local_k_int(bits, 0, kk, half, 0), e1 = local_k_int(bits, 0, kk, half, 1);
          const uint32_t sel = x_pair_selector(e0, e1);
          const uint32_t ra = ((e0 & 1) == 0 && e1 == e0 + 1) ? wa[e0 >> 1] : prmt(wa[e0 >> 1], wa[e1 >> 1], sel);
          const uint32_t rb = ((e0 & 1) == 0 && e1 == e0 + 1) ? wb[e0 >> 1] : prmt(wb[e0 >> 1], wb[e1 >> 1], sel);
          a[L][half * 2 + 0] = {label_value(ra & 0xFFFF), label_value(ra >> 16)};
          a[L][half * 2 + 1] = {label_value(rb & 0xFFFF), label_value(rb >> 16)};
          // expected x elements of those slots
          CHECK(a[L][half * 2].lo == x[g * K + kbase + e0] && a[L][half * 2].hi == x[g * K + kbase + e1],
                "qmm-int: PRMT pair wrong");
          // B: codes of the packed word, pair at bits [shift, +bits) and [shift + 16, +bits), minus the zero
          const int col0 = load_col(g, 0);
          const uint32_t zw = qzeros[grp * (N / per) + zero_word(col0, bits)];
          for (int j = 0; j < 4; ++j) {
            const uint32_t word = qweight[(kbase / per + int_word(bits, kk, half)) * N + col0 + j];
            const int sh = int_shift(bits, kk);
            const int zz = static_cast<int>((zw >> zero_shift(col0 + j, bits)) & qmax) + zero_offset;
            const int n_lo = static_cast<int>((word >> sh) & field), n_hi = static_cast<int>((word >> (sh + 16)) & field);
            CHECK(n_lo == q[(kbase + e0) * N + col0 + j] && n_hi == q[(kbase + e1) * N + col0 + j],
                  "qmm-int bits=%d: code pair (kk=%d half=%d) is not local k (%d, %d)", bits, kk, half, e0, e1);
            b[j][half][L] = {static_cast<double>(n_lo - zz), static_cast<double>(n_hi - zz)};
          }
        }
      }
      for (int j = 0; j < 4; ++j) mma(d[j], a, b[j][0], b[j][1]);
    }
    for (int L = 0; L < 32; ++L)
      for (int j = 0; j < 4; ++j)
        for (int c = 0; c < 4; ++c) {
          const int col = out_col(L & 3, c, j);
          CHECK(col == out_col(L & 3, c & 1, 0) + j, "qmm-int: output columns are not two runs of 4");
          acc[j][L][c] += d[j][L][c] * sc[grp * N + col];
        }
  }
  for (int L = 0; L < 32; ++L)
    for (int j = 0; j < 4; ++j)
      for (int c = 0; c < 4; ++c) {
        const int m = out_row(L >> 2, c), n = out_col(L & 3, c, j);
        double ref = 0;
        for (int k = 0; k < K; ++k) ref += x[m * K + k] * (q[k * N + n] - z[(k / gs) * N + n]) * sc[(k / gs) * N + n];
        CHECK(std::fabs(acc[j][L][c] - ref) < 1e-9, "qmm-int bits=%d: out[%d][%d] = %g, want %g", bits, m, n,
              acc[j][L][c], ref);
      }
  // the k permutation covers each of a lane's 16 k exactly once
  for (int t = 0; t < 4; ++t) {
    int seen[16] = {};
    for (int kk = 0; kk < 4; ++kk)
      for (int half = 0; half < 2; ++half)
        for (int jj = 0; jj < 2; ++jj) seen[local_k_int(bits, t, kk, half, jj) - 16 * t]++;
    for (int e = 0; e < 16; ++e) CHECK(seen[e] == 1, "qmm-int bits=%d: local k %d used %d times", bits, e, seen[e]);
  }
  std::printf("qmm-int bits=%d zero_offset=%d: fragment maps %s\n", bits, zero_offset, g_fail == fails0 ? "OK" : "WRONG");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s attention | qmm | shuffle B side r C v1|v2\n", argv[0]);
    return 2;
  }
  std::mt19937 rng(1234);
  if (!std::strcmp(argv[1], "attention")) {
    check_attention<64>(rng);
    check_attention<128>(rng);
  } else if (!std::strcmp(argv[1], "qmm")) {
    for (int bits : {4, 8})
      for (int act : {0, 1})
        for (int zo : {0, 1}) check_qmm(rng, bits, act, zo);
    for (int bits : {4, 8})
      for (int zo : {0, 1}) check_qmm_int(rng, bits, zo);
  } else if (!std::strcmp(argv[1], "shuffle") && argc == 7) {
    const int B = std::atoi(argv[2]), side = std::atoi(argv[3]), r = std::atoi(argv[4]), C = std::atoi(argv[5]);
    const bool v2 = !std::strcmp(argv[6], "v2");
    const ik::ShuffleMap map{side, r, side / r, v2};
    const int so = side / r;
    // flat input index of every output element, in output order [B, so*so, r*r*C]
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < so * so; ++t)
        for (int col = 0; col < r * r * C; ++col) {
          const int chunk = col / C, cc = col - chunk * C;
          std::printf("%lld\n", static_cast<long long>((static_cast<long long>(b) * side * side + map.src_token(t, chunk)) * C + cc));
        }
    return 0;
  } else {
    std::fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
  }
  if (g_fail) {
    std::printf("%d failures\n", g_fail);
    return 1;
  }
  return 0;
}

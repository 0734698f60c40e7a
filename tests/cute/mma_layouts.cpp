// Prints CuTe's layouts of the m16n8k16 MMA atoms (bf16 and fp16 in, float32 accumulate) and of
// the ldmatrix copy atoms, evaluated on the host. Built and run by tests/test_mma_fragments.py
// against the headers of the nvidia-cutlass wheel; the test compares them with cuda/mma.cuh.
//   mma <atom> <operand> <thread> <value> <row> <col>
//     CuTe maps (thread, value) to a column-major index into the operand's (M, K), (N, K) or
//     (M, N) tile; printed as coordinates.
//   ldsm <atom> <lane> <register> <half> <source lane> <source element>
//     CuTe maps both the source (thread, bit: the 16-byte row each lane points at) and the
//     destination (thread, bit of its registers) to one logical bit; printed as: the 16-bit half
//     `half` of register `register` of `lane` comes from element `source element` of the row
//     whose address lane `source lane` gave.
#include <cstdio>

#include <map>

#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>

template <class Layout>
void print_operand(const char* atom, const char* operand, Layout layout, int rows) {
  for (int t = 0; t < int(cute::size<0>(layout)); ++t)
    for (int v = 0; v < int(cute::size<1>(layout)); ++v) {
      const int idx = int(layout(t, v));
      std::printf("mma %s %s %d %d %d %d\n", atom, operand, t, v, idx % rows, idx / rows);
    }
}

template <class Op>
void print_atom(const char* atom) {
  using Traits = cute::MMA_Traits<Op>;
  constexpr int M = cute::size<0>(typename Traits::Shape_MNK{});
  constexpr int N = cute::size<1>(typename Traits::Shape_MNK{});
  print_operand(atom, "A", typename Traits::ALayout{}, M);  // (m, k)
  print_operand(atom, "B", typename Traits::BLayout{}, N);  // (n, k)
  print_operand(atom, "C", typename Traits::CLayout{}, M);  // (m, n)
}

template <class Op>
void print_ldsm(const char* atom) {
  using Traits = cute::Copy_Traits<Op>;
  typename Traits::SrcLayout src{};
  typename Traits::DstLayout dst{};
  std::map<int, std::pair<int, int>> from;  // logical bit -> (source lane, source bit)
  for (int t = 0; t < int(cute::size<0>(src)); ++t)
    for (int v = 0; v < int(cute::size<1>(src)); ++v) from.emplace(int(src(t, v)), std::make_pair(t, v));  // the first lane: lanes past 8 N repeat rows
  for (int t = 0; t < int(cute::size<0>(dst)); ++t)
    for (int v = 0; v < int(cute::size<1>(dst)); v += 16) {  // one 16-bit element at a time
      const auto s = from.at(int(dst(t, v)));
      std::printf("ldsm %s %d %d %d %d %d\n", atom, t, v / 32, (v / 16) % 2, s.first, s.second / 16);
    }
}

int main() {
  print_ldsm<cute::SM75_U32x1_LDSM_N>("x1");
  print_ldsm<cute::SM75_U32x2_LDSM_N>("x2");
  print_ldsm<cute::SM75_U32x4_LDSM_N>("x4");
  print_ldsm<cute::SM75_U16x2_LDSM_T>("x1.trans");
  print_ldsm<cute::SM75_U16x4_LDSM_T>("x2.trans");
  print_ldsm<cute::SM75_U16x8_LDSM_T>("x4.trans");
  print_atom<cute::SM80_16x8x16_F32BF16BF16F32_TN>("bf16");
  print_atom<cute::SM80_16x8x16_F32F16F16F32_TN>("f16");
}

// The device generator of synthetic K/V must write exactly what the host one writes.

#include "benchmarks/replay/synthetic_kv_cuda.h"

#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "benchmarks/replay/synthetic_kv.h"
#include "gtest/gtest.h"
#include "storage/device.h"
#include "testing/cuda_test_util.h"

namespace kvcache::replay {
namespace {

TEST(SyntheticKvCudaTest, DeviceFillEqualsHostFill) {
  KVCACHE_SKIP_WITHOUT_GPU();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  const int heads = 8, d = 128, dv = 64, t = 300, layer = 7;
  SyntheticKv host(DType::kBFloat16, heads, d, dv);
  std::vector<TokenAt> tokens(t);
  std::vector<int32_t> ids(t);
  std::vector<int64_t> positions(t);
  for (int i = 0; i < t; ++i) {
    tokens[i] = {static_cast<int32_t>(rng() & 0x7fffffff),
                 static_cast<int64_t>(rng() % 100000)};
    ids[i] = tokens[i].token;
    positions[i] = tokens[i].position;
  }
  const int64_t stride = heads * (d + dv) + 8;
  std::vector<uint16_t> expected(t * stride, 0xABCD);
  host.Fill(layer, false, tokens, expected.data(), stride);
  host.Fill(layer, true, tokens, expected.data() + heads * d, stride);

  absl::StatusOr<std::unique_ptr<Device>> device = CreateCudaDevice(0);
  ASSERT_TRUE(device.ok()) << device.status();
  auto upload = [&](const void* src, size_t bytes) {
    Buffer b = *(*device)->Allocate(bytes);
    EXPECT_TRUE(
        (*device)->CopyToDeviceAsync(b.data(), src, bytes, nullptr).ok());
    return b;
  };
  Buffer table = upload(host.table().data(), host.table().size() * 2);
  Buffer dev_ids = upload(ids.data(), ids.size() * 4);
  Buffer dev_pos = upload(positions.data(), positions.size() * 8);
  std::vector<uint16_t> got(t * stride, 0xABCD);
  Buffer out = upload(got.data(), got.size() * 2);
  SyntheticFillParams p;
  p.table = table.as<uint16_t>();
  p.tokens = dev_ids.as<int32_t>();
  p.positions = dev_pos.as<int64_t>();
  p.num_tokens = t;
  p.layer = layer;
  p.num_heads = heads;
  p.head_size = d;
  p.head_size_v = dv;
  p.out = out.as<uint16_t>();
  p.token_stride = stride;
  p.value_offset = heads * d;
  ASSERT_TRUE(FillSyntheticCuda(p, nullptr).ok());
  ASSERT_TRUE(
      (*device)->CopyToHost(got.data(), out.data(), got.size() * 2).ok());
  EXPECT_EQ(got, expected);
}

}  // namespace
}  // namespace kvcache::replay

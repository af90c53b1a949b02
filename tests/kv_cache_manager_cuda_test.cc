// The CUDA backend against the CPU backend: the same random operations on both
// must give byte-identical caches and scales in every layer (side and inline
// scales), and Gather must match the reference on CUDA too.

#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/kv_cache_manager_test_peer.h"
#include "gtest/gtest.h"
#include "storage/tier_copier.h"
#include "testing/cuda_test_util.h"
#include "tests/manager_driver.h"

namespace kvcache {
namespace {

std::vector<char> LayerBytes(testing::ManagerDriver& driver, int layer) {
  absl::StatusOr<LayerView> view = driver.manager().GetLayerView(layer);
  EXPECT_TRUE(view.ok()) << view.status();
  const int64_t elem = static_cast<int64_t>(DTypeSize(view->cache_dtype));
  const int64_t k = view->num_blocks * view->key_strides[0] * elem;
  const int64_t v = view->num_blocks * view->value_strides[0] * elem;
  // Inline scales are inside the K and V rows.
  const int64_t s = view->key_scale == nullptr ||
                            view->scale_placement != ScalePlacement::kSide
                        ? 0
                        : view->num_blocks * view->scale_strides[0] * 4;
  std::vector<char> bytes(k + v + 2 * s);
  EXPECT_TRUE(
      driver.device().CopyToHost(bytes.data(), view->key_cache, k).ok());
  EXPECT_TRUE(
      driver.device().CopyToHost(bytes.data() + k, view->value_cache, v).ok());
  if (s > 0) {
    EXPECT_TRUE(driver.device()
                    .CopyToHost(bytes.data() + k + v, view->key_scale, s)
                    .ok());
    EXPECT_TRUE(driver.device()
                    .CopyToHost(bytes.data() + k + v + s, view->value_scale, s)
                    .ok());
  }
  return bytes;
}

struct Case {
  DType cache_dtype;
  ScalePlacement placement;
};

class CudaManagerTest : public ::testing::TestWithParam<Case> {};

// Random operations with the host tier on CUDA (below).
void CheckHostTierReadBack(const Case& param, int copy_blocks);

TEST_P(CudaManagerTest, CachesAreByteIdenticalToTheCpuBackend) {
  KVCACHE_SKIP_WITHOUT_GPU();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  KVCacheConfig config;
  config.num_layers = 3;
  config.num_kv_heads = 4;
  config.head_size = 128;
  config.head_size_v = 64;
  config.block_size = 16;
  config.cache_dtype = GetParam().cache_dtype;
  config.scale_placement = GetParam().placement;
  config.num_blocks = 64;
  auto cpu = testing::ManagerDriver::Create(config, seed, seed + 1);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  config.backend = Backend::kCuda;
  auto cuda = testing::ManagerDriver::Create(config, seed, seed + 1);
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  for (int op = 0; op < 300; ++op) {
    ASSERT_TRUE((*cpu)->RandomOp().ok());
    ASSERT_TRUE((*cuda)->RandomOp().ok());
  }
  absl::Status verified = (*cuda)->VerifyAll();
  ASSERT_TRUE(verified.ok()) << verified;
  EXPECT_GT((*cuda)->counts().block_copies, 0);
  EXPECT_EQ((*cuda)->counts().steps, (*cpu)->counts().steps);
  for (int layer = 0; layer < config.num_layers; ++layer) {
    const std::vector<char> a = LayerBytes(**cpu, layer);
    const std::vector<char> b = LayerBytes(**cuda, layer);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_TRUE(a == b) << "layer " << layer << " differs";
  }
}

// The host tier on CUDA (pinned memory; the copies by the default copy
// kernel, then by the copy engines through staging, tier_copy_thread_blocks
// = 0; both scale placements): random operations with evictions and tier
// hits, and every committed token of every sequence must Gather back as the
// reference.
TEST_P(CudaManagerTest, HostTierHitsReadBackOnCuda) {
  KVCACHE_SKIP_WITHOUT_GPU();
  for (int copy_blocks : {KVCacheConfig().tier_copy_thread_blocks, 0}) {
    SCOPED_TRACE(absl::StrCat("tier_copy_thread_blocks ", copy_blocks));
    CheckHostTierReadBack(GetParam(), copy_blocks);
  }
}

void CheckHostTierReadBack(const Case& param, int copy_blocks) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  KVCacheConfig config;
  config.num_layers = 3;
  config.num_kv_heads = 4;
  config.head_size = 128;
  config.head_size_v = 64;
  config.block_size = 16;
  config.cache_dtype = param.cache_dtype;
  config.scale_placement = param.placement;
  config.num_blocks = 64;
  config.backend = Backend::kCuda;
  config.host_tier_bytes = 96 * *BlockBytesAllLayers(config);
  config.tier_copy_thread_blocks = copy_blocks;
  auto cuda = testing::ManagerDriver::Create(config, seed, seed + 1);
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  TierCopier* copier =
      KVCacheManagerTestPeer::HostTierCopier((*cuda)->manager());
  ASSERT_NE(copier, nullptr);
  for (int op = 0; op < 1200; ++op) {
    const absl::Status s = (*cuda)->RandomOp();
    ASSERT_TRUE(s.ok()) << "op " << op << ": " << s;
    // The copies drain now and then: while more than a few offload batches
    // are in flight the manager drops evicted blocks instead of offloading
    // them (README "Host tier"), and under compute-sanitizer the copies run
    // slowly enough that no block would reach the tier. Between drains most
    // ops still run with copies in flight.
    if (op % 50 == 49) {
      ASSERT_TRUE(copier->Synchronize().ok());
    }
  }
  absl::Status verified = (*cuda)->VerifyAll();
  ASSERT_TRUE(verified.ok()) << verified;
  ASSERT_TRUE((*cuda)->manager().Validate().ok());
  const MetricsSnapshot m = (*cuda)->manager().Metrics();
  EXPECT_GT(m.tier_offloads, 0);
  EXPECT_GT(m.prefix_hit_tokens_host, 0) << "no host-tier hit exercised";
  EXPECT_EQ(m.tier_copy_failures, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Dtypes, CudaManagerTest,
    ::testing::Values(Case{DType::kInt8, ScalePlacement::kSide},
                      Case{DType::kFp8E4M3, ScalePlacement::kSide},
                      Case{DType::kBFloat16, ScalePlacement::kSide},
                      Case{DType::kInt8, ScalePlacement::kInline},
                      Case{DType::kFp8E4M3, ScalePlacement::kInline}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return absl::StrCat(DTypeName(info.param.cache_dtype), "_",
                          ScalePlacementName(info.param.placement));
    });

TEST(CudaManagerTest, CreateOnAHostWithoutAGpuIsAnErrorNotACrash) {
  absl::StatusOr<int> devices = CudaDeviceCount();
  if (devices.ok() && *devices > 0) GTEST_SKIP() << "this host has a GPU";
  KVCacheConfig config;
  config.num_layers = 1;
  config.num_kv_heads = 1;
  config.head_size = 8;
  config.num_blocks = 4;
  config.backend = Backend::kCuda;
  absl::StatusOr<std::unique_ptr<KVCacheManager>> manager =
      KVCacheManager::Create(config);
  EXPECT_EQ(manager.status().code(), absl::StatusCode::kFailedPrecondition)
      << manager.status();
}

}  // namespace
}  // namespace kvcache

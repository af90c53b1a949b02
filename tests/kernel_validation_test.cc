// Every bad argument of the three kernels is InvalidArgument whose message
// names the value, on the CPU entry points (the CUDA launchers share
// kernels/kernel_validation.cc).

#include "kernels/kernel_validation.h"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kernels/attention_validation.h"
#include "kernels/cpu_kernels.h"

namespace kvcache {
namespace {

struct Fixture {
  std::vector<int8_t> kc, vc;
  std::vector<float> ks, vs;
  std::vector<uint16_t> k, v;
  std::vector<int64_t> slots = {0, -1, 5};
  std::vector<int32_t> table = {1, 0};
  std::vector<int64_t> pairs = {0, 1};
  QuantizeWriteParams write;
  GatherParams gather;
  BlockCopyParams copy;

  Fixture() {
    CacheLayout l;
    l.num_blocks = 2;
    l.block_size = 4;
    l.num_heads = 2;
    l.head_size = 16;
    l.head_size_v = 8;
    l.cache_dtype = DType::kInt8;
    kc.resize(l.num_blocks * l.key_block_elems());
    vc.resize(l.num_blocks * l.value_block_elems());
    ks.resize(l.num_slots() * 2);
    vs.resize(l.num_slots() * 2);
    k.resize(3 * 2 * 16);
    v.resize(3 * 2 * 8);
    LayerCache cache{l, kc.data(), vc.data(), ks.data(), vs.data()};
    write.cache = cache;
    write.input = {k.data(), v.data(), DType::kBFloat16, 32, 16, 16, 8};
    write.num_tokens = 3;
    write.slot_mapping = slots.data();
    gather.cache = cache;
    gather.slots = slots.data();
    gather.num_tokens = 3;
    gather.output = {k.data(), v.data(), DType::kBFloat16, 32, 16, 16, 8};
    copy.cache = cache;
    copy.pairs = pairs.data();
    copy.num_pairs = 1;
  }
};

void ExpectInvalid(const absl::Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(needle), absl::string_view::npos)
      << "message '" << s.message() << "' does not mention '" << needle << "'";
}

TEST(KernelValidationTest, GoodArgumentsPass) {
  Fixture f;
  EXPECT_TRUE(QuantizeWriteCpu(f.write).ok());
  EXPECT_TRUE(GatherCpu(f.gather).ok());
  EXPECT_TRUE(BlockCopyCpu(f.copy).ok());
}

TEST(KernelValidationTest, BadLayoutIsNamed) {
  struct Bad {
    std::function<void(CacheLayout&)> mutate;
    std::string needle;
  };
  const std::vector<Bad> bad = {
      {[](CacheLayout& l) { l.head_size = 100; },
       "head_size 100 is not a multiple of 8"},
      {[](CacheLayout& l) { l.head_size_v = 1032; }, "head_size_v 1032"},
      {[](CacheLayout& l) { l.head_size = 0; }, "head_size 0"},
      {[](CacheLayout& l) { l.block_size = 0; }, "block_size 0"},
      {[](CacheLayout& l) { l.num_heads = -2; }, "num_heads -2"},
      {[](CacheLayout& l) { l.num_blocks = 0; }, "num_blocks 0"},
      {[](CacheLayout& l) { l.cache_dtype = DType::kFloat32; },
       "cache dtype float32"},
      {[](CacheLayout& l) { l.cache_dtype = static_cast<DType>(42); },
       "cache dtype unknown"},
      {[](CacheLayout& l) { l.num_blocks = int64_t{1} << 58; }, "overflows"},
  };
  for (const Bad& b : bad) {
    Fixture f;
    b.mutate(f.write.cache.layout);
    ExpectInvalid(QuantizeWriteCpu(f.write), b.needle);
    b.mutate(f.gather.cache.layout);
    ExpectInvalid(GatherCpu(f.gather), b.needle);
    b.mutate(f.copy.cache.layout);
    ExpectInvalid(BlockCopyCpu(f.copy), b.needle);
  }
}

// A K-only (latent) cache, head_size_v 0: the kernels run with null V
// pointers and refuse any V pointer by name; attention refuses the cache.
TEST(KernelValidationTest, KOnlyCacheTakesNoValue) {
  Fixture f;
  for (CacheLayout* l :
       {&f.write.cache.layout, &f.gather.cache.layout, &f.copy.cache.layout}) {
    l->head_size_v = 0;
  }
  ExpectInvalid(QuantizeWriteCpu(f.write), "must be null for a K-only cache");
  ExpectInvalid(GatherCpu(f.gather), "must be null for a K-only cache");
  ExpectInvalid(BlockCopyCpu(f.copy), "must be null for a K-only cache");
  for (LayerCache* c : {&f.write.cache, &f.gather.cache, &f.copy.cache}) {
    c->value_cache = nullptr;
    c->value_scale = nullptr;
  }
  ExpectInvalid(QuantizeWriteCpu(f.write),
                "input value must be null for a K-only cache");
  ExpectInvalid(GatherCpu(f.gather),
                "output value must be null for a K-only cache");
  EXPECT_TRUE(BlockCopyCpu(f.copy).ok());
  f.write.input.value = nullptr;
  f.gather.output.value = nullptr;
  EXPECT_TRUE(QuantizeWriteCpu(f.write).ok());
  EXPECT_TRUE(GatherCpu(f.gather).ok());
  // A value scale alone is refused too.
  f.copy.cache.value_scale = f.vs.data();
  ExpectInvalid(BlockCopyCpu(f.copy), "value_scale must be null");
  // A negative V size is not K only.
  f.copy.cache.layout.head_size_v = -8;
  ExpectInvalid(BlockCopyCpu(f.copy), "head_size_v -8");

  AttentionParams a;
  a.cache = f.gather.cache;
  ExpectInvalid(internal::ValidateAttention(a), "K-only");
}

TEST(KernelValidationTest, BadWriteArgumentsAreNamed) {
  struct Bad {
    std::function<void(Fixture&)> mutate;
    std::string needle;
  };
  const std::vector<Bad> bad = {
      {[](Fixture& f) { f.write.input.key = nullptr; }, "input key is null"},
      {[](Fixture& f) { f.write.input.value = nullptr; },
       "input value is null"},
      {[](Fixture& f) { f.write.slot_mapping = nullptr; },
       "slot_mapping is null"},
      {[](Fixture& f) { f.write.cache.key_cache = nullptr; },
       "key_cache is null"},
      {[](Fixture& f) { f.write.cache.value_scale = nullptr; },
       "value_scale is null"},
      {[](Fixture& f) { f.write.input.dtype = DType::kInt8; },
       "input dtype int8"},
      {[](Fixture& f) { f.write.num_tokens = -1; }, "num_tokens -1"},
      {[](Fixture& f) { f.write.input.key_token_stride = -32; },
       "token stride -32"},
      {[](Fixture& f) { f.write.input.value_head_stride = -1; },
       "head stride -1"},
      {[](Fixture& f) {
         f.write.input.key = reinterpret_cast<char*>(f.k.data()) + 1;
       },
       "is not aligned to 2"},
      {[](Fixture& f) { f.slots[2] = 8; },
       "slot_mapping[2] = 8 is out of range"},
      {[](Fixture& f) {
         f.write.cache.layout.cache_dtype = DType::kFloat16;
         f.write.cache.key_scale = nullptr;
         f.write.cache.value_scale = nullptr;
       },
       "does not match the unquantized cache dtype float16"},
      {[](Fixture& f) { f.write.cache.layout.cache_dtype = DType::kBFloat16; },
       "scale pointers must be null"},
  };
  for (const Bad& b : bad) {
    Fixture f;
    b.mutate(f);
    ExpectInvalid(QuantizeWriteCpu(f.write), b.needle);
  }
}

TEST(KernelValidationTest, BadGatherArgumentsAreNamed) {
  struct Bad {
    std::function<void(Fixture&)> mutate;
    std::string needle;
  };
  const std::vector<Bad> bad = {
      {[](Fixture& f) { f.gather.slots = nullptr; }, "both null"},
      {[](Fixture& f) { f.gather.block_table = f.table.data(); }, "both set"},
      {[](Fixture& f) { f.gather.output.dtype = DType::kFp8E4M3; },
       "output dtype fp8_e4m3"},
      {[](Fixture& f) { f.gather.output.key_head_stride = 8; },
       "head stride 8 is less than head size 16"},
      {[](Fixture& f) { f.gather.output.value_token_stride = 8; },
       "token stride 8"},
      {[](Fixture& f) { f.gather.output.key = nullptr; }, "output key is null"},
      {[](Fixture& f) { f.slots[0] = 99; }, "slots[0] = 99 is out of range"},
      {[](Fixture& f) {
         f.gather.slots = nullptr;
         f.gather.block_table = f.table.data();
         f.gather.block_table_len = 2;
         f.gather.token_begin = 6;
       },
       "exceeds the block table's 2 blocks"},
      {[](Fixture& f) {
         f.gather.slots = nullptr;
         f.gather.block_table = f.table.data();
         f.gather.block_table_len = 2;
         f.gather.token_begin = -1;
       },
       "token_begin -1"},
      {[](Fixture& f) {
         f.table[0] = 7;
         f.gather.slots = nullptr;
         f.gather.block_table = f.table.data();
         f.gather.block_table_len = 2;
       },
       "block_table[0] = 7 is out of range"},
  };
  for (const Bad& b : bad) {
    Fixture f;
    b.mutate(f);
    ExpectInvalid(GatherCpu(f.gather), b.needle);
  }
}

TEST(KernelValidationTest, BadBlockCopyArgumentsAreNamed) {
  struct Bad {
    std::function<void(Fixture&)> mutate;
    std::string needle;
  };
  const std::vector<Bad> bad = {
      {[](Fixture& f) { f.copy.pairs = nullptr; }, "pairs is null"},
      {[](Fixture& f) { f.copy.num_pairs = -3; }, "num_pairs -3"},
      {[](Fixture& f) { f.pairs[1] = 2; }, "pairs[0].dst = 2"},
      {[](Fixture& f) { f.pairs[0] = -1; }, "pairs[0].src = -1"},
      {[](Fixture& f) { f.pairs[1] = 0; }, "is also a destination"},
      {[](Fixture& f) {
         f.pairs = {0, 1, 1, 0};
         f.copy.pairs = f.pairs.data();
         f.copy.num_pairs = 2;
       },
       "is also a destination"},
  };
  for (const Bad& b : bad) {
    Fixture f;
    b.mutate(f);
    ExpectInvalid(BlockCopyCpu(f.copy), b.needle);
  }
}

}  // namespace
}  // namespace kvcache

#include "gradclient/npy.h"

#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace gradclient {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

const absl::Status& GetStatus(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

MATCHER_P2(StatusIs, code, message_matcher,
           absl::StrCat("has status code ", absl::StatusCodeToString(code))) {
  const absl::Status& status = GetStatus(arg);
  *result_listener << "status is " << status;
  return status.code() == code &&
         ::testing::Matches(message_matcher)(std::string(status.message()));
}

MATCHER(IsOk, "is OK") {
  const absl::Status& status = GetStatus(arg);
  *result_listener << "status is " << status;
  return status.ok();
}

uint32_t Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

std::vector<uint32_t> AllBits(const std::vector<float>& values) {
  std::vector<uint32_t> bits;
  for (float value : values) bits.push_back(Bits(value));
  return bits;
}

std::string FromHex(absl::string_view hex) { return absl::HexStringToBytes(hex); }

// np.save(f, (np.arange(6, dtype='<f4').reshape(2, 3) - 2.5) / 4) with numpy 1.24.
const char kNumpy2x3Hex[] =
    "934e554d5059010076007b276465736372273a20273c6634272c2027666f727472616e5f6f72646572273a2046616c"
    "73"
    "652c20277368617065273a2028322c2033292c207d2020202020202020202020202020202020202020202020202020"
    "20"
    "202020202020202020202020202020202020202020202020202020202020200a000020bf0000c0be000000be000000"
    "3e"
    "0000c03e0000203f";
// np.save(f, np.float32(1.5)).
const char kNumpyScalarHex[] =
    "934e554d5059010076007b276465736372273a20273c6634272c2027666f727472616e5f6f72646572273a2046616c"
    "73"
    "652c20277368617065273a2028292c207d202020202020202020202020202020202020202020202020202020202020"
    "20"
    "202020202020202020202020202020202020202020202020202020202020200a0000c03f";
// np.lib.format.write_array(f, np.array([1.0, -2.0, 0.25], dtype='<f4'), version=(2, 0)).
const char kNumpyVersion2Hex[] =
    "934e554d50590200740000007b276465736372273a20273c6634272c2027666f727472616e5f6f72646572273a2046"
    "61"
    "6c73652c20277368617065273a2028332c292c207d2020202020202020202020202020202020202020202020202020"
    "20"
    "202020202020202020202020202020202020202020202020202020202020200a0000803f000000c00000803e";
// The same with version=(3, 0).
const char kNumpyVersion3Hex[] =
    "934e554d50590300740000007b276465736372273a20273c6634272c2027666f727472616e5f6f72646572273a2046"
    "61"
    "6c73652c20277368617065273a2028332c292c207d2020202020202020202020202020202020202020202020202020"
    "20"
    "202020202020202020202020202020202020202020202020202020202020200a0000803f000000c00000803e";

// A .npy file with an arbitrary header text, framed the way numpy frames it.
std::string MakeNpy(absl::string_view dict, absl::string_view data, int major = 1) {
  std::string header(dict);
  const size_t prefix = major == 1 ? 10 : 12;
  header.append(64 - (prefix + header.size() + 1) % 64, ' ');
  header.push_back('\n');
  std::string out =
      absl::StrCat("\x93NUMPY", std::string(1, static_cast<char>(major)), std::string(1, '\0'));
  const size_t length = header.size();
  out.push_back(static_cast<char>(length & 0xFF));
  out.push_back(static_cast<char>((length >> 8) & 0xFF));
  if (major != 1) {
    out.push_back(static_cast<char>((length >> 16) & 0xFF));
    out.push_back(static_cast<char>((length >> 24) & 0xFF));
  }
  return absl::StrCat(out, header, data);
}

std::string FloatBytes(int count) { return std::string(4 * count, '\0'); }

std::string Dict(absl::string_view descr, absl::string_view fortran_order,
                 absl::string_view shape) {
  return absl::StrCat("{'descr': ", descr, ", 'fortran_order': ", fortran_order,
                      ", 'shape': ", shape, ", }");
}

TEST(ParseNpyTest, ReadsFileWrittenByNumpy) {
  absl::StatusOr<NpyArray> array = ParseNpy(FromHex(kNumpy2x3Hex), "a.npy");
  ASSERT_THAT(array, IsOk());
  EXPECT_THAT(array->shape, ElementsAre(2, 3));
  EXPECT_THAT(array->data, ElementsAre(-0.625f, -0.375f, -0.125f, 0.125f, 0.375f, 0.625f));
}

TEST(ParseNpyTest, ReadsScalarWrittenByNumpy) {
  absl::StatusOr<NpyArray> array = ParseNpy(FromHex(kNumpyScalarHex), "s.npy");
  ASSERT_THAT(array, IsOk());
  EXPECT_THAT(array->shape, IsEmpty());
  EXPECT_THAT(array->data, ElementsAre(1.5f));
}

TEST(ParseNpyTest, ReadsVersions2And3WrittenByNumpy) {
  for (const char* hex : {kNumpyVersion2Hex, kNumpyVersion3Hex}) {
    absl::StatusOr<NpyArray> array = ParseNpy(FromHex(hex), "v.npy");
    ASSERT_THAT(array, IsOk());
    EXPECT_THAT(array->shape, ElementsAre(3));
    EXPECT_THAT(array->data, ElementsAre(1.0f, -2.0f, 0.25f));
  }
}

TEST(SerializeNpyTest, MatchesNumpyByteForByte) {
  const std::vector<float> data = {-0.625f, -0.375f, -0.125f, 0.125f, 0.375f, 0.625f};
  EXPECT_EQ(absl::BytesToHexString(SerializeNpy({2, 3}, data)), kNumpy2x3Hex);
  EXPECT_EQ(absl::BytesToHexString(SerializeNpy({}, {1.5f})), kNumpyScalarHex);
}

TEST(SerializeNpyTest, LeavesRoomForTheFirstDimensionLikeNumpy) {
  // np.save(f, np.full((1,) * 15, 2.0, '<f4')) writes a 182-byte header: the dict, 83 spaces
  // and '\n'. Without numpy's spare space for the first dimension the header would be 118 bytes.
  const std::string dict =
      "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, "
      "1, 1), }";
  const std::string expected =
      absl::StrCat("\x93NUMPY\x01", std::string("\0\xb6\0", 3), dict, std::string(83, ' '), "\n",
                   std::string("\0\0\0\x40", 4));
  EXPECT_EQ(absl::BytesToHexString(SerializeNpy(std::vector<int64_t>(15, 1), {2.0f})),
            absl::BytesToHexString(expected));
}

TEST(SerializeNpyTest, DataStartsAtMultipleOf64) {
  // Covers header texts of many lengths, including ones already aligned before padding.
  std::vector<int64_t> shape;
  for (int rank = 0; rank < 40; ++rank) {
    const std::string bytes = SerializeNpy(shape, {});
    ASSERT_GE(bytes.size(), 10u);
    const size_t header_length = static_cast<unsigned char>(bytes[8]) |
                                 (static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    EXPECT_EQ(bytes.size(), 10 + header_length) << "rank " << rank;
    EXPECT_EQ(bytes.size() % 64, 0u) << "rank " << rank;
    EXPECT_EQ(bytes.back(), '\n');
    shape.push_back(rank % 3 == 0 ? 0 : 12345);
  }
}

TEST(NpyRoundTripTest, PreservesShapeAndEveryBit) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const float denormal = std::numeric_limits<float>::denorm_min();
  const struct {
    std::vector<int64_t> shape;
    std::vector<float> data;
  } cases[] = {
      {{}, {-0.0f}},
      {{0}, {}},
      {{3, 0, 2}, {}},
      {{4}, {nan, -nan, inf, -inf}},
      {{2, 2}, {denormal, -denormal, std::numeric_limits<float>::max(), 1e-30f}},
      {{1, 1, 2, 3}, {1, 2, 3, 4, 5, 6}},
  };
  for (const auto& c : cases) {
    const std::string bytes = SerializeNpy(c.shape, c.data);
    absl::StatusOr<NpyArray> parsed = ParseNpy(bytes, "round_trip.npy");
    ASSERT_THAT(parsed, IsOk());
    EXPECT_EQ(parsed->shape, c.shape);
    EXPECT_EQ(AllBits(parsed->data), AllBits(c.data));
  }
}

TEST(NpyRoundTripTest, LargeRankFallsBackToVersion2LikeNumpy) {
  // 30000 dimensions of 1 make a header longer than version 1.0's 65535 bytes.
  const std::vector<int64_t> shape(30000, 1);
  const std::string bytes = SerializeNpy(shape, {7.0f});
  ASSERT_GT(bytes.size(), 65536u);
  EXPECT_EQ(bytes[6], '\x02');
  EXPECT_EQ((bytes.size() - 4) % 64, 0u);
  absl::StatusOr<NpyArray> parsed = ParseNpy(bytes, "wide.npy");
  ASSERT_THAT(parsed, IsOk());
  EXPECT_EQ(parsed->shape, shape);
  EXPECT_THAT(parsed->data, ElementsAre(7.0f));
}

TEST(ParseNpyTest, AcceptsHeaderVariationsNumpyAccepts) {
  const std::string four_values = FloatBytes(4);
  for (absl::string_view dict : {
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
           "{'descr':'<f4','fortran_order':False,'shape':(2,2)}",
           "{\"shape\": (4,), \"fortran_order\": False, \"descr\": \"<f4\"}",
           "{'descr': '=f4', 'fortran_order': False, 'shape': (1, 4)}",
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 2L), }",
           "{'descr': '<f4', 'fortran_order': False, 'shape': ((4,)), }",
           "  {'descr': '<f4',\n 'fortran_order': False,\n 'shape': (+4,)}\n\n",
       }) {
    EXPECT_THAT(ParseNpy(MakeNpy(dict, four_values), "ok.npy"), IsOk()) << dict;
  }
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("'<f4'", "False", "(2, 2)"), four_values, 2), "v2.npy"),
              IsOk());
}

TEST(ParseNpyTest, RejectsBadMagic) {
  std::string bytes = FromHex(kNumpy2x3Hex);
  bytes[5] = 'X';
  EXPECT_THAT(ParseNpy(bytes, "img.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("img.npy"), HasSubstr("bad magic"))));
  EXPECT_THAT(ParseNpy("PK\x03\x04 a zip file", "img.npz"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("img.npz"), HasSubstr("not a .npy file"))));
}

TEST(ParseNpyTest, RejectsTruncatedPrefix) {
  const std::string bytes = FromHex(kNumpy2x3Hex);
  EXPECT_THAT(ParseNpy("", "empty.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("empty.npy"), HasSubstr("truncated"))));
  EXPECT_THAT(ParseNpy(bytes.substr(0, 7), "x.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("before the format version")));
  EXPECT_THAT(ParseNpy(bytes.substr(0, 9), "x.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("before the header length")));
  EXPECT_THAT(ParseNpy(bytes.substr(0, 100), "x.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("header length 118"), HasSubstr("past the end"))));
}

TEST(ParseNpyTest, RejectsUnsupportedVersion) {
  std::string bytes = FromHex(kNumpy2x3Hex);
  bytes[6] = '\x04';
  EXPECT_THAT(ParseNpy(bytes, "new.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("new.npy"), HasSubstr("version 4.0"))));
  bytes[6] = '\x01';
  bytes[7] = '\x01';
  EXPECT_THAT(ParseNpy(bytes, "new.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("version 1.1")));
  bytes[6] = '\x00';
  bytes[7] = '\x00';
  EXPECT_THAT(ParseNpy(bytes, "new.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("version 0.0")));
}

TEST(ParseNpyTest, RejectsMalformedHeader) {
  const std::string data = FloatBytes(6);
  for (absl::string_view dict : {
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), ",
           "{'descr': '<f4' 'fortran_order': False, 'shape': (2, 3)}",
           "{'descr': '<f4, 'fortran_order': False, 'shape': (2, 3)}",
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} trailing",
           "{'descr': '<f4', 'fortran_order': false, 'shape': (2, 3)}",
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2.0, 3)}",
           "{'descr': '<f4', 'fortran_order': False, 'shape': (0x2, 3)}",
           "{'descr': '<f4', 'fortran_order': False, 'shape': (,)}",
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3),,}",
           "{'descr': '<f4', 'fortran_order': False, 'shape': (2 3)}",
           "",
           "   ",
       }) {
    EXPECT_THAT(ParseNpy(MakeNpy(dict, data), "h.npy"),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("h.npy"), HasSubstr("malformed .npy header"),
                               HasSubstr("at offset"))))
        << dict;
  }
}

TEST(ParseNpyTest, RejectsHeaderWithWrongStructure) {
  const std::string data = FloatBytes(6);
  const struct {
    absl::string_view dict;
    absl::string_view message;
  } cases[] = {
      {"[('descr', '<f4')]", "expected a dict literal"},
      {"{'descr': '<f4', 'shape': (2, 3)}", "expected exactly 'descr', 'fortran_order' and"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'extra': 1}",
       "keys are {'descr', 'fortran_order', 'shape', 'extra'}"},
      {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}",
       "keys are {'descr', 'descr', 'fortran_order', 'shape'}"},
      {"{1: '<f4', 'fortran_order': False, 'shape': (2, 3)}", "keys are {1, 'fortran_order'"},
      {"{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3)}",
       "fortran_order=0 is not True or False"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': [2, 3]}",
       "shape=[2, 3] is not a tuple of ints"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': 6}", "shape=6 is not a tuple of ints"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, '3')}", "shape[1]='3' is not an int"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, None)}",
       "shape[1]=None is not an int"},
  };
  for (const auto& c : cases) {
    EXPECT_THAT(ParseNpy(MakeNpy(c.dict, data), "h.npy"),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("h.npy"), HasSubstr(std::string(c.message)))))
        << c.dict;
  }
}

TEST(ParseNpyTest, RejectsDeepNestingWithoutExhaustingTheStack) {
  const std::string shape = absl::StrCat(std::string(100000, '('), "6,", std::string(100000, ')'));
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("'<f4'", "False", shape), FloatBytes(6)), "deep.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("deep.npy"), HasSubstr("nested more than"))));
}

TEST(ParseNpyTest, RejectsFortranOrder) {
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("'<f4'", "True", "(2, 3)"), FloatBytes(6)), "f.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("f.npy"), HasSubstr("fortran_order=True"))));
}

TEST(ParseNpyTest, RejectsOtherDtypesNamingThem) {
  for (absl::string_view descr : {"'<i4'", "'<i8'", "'|u1'", "'<u4'", "'<c8'", "'|b1'", "'<U4'",
                                  "'|O'", "'f4'", "'<f16'", "'<f1'", "'<f3'", "''", "'<f4 '"}) {
    EXPECT_THAT(ParseNpy(MakeNpy(Dict(descr, "False", "(2, 3)"), FloatBytes(6)), "d.npy"),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("d.npy"), HasSubstr(absl::StrCat("descr=", descr)),
                               HasSubstr("expected float32, float64 or float16"))))
        << descr;
  }
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("[('x', '<f4')]", "False", "(2, 3)"), FloatBytes(6)), "d.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("descr=[('x', '<f4')]"), HasSubstr("structured"))));
}

TEST(ParseNpyTest, NativeAndNotApplicableByteOrdersAreLittleEndianFloat32) {
  const std::string data("\x00\x00\xc0\x3f", 4);  // 1.5f
  for (absl::string_view descr : {"'<f4'", "'=f4'", "'|f4'"}) {
    absl::StatusOr<NpyArray> array = ParseNpy(MakeNpy(Dict(descr, "False", "(1,)"), data), "n.npy");
    ASSERT_THAT(array, IsOk()) << descr;
    EXPECT_THAT(array->data, ElementsAre(1.5f)) << descr;
    EXPECT_EQ(array->converted_from, "") << descr;
  }
}

// np.save(f, np.array([[0.1, -1/3, 1e300, -1e300],
//                      [3.4028235677973366e38, 3.4028235e38 * 1.0000001, 1e-46, 1.5e-45],
//                      [np.nan, -0.0, 2.0**-150, 2.0**-149 * 1.5]], dtype='<f8'))
// with numpy 1.24. 3.4028235677973366e38 is FLT_MAX + 2^103, the tie between FLT_MAX and 2^128.
const char kNumpyFloat64Hex[] =
    "934e554d5059010076007b276465736372273a20273c6638272c2027666f727472616e5f6f72646572273a2046616c"
    "73652c20277368617065273a2028332c2034292c207d20202020202020202020202020202020202020202020202020"
    "2020202020202020202020202020202020202020202020202020202020202020200a9a9999999999b93f5555555555"
    "55d5bf9c7500883ce4377e9c7500883ce437fe000000f0ffffef4781ca7e0d0000f04761552c24ce4462360b90e941"
    "8120a136000000000000f87f00000000000000800000000000009036000000000000a836";
// The same array's .astype('<f4').view('<u4'): numpy's own (hardware) conversion.
const uint32_t kNumpyFloat64AsFloat32Bits[] = {1036831949, 3198855851, 2139095040, 4286578688,
                                               2139095040, 2139095040, 0,          1,
                                               2143289344, 2147483648, 0,          2};

TEST(ParseNpyTest, ConvertsFloat64WrittenByNumpyAsNumpyDoes) {
  absl::StatusOr<NpyArray> array = ParseNpy(FromHex(kNumpyFloat64Hex), "f64.npy");
  ASSERT_THAT(array, IsOk());
  EXPECT_THAT(array->shape, ElementsAre(3, 4));
  EXPECT_EQ(array->converted_from, "<f8");
  EXPECT_EQ(AllBits(array->data), std::vector<uint32_t>(std::begin(kNumpyFloat64AsFloat32Bits),
                                                        std::end(kNumpyFloat64AsFloat32Bits)));
}

// np.save(f, np.array(VALUES, dtype=DTYPE)) with numpy 1.24, and numpy's .astype('<f4') of it.
struct NumpyBigEndianCase {
  const char* descr;
  const char* hex;
  std::vector<uint32_t> float32_bits;
};

TEST(ParseNpyTest, ConvertsBigEndianFloatsWrittenByNumpy) {
  const NumpyBigEndianCase cases[] = {
      // [1.5, -2.0, 0.1]
      {">f4",
       "934e554d5059010076007b276465736372273a20273e6634272c2027666f727472616e5f6f72646572273a20"
       "46616c73652c20277368617065273a2028332c292c207d202020202020202020202020202020202020202020"
       "2020202020202020202020202020202020202020202020202020202020202020202020202020200a3fc00000"
       "c00000003dcccccd",
       {1069547520, 3221225472, 1036831949}},
      // [0.1, -2.0]
      {">f8",
       "934e554d5059010076007b276465736372273a20273e6638272c2027666f727472616e5f6f72646572273a20"
       "46616c73652c20277368617065273a2028322c292c207d202020202020202020202020202020202020202020"
       "2020202020202020202020202020202020202020202020202020202020202020202020202020200a3fb99999"
       "9999999ac000000000000000",
       {1036831949, 3221225472}},
      // [1.5, -2.0, 65504.0, 6e-8]: the largest float16 and a subnormal one.
      {">f2",
       "934e554d5059010076007b276465736372273a20273e6632272c2027666f727472616e5f6f72646572273a20"
       "46616c73652c20277368617065273a2028342c292c207d202020202020202020202020202020202020202020"
       "2020202020202020202020202020202020202020202020202020202020202020202020202020200a3e00c000"
       "7bff0001",
       {1069547520, 3221225472, 1199562752, 864026624}},
  };
  for (const NumpyBigEndianCase& c : cases) {
    absl::StatusOr<NpyArray> array = ParseNpy(FromHex(c.hex), "be.npy");
    ASSERT_THAT(array, IsOk()) << c.descr;
    EXPECT_EQ(array->converted_from, c.descr);
    EXPECT_EQ(AllBits(array->data), c.float32_bits) << c.descr;
  }
}

// The value of the float16 with these bits, computed from the definition of IEEE 754
// binary16 (1 sign bit, 5 exponent bits biased by 15, 10 mantissa bits), independently of the
// bit manipulation the library does. NaN comes back as NaN (the caller checks its bits).
double Float16Reference(uint16_t bits) {
  const double sign = (bits & 0x8000) != 0 ? -1.0 : 1.0;
  const int exponent = (bits >> 10) & 0x1F;
  const int mantissa = bits & 0x3FF;
  if (exponent == 0x1F) {
    return mantissa == 0 ? sign * std::numeric_limits<double>::infinity()
                         : std::numeric_limits<double>::quiet_NaN();
  }
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);  // zero and subnormals
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

TEST(ParseNpyTest, ConvertsEveryFloat16ExactlyInBothByteOrders) {
  std::string little, big;
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    little.push_back(static_cast<char>(bits & 0xFF));
    little.push_back(static_cast<char>(bits >> 8));
    big.push_back(static_cast<char>(bits >> 8));
    big.push_back(static_cast<char>(bits & 0xFF));
  }
  for (const auto& [descr, data] :
       {std::pair<std::string, std::string>{"<f2", little}, {">f2", big}}) {
    absl::StatusOr<NpyArray> array =
        ParseNpy(MakeNpy(Dict(absl::StrCat("'", descr, "'"), "False", "(65536,)"), data), "h.npy");
    ASSERT_THAT(array, IsOk()) << descr;
    ASSERT_EQ(array->data.size(), 65536u);
    EXPECT_EQ(array->converted_from, descr);
    int mismatches = 0;
    for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
      const float actual = array->data[bits];
      ASSERT_EQ(Bits(actual), Bits(Float16ToFloat32(static_cast<uint16_t>(bits))))
          << "ParseNpy and Float16ToFloat32 differ at 0x" << std::hex << bits;
      const double expected = Float16Reference(static_cast<uint16_t>(bits));
      const bool sign = (bits & 0x8000) != 0;
      bool ok;
      if (std::isnan(expected)) {
        // NaN stays NaN with its sign and its payload in the top mantissa bits, which keeps a
        // quiet NaN quiet and a signaling one signaling (as the F16C instruction does).
        ok = std::isnan(actual) && std::signbit(actual) == sign &&
             (Bits(actual) & 0x7FFFFF) == (bits & 0x3FF) << 13;
      } else {
        // Every float16 is a float32, so the conversion is exact: same value, same sign (-0).
        ok = static_cast<double>(actual) == expected && std::signbit(actual) == sign;
      }
      if (!ok && ++mismatches <= 10) {
        ADD_FAILURE() << descr << " 0x" << std::hex << bits << ": got " << actual << ", expected "
                      << expected;
      }
    }
    EXPECT_EQ(mismatches, 0) << descr;
  }
}

TEST(Float64ToFloat32Test, RoundsToNearestEvenAndOverflowsToInfinity) {
  constexpr float kMax = std::numeric_limits<float>::max();
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const double tie = static_cast<double>(kMax) + 0x1p103;  // halfway between FLT_MAX and 2^128
  struct Case {
    double value;
    float expected;
  };
  const Case cases[] = {
      {1.0, 1.0f},
      {1.0 + 0x1p-24, 1.0f},                       // tie: to even (1.0)
      {1.0 + 0x1p-23 + 0x1p-24, 1.0f + 0x1p-22f},  // tie: to even (up)
      {1.0 + 0x1p-24 + 0x1p-40, 1.0f + 0x1p-23f},  // above the tie: up
      {static_cast<double>(kMax), kMax},
      {std::nextafter(tie, 0.0), kMax},
      {tie, kInf},
      {-tie, -kInf},
      {1e300, kInf},
      {-1e300, -kInf},
      {std::numeric_limits<double>::max(), kInf},
      {std::numeric_limits<double>::infinity(), kInf},
      {-std::numeric_limits<double>::infinity(), -kInf},
      {0x1p-149, 0x1p-149f},  // the smallest float32 subnormal
      {0x1p-150, 0.0f},       // tie: to even (0)
      {0x1p-150 + 0x1p-200, 0x1p-149f},
      {-0.0, -0.0f},
  };
  for (const Case& c : cases) {
    const float actual = Float64ToFloat32(c.value);
    EXPECT_EQ(Bits(actual), Bits(c.expected)) << c.value << " -> " << actual;
  }
  EXPECT_TRUE(std::isnan(Float64ToFloat32(std::numeric_limits<double>::quiet_NaN())));
  // In range, the conversion is the hardware's (static_cast): random finite doubles whose
  // magnitude is below the tie.
  std::mt19937_64 random(7);
  for (int i = 0; i < 100000; ++i) {
    uint64_t bits = random();
    double value;
    std::memcpy(&value, &bits, sizeof(value));
    if (!std::isfinite(value)) continue;
    int exponent = 0;
    value = std::ldexp(std::frexp(value, &exponent), static_cast<int>(random() % 300) - 160);
    if (std::abs(value) >= tie) continue;
    ASSERT_EQ(Bits(Float64ToFloat32(value)), Bits(static_cast<float>(value))) << value;
  }
}

TEST(ParseNpyTest, TruncatedDataNamesTheFilesDtype) {
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("'<f8'", "False", "(2, 3)"), FloatBytes(6)), "t.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("shape (2, 3) needs 6 float64 values but only 24 bytes (3 "
                                 "values)")));
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("'>f2'", "False", "(2,)"), FloatBytes(2)), "t.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("4 extra bytes after the data: shape (2,) needs 4 bytes")));
}

// The little-endian bytes of `values`.
std::string Int64Bytes(const std::vector<int64_t>& values) {
  std::string bytes;
  for (int64_t value : values) {
    for (int i = 0; i < 8; ++i) {
      bytes.push_back(static_cast<char>((static_cast<uint64_t>(value) >> (8 * i)) & 0xFF));
    }
  }
  return bytes;
}

TEST(ParseNpyInt64Test, ReadsInt64Arrays) {
  const std::vector<int64_t> values = {
      3, -100, 0, std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min(), 1};
  for (absl::string_view descr : {"'<i8'", "'=i8'"}) {
    absl::StatusOr<NpyInt64Array> array =
        ParseNpyInt64(MakeNpy(Dict(descr, "False", "(2, 3)"), Int64Bytes(values)), "l.npy");
    ASSERT_THAT(array, IsOk()) << descr;
    EXPECT_THAT(array->shape, ElementsAre(2, 3));
    EXPECT_EQ(array->data, values);
  }
  absl::StatusOr<NpyInt64Array> scalar =
      ParseNpyInt64(MakeNpy(Dict("'<i8'", "False", "()"), Int64Bytes({7})), "s.npy");
  ASSERT_THAT(scalar, IsOk());
  EXPECT_THAT(scalar->shape, IsEmpty());
  EXPECT_THAT(scalar->data, ElementsAre(7));
  absl::StatusOr<NpyInt64Array> empty =
      ParseNpyInt64(MakeNpy(Dict("'<i8'", "False", "(0, 4)"), "", 2), "e.npy");
  ASSERT_THAT(empty, IsOk());
  EXPECT_THAT(empty->data, IsEmpty());
}

TEST(ParseNpyInt64Test, RejectsOtherDtypesNamingThem) {
  for (absl::string_view descr :
       {"'<f4'", "'<u8'", "'<u4'", "'<i2'", "'|i1'", "'|u1'", "'<f8'", "'i8'", "'<i16'"}) {
    EXPECT_THAT(ParseNpyInt64(MakeNpy(Dict(descr, "False", "(2,)"), Int64Bytes({1, 2})), "l.npy"),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("l.npy"), HasSubstr(absl::StrCat("descr=", descr)),
                               HasSubstr("expected int64 or int32"))))
        << descr;
  }
  EXPECT_THAT(
      ParseNpyInt64(MakeNpy(Dict("[('x', '<i8')]", "False", "(2,)"), Int64Bytes({1, 2})), "s.npy"),
      StatusIs(absl::StatusCode::kInvalidArgument,
               AllOf(HasSubstr("structured"), HasSubstr("expected int64 or int32"))));
  EXPECT_THAT(ParseNpyInt64(MakeNpy(Dict("'<i8'", "True", "(2,)"), Int64Bytes({1, 2})), "f.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("fortran_order=True")));
  // And the float reader keeps refusing integer files.
  for (absl::string_view descr : {"'<i8'", "'<i4'", "'>i8'"}) {
    EXPECT_THAT(ParseNpy(MakeNpy(Dict(descr, "False", "(2,)"), Int64Bytes({1, 2})), "f.npy"),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr(absl::StrCat("descr=", descr)),
                               HasSubstr("expected float32, float64 or float16"))));
  }
}

TEST(ParseNpyInt64Test, ConvertsInt32AndBigEndianWrittenByNumpy) {
  struct Case {
    const char* descr;
    const char* hex;
    std::vector<int64_t> shape;
    std::vector<int64_t> values;
  };
  // np.save(f, np.array(VALUES, dtype=DESCR)) with numpy 1.24.
  const Case cases[] = {
      {"<i4",
       "934e554d5059010076007b276465736372273a20273c6934272c2027666f727472616e5f6f72646572273a20"
       "46616c73652c20277368617065273a2028322c2032292c207d20202020202020202020202020202020202020"
       "2020202020202020202020202020202020202020202020202020202020202020202020202020200a03000000"
       "9cffffffffffff7f00000080",
       {2, 2},
       {3, -100, 2147483647, -2147483648LL}},
      {">i8",
       "934e554d5059010076007b276465736372273a20273e6938272c2027666f727472616e5f6f72646572273a20"
       "46616c73652c20277368617065273a2028332c292c207d202020202020202020202020202020202020202020"
       "2020202020202020202020202020202020202020202020202020202020202020202020202020200a00000000"
       "00000003ffffffffffffff9c4000000000000000",
       {3},
       {3, -100, int64_t{1} << 62}},
      {">i4",
       "934e554d5059010076007b276465736372273a20273e6934272c2027666f727472616e5f6f72646572273a20"
       "46616c73652c20277368617065273a2028322c292c207d202020202020202020202020202020202020202020"
       "2020202020202020202020202020202020202020202020202020202020202020202020202020200a00000001"
       "fffffff9",
       {2},
       {1, -7}},
  };
  for (const Case& c : cases) {
    absl::StatusOr<NpyInt64Array> array = ParseNpyInt64(FromHex(c.hex), "l.npy");
    ASSERT_THAT(array, IsOk()) << c.descr;
    EXPECT_EQ(array->shape, c.shape) << c.descr;
    EXPECT_EQ(array->data, c.values) << c.descr;
    EXPECT_EQ(array->converted_from, c.descr);
  }
  // '=' and '|' are little-endian; int64 ones need no conversion.
  for (absl::string_view descr : {"'=i8'", "'|i8'"}) {
    absl::StatusOr<NpyInt64Array> array =
        ParseNpyInt64(MakeNpy(Dict(descr, "False", "(2,)"), Int64Bytes({5, -6})), "l.npy");
    ASSERT_THAT(array, IsOk()) << descr;
    EXPECT_THAT(array->data, ElementsAre(5, -6));
    EXPECT_EQ(array->converted_from, "") << descr;
  }
  absl::StatusOr<NpyInt64Array> native =
      ParseNpyInt64(MakeNpy(Dict("'=i4'", "False", "(2,)"), Int64Bytes({-2})), "l.npy");
  ASSERT_THAT(native, IsOk());
  EXPECT_THAT(native->data, ElementsAre(-2, -1));
  EXPECT_EQ(native->converted_from, "=i4");
}

TEST(ParseNpyInt64Test, RejectsDataOfTheWrongLength) {
  const std::string header = Dict("'<i8'", "False", "(2, 3)");
  EXPECT_THAT(
      ParseNpyInt64(MakeNpy(header, Int64Bytes({1, 2, 3, 4, 5})), "t.npy"),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("shape (2, 3) needs 6 int64 values but only 40 bytes (5 values)")));
  EXPECT_THAT(ParseNpyInt64(MakeNpy(header, Int64Bytes({1, 2, 3, 4, 5, 6}) + "xyz"), "t.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("3 extra bytes after the data: shape (2, 3) needs 48 bytes")));
  // 6 float32 values are 24 bytes, not 6 int64 ones.
  EXPECT_THAT(ParseNpyInt64(MakeNpy(header, FloatBytes(6)), "t.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("truncated")));
}

TEST(ParseNpyTest, RejectsNegativeDimension) {
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("'<f4'", "False", "(2, -3)"), FloatBytes(6)), "n.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("n.npy"), HasSubstr("shape[1]=-3 is negative"))));
}

TEST(ParseNpyTest, RejectsElementCountOverflow) {
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("'<f4'", "False", "(4294967296, 4294967296)"), ""), "o.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("o.npy"), HasSubstr("(4294967296, 4294967296)"),
                             HasSubstr("overflows int64"))));
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("'<f4'", "False", "(99999999999999999999,)"), ""), "o.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("shape[0]=99999999999999999999 overflows int64")));
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("'<f4'", "False", "(9223372036854775808,)"), ""), "o.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("overflows int64")));
  // 2^62 elements fit in int64 but not in the file.
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("'<f4'", "False", "(4611686018427387904,)"), ""), "o.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("truncated")));
}

TEST(ParseNpyTest, ZeroDimensionMakesHugeShapesEmpty) {
  absl::StatusOr<NpyArray> array =
      ParseNpy(MakeNpy(Dict("'<f4'", "False", "(4294967296, 4294967296, 0)"), ""), "z.npy");
  ASSERT_THAT(array, IsOk());
  EXPECT_THAT(array->shape, ElementsAre(4294967296, 4294967296, 0));
  EXPECT_THAT(array->data, IsEmpty());
}

TEST(ParseNpyTest, RejectsTruncatedData) {
  const std::string bytes = FromHex(kNumpy2x3Hex);
  EXPECT_THAT(ParseNpy(bytes.substr(0, bytes.size() - 1), "t.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("t.npy"), HasSubstr("truncated"),
                             HasSubstr("shape (2, 3) needs 6 float32 values"),
                             HasSubstr("only 23 bytes"))));
}

TEST(ParseNpyTest, RejectsTrailingData) {
  EXPECT_THAT(ParseNpy(absl::StrCat(FromHex(kNumpy2x3Hex), std::string(4, '\0')), "x.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("x.npy"), HasSubstr("extra bytes"))));
  // A header whose shape says fewer elements than the data holds.
  EXPECT_THAT(
      ParseNpy(MakeNpy(Dict("'<f4'", "False", "(2, 2)"), FloatBytes(6)), "x.npy"),
      StatusIs(absl::StatusCode::kInvalidArgument,
               AllOf(HasSubstr("8 extra bytes"), HasSubstr("shape (2, 2) needs 16 bytes"))));
  EXPECT_THAT(ParseNpy(MakeNpy(Dict("'<f4'", "False", "()"), FloatBytes(2)), "x.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("shape () needs 4 bytes")));
}

TEST(ParseNpyTest, LongSuffixOnlyInVersions1And2) {
  const std::string dict = Dict("'<f4'", "False", "(2L,)");
  EXPECT_THAT(ParseNpy(MakeNpy(dict, FloatBytes(2), 2), "l.npy"), IsOk());
  EXPECT_THAT(ParseNpy(MakeNpy(dict, FloatBytes(2), 3), "l.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("malformed .npy header")));
}

// Every mutation of a valid file must either parse into a consistent array or fail cleanly.
void ExpectParsesOrFailsCleanly(const std::string& bytes) {
  absl::StatusOr<NpyArray> array = ParseNpy(bytes, "fuzz.npy");
  if (array.ok()) {
    int64_t count = 1;
    for (int64_t dim : array->shape) {
      ASSERT_GE(dim, 0);
      count *= dim;
    }
    ASSERT_EQ(static_cast<size_t>(count), array->data.size());
  } else {
    ASSERT_EQ(array.status().code(), absl::StatusCode::kInvalidArgument) << array.status();
    ASSERT_THAT(std::string(array.status().message()), HasSubstr("fuzz.npy"));
  }
}

TEST(ParseNpyFuzzTest, TruncationsAtEveryLength) {
  for (const char* hex : {kNumpy2x3Hex, kNumpyScalarHex, kNumpyVersion2Hex}) {
    const std::string bytes = FromHex(hex);
    for (size_t length = 0; length < bytes.size(); ++length) {
      ExpectParsesOrFailsCleanly(bytes.substr(0, length));
      EXPECT_FALSE(ParseNpy(bytes.substr(0, length), "fuzz.npy").ok()) << length;
    }
  }
}

TEST(ParseNpyFuzzTest, RandomMutationsNeverCrash) {
  const std::vector<std::string> seeds = {
      FromHex(kNumpy2x3Hex), FromHex(kNumpyScalarHex), FromHex(kNumpyVersion3Hex),
      SerializeNpy({1, 2, 1}, {1, 2}), MakeNpy(Dict("'<f4'", "False", "((((2,),),),)"), "")};
  // Characters that steer the header parser into its less common paths.
  const std::string header_alphabet = "(){}[],:'\"\\ -+0123456789LTrueFalsNn\n\t.x";
  std::mt19937 rng(12345);
  int parsed = 0;
  for (int iteration = 0; iteration < 30000; ++iteration) {
    std::string bytes = seeds[iteration % seeds.size()];
    const int mutations = 1 + static_cast<int>(rng() % 4);
    for (int m = 0; m < mutations; ++m) {
      const size_t position = bytes.empty() ? 0 : rng() % bytes.size();
      switch (rng() % 6) {
        case 0:  // Flip a bit anywhere, including the version and length fields.
          if (!bytes.empty()) bytes[position] ^= static_cast<char>(1u << (rng() % 8));
          break;
        case 1:  // Replace a byte with a header character.
          if (!bytes.empty()) bytes[position] = header_alphabet[rng() % header_alphabet.size()];
          break;
        case 2:  // Insert a header character.
          bytes.insert(position, 1, header_alphabet[rng() % header_alphabet.size()]);
          break;
        case 3:  // Delete a run.
          bytes.erase(position, 1 + rng() % 8);
          break;
        case 4:  // Truncate.
          bytes.resize(position);
          break;
        case 5:  // Append junk.
          bytes.append(1 + rng() % 8, static_cast<char>(rng()));
          break;
      }
    }
    ExpectParsesOrFailsCleanly(bytes);
    if (HasFatalFailure()) return;
    if (ParseNpy(bytes, "fuzz.npy").ok()) ++parsed;
  }
  // The mutations are gentle enough that some still parse, so both outcomes are exercised.
  EXPECT_GT(parsed, 0);
}

class NpyFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = absl::StrCat(::testing::TempDir(), "npy_test_XXXXXX");
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  std::string dir_;
};

TEST_F(NpyFileTest, WriteThenRead) {
  const std::string path = absl::StrCat(dir_, "/grad.npy");
  ASSERT_THAT(WriteNpyFile(path, {2, 1, 2}, {1.0f, -2.0f, 3.5f, 0.0f}), IsOk());
  absl::StatusOr<NpyArray> array = ReadNpyFile(path);
  ASSERT_THAT(array, IsOk());
  EXPECT_THAT(array->shape, ElementsAre(2, 1, 2));
  EXPECT_THAT(array->data, ElementsAre(1.0f, -2.0f, 3.5f, 0.0f));
}

TEST_F(NpyFileTest, ReadMissingFileIsNotFound) {
  const std::string path = absl::StrCat(dir_, "/missing.npy");
  EXPECT_THAT(ReadNpyFile(path),
              StatusIs(absl::StatusCode::kNotFound, AllOf(HasSubstr(path), HasSubstr("open"))));
}

TEST_F(NpyFileTest, ReadDirectoryFails) {
  EXPECT_THAT(ReadNpyFile(dir_), StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr(dir_)));
}

TEST_F(NpyFileTest, ReadErrorsNameThePath) {
  const std::string path = absl::StrCat(dir_, "/bad.npy");
  std::ofstream(path) << "not numpy";
  EXPECT_THAT(ReadNpyFile(path), StatusIs(absl::StatusCode::kInvalidArgument,
                                          AllOf(HasSubstr(path), HasSubstr("bad magic"))));
}

TEST_F(NpyFileTest, WriteRejectsInconsistentArguments) {
  const std::string path = absl::StrCat(dir_, "/w.npy");
  EXPECT_THAT(WriteNpyFile(path, {2, 3}, {1.0f}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr(path), HasSubstr("(2, 3) with 1 values"))));
  EXPECT_THAT(WriteNpyFile(path, {-1}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("shape[0]=-1 is negative")));
  EXPECT_THAT(WriteNpyFile(path, {1LL << 40, 1LL << 40, 1LL << 40}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("overflows")));
  EXPECT_THAT(ReadNpyFile(path), StatusIs(absl::StatusCode::kNotFound, HasSubstr(path)));
}

TEST_F(NpyFileTest, ReadsInt64Files) {
  const std::string path = absl::StrCat(dir_, "/labels.npy");
  std::ofstream(path, std::ios::binary)
      << MakeNpy(Dict("'<i8'", "False", "(3,)"), Int64Bytes({2, -100, 0}));
  absl::StatusOr<NpyInt64Array> labels = ReadNpyInt64File(path);
  ASSERT_THAT(labels, IsOk());
  EXPECT_THAT(labels->shape, ElementsAre(3));
  EXPECT_THAT(labels->data, ElementsAre(2, -100, 0));
  EXPECT_THAT(ReadNpyFile(path), StatusIs(absl::StatusCode::kInvalidArgument,
                                          AllOf(HasSubstr(path), HasSubstr("'<i8'"))));
  const std::string missing = absl::StrCat(dir_, "/missing.npy");
  EXPECT_THAT(ReadNpyInt64File(missing), StatusIs(absl::StatusCode::kNotFound, HasSubstr(missing)));
  EXPECT_THAT(ReadNpyInt64File(dir_),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr(dir_)));
}

TEST_F(NpyFileTest, WriteIntoMissingDirectoryIsNotFound) {
  const std::string path = absl::StrCat(dir_, "/no/such/dir/w.npy");
  EXPECT_THAT(WriteNpyFile(path, {1}, {1.0f}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr(path)));
}

// Cross-checks against the real numpy when /usr/bin/python3 has it (the project's test
// dependencies install it; the test skips, visibly, elsewhere).
constexpr char kPython[] = "/usr/bin/python3";

bool HavePythonModule(absl::string_view module) {
  const std::string command = absl::StrCat(kPython, " -c 'import ", module, "' >/dev/null 2>&1");
  return std::system(command.c_str()) == 0;
}

TEST_F(NpyFileTest, InteroperatesWithNumpy) {
  if (!HavePythonModule("numpy")) GTEST_SKIP() << kPython << " with numpy is not available";
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 10.0f);
  const std::vector<std::vector<int64_t>> shapes = {{},
                                                    {0},
                                                    {5},
                                                    {2, 3},
                                                    {1, 1, 28, 28},
                                                    {8, 1, 3, 3},
                                                    {0, 4},
                                                    {3, 1, 2, 1, 2},
                                                    {2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3}};
  std::vector<std::vector<float>> datas;
  for (size_t i = 0; i < shapes.size(); ++i) {
    int64_t count = 1;
    for (int64_t dim : shapes[i]) count *= dim;
    std::vector<float> data(count);
    for (float& value : data) value = normal(rng);
    if (count >= 3) {
      data[0] = -0.0f;
      data[1] = std::numeric_limits<float>::infinity();
      data[2] = std::numeric_limits<float>::denorm_min();
    }
    datas.push_back(data);
    ASSERT_THAT(WriteNpyFile(absl::StrCat(dir_, "/in", i, ".npy"), shapes[i], data), IsOk());
  }
  // numpy loads each file, checks that np.save writes the very same bytes, and writes the array
  // times two back in format versions 1.0, 2.0 and 3.0 in turn.
  const std::string script = absl::StrCat(
      "import io, sys\n"
      "import numpy as np\n"
      "d, n = sys.argv[1], int(sys.argv[2])\n"
      "for i in range(n):\n"
      "    p = '%s/in%d.npy' % (d, i)\n"
      "    raw = open(p, 'rb').read()\n"
      "    a = np.load(p)\n"
      "    assert a.dtype == np.dtype('<f4'), a.dtype\n"
      "    b = io.BytesIO(); np.save(b, a)\n"
      "    assert b.getvalue() == raw, (p, b.getvalue()[:128], raw[:128])\n"
      "    with open('%s/out%d.npy' % (d, i), 'wb') as f:\n"
      "        np.lib.format.write_array(f, np.asarray(a * np.float32(2)),\n"
      "                                  version=(i % 3 + 1, 0))\n");
  const std::string script_path = absl::StrCat(dir_, "/check.py");
  std::ofstream(script_path) << script;
  const std::string command =
      absl::StrCat(kPython, " ", script_path, " ", dir_, " ", shapes.size());
  ASSERT_EQ(std::system(command.c_str()), 0) << command;

  for (size_t i = 0; i < shapes.size(); ++i) {
    absl::StatusOr<NpyArray> array = ReadNpyFile(absl::StrCat(dir_, "/out", i, ".npy"));
    ASSERT_THAT(array, IsOk());
    EXPECT_EQ(array->shape, shapes[i]);
    std::vector<float> doubled;
    for (float value : datas[i]) doubled.push_back(value * 2.0f);
    EXPECT_EQ(AllBits(array->data), AllBits(doubled)) << "array " << i;
  }
}

TEST_F(NpyFileTest, ReadsInt64FilesNumpyWrites) {
  if (!HavePythonModule("numpy")) GTEST_SKIP() << kPython << " with numpy is not available";
  const std::string command =
      absl::StrCat(kPython,
                   " -c \"import sys, numpy as np; d = sys.argv[1]; "
                   "np.save(d + '/l1.npy', np.array([[3, -100], [0, 2**62]], dtype=np.int64)); "
                   "np.lib.format.write_array(open(d + '/l2.npy', 'wb'), "
                   "np.arange(-3, 3, dtype='<i8'), version=(2, 0))\" ",
                   dir_);
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  absl::StatusOr<NpyInt64Array> first = ReadNpyInt64File(absl::StrCat(dir_, "/l1.npy"));
  ASSERT_THAT(first, IsOk());
  EXPECT_THAT(first->shape, ElementsAre(2, 2));
  EXPECT_THAT(first->data, ElementsAre(3, -100, 0, int64_t{1} << 62));
  absl::StatusOr<NpyInt64Array> second = ReadNpyInt64File(absl::StrCat(dir_, "/l2.npy"));
  ASSERT_THAT(second, IsOk());
  EXPECT_THAT(second->data, ElementsAre(-3, -2, -1, 0, 1, 2));
}

}  // namespace
}  // namespace gradclient

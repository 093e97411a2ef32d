#include "server/auth.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace gradserver {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string WriteTempFile(const std::string& name, const std::string& contents) {
  const std::string path = absl::StrCat(::testing::TempDir(), "/auth_test_", getpid(), "_", name);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << contents;
  return path;
}

std::unique_ptr<BearerTokens> Tokens(std::vector<std::string> tokens) {
  absl::StatusOr<std::unique_ptr<BearerTokens>> result =
      BearerTokens::FromTokens("tokens", std::move(tokens));
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? *std::move(result) : nullptr;
}

absl::Status CheckOne(const BearerTokens& tokens, absl::string_view value) {
  const absl::string_view values[] = {value};
  return tokens.Check(values);
}

TEST(BearerTokensTest, FileSkipsBlankLinesAndComments) {
  const std::string path =
      WriteTempFile("tokens", "# rotated 2024-05\n\n  old-token \r\n#new-token-soon\nnew-token\n");
  absl::StatusOr<std::unique_ptr<BearerTokens>> tokens =
      BearerTokens::FromFile("auth_token_file", path);
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ((*tokens)->size(), 2u);
  EXPECT_TRUE(CheckOne(**tokens, "Bearer old-token").ok());
  EXPECT_TRUE(CheckOne(**tokens, "Bearer new-token").ok());
  EXPECT_EQ(CheckOne(**tokens, "Bearer #new-token-soon").code(),
            absl::StatusCode::kUnauthenticated);
  std::remove(path.c_str());
}

TEST(BearerTokensTest, FileErrorsNameTheOptionAndPath) {
  const std::string missing = absl::StrCat(::testing::TempDir(), "/no/such/tokens");
  absl::StatusOr<std::unique_ptr<BearerTokens>> tokens =
      BearerTokens::FromFile("auth_token_file", missing);
  EXPECT_EQ(tokens.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tokens.status().message(), HasSubstr(absl::StrCat("auth_token_file=", missing)));

  const std::string empty = WriteTempFile("empty", "# only a comment\n\n");
  tokens = BearerTokens::FromFile("auth_token_file", empty);
  EXPECT_EQ(tokens.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tokens.status().message(), HasSubstr("holds no token"));
  std::remove(empty.c_str());

  const std::string spaced = WriteTempFile("spaced", "good\nsecret with space\n");
  tokens = BearerTokens::FromFile("auth_token_file", spaced);
  EXPECT_EQ(tokens.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tokens.status().message(), HasSubstr("line 2"));
  EXPECT_THAT(tokens.status().message(), Not(HasSubstr("secret")));
  std::remove(spaced.c_str());
}

TEST(BearerTokensTest, ChecksTheHeader) {
  std::unique_ptr<BearerTokens> tokens = Tokens({"s3cret-one", "s3cret-two"});
  ASSERT_NE(tokens, nullptr);
  EXPECT_TRUE(CheckOne(*tokens, "Bearer s3cret-one").ok());
  EXPECT_TRUE(CheckOne(*tokens, "Bearer s3cret-two").ok());
  EXPECT_TRUE(CheckOne(*tokens, "bearer   s3cret-two").ok());

  const absl::Status missing = tokens->Check({});
  EXPECT_EQ(missing.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(missing.message(), HasSubstr("requires a bearer token"));

  for (absl::string_view malformed :
       {"Basic czNjcmV0LW9uZQ==", "Bearer", "Bearer ", "Bearers3cret-one", "s3cret-one",
        "Bearer s3cret-one extra"}) {
    const absl::Status status = CheckOne(*tokens, malformed);
    EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated) << malformed;
    EXPECT_THAT(status.message(), HasSubstr("malformed")) << malformed;
    EXPECT_THAT(status.message(), Not(HasSubstr("s3cret"))) << malformed;
  }
  const absl::string_view two[] = {"Bearer s3cret-one", "Bearer s3cret-one"};
  EXPECT_THAT(tokens->Check(two).message(), HasSubstr("malformed"));

  for (absl::string_view wrong : {"Bearer s3cret-on", "Bearer s3cret-one1", "Bearer S3CRET-ONE",
                                  "Bearer x", "Bearer s3cret-twO"}) {
    const absl::Status status = CheckOne(*tokens, wrong);
    EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated) << wrong;
    EXPECT_THAT(status.message(), HasSubstr("not one this server accepts")) << wrong;
    EXPECT_THAT(status.message(), Not(HasSubstr("s3cret"))) << wrong;
  }
}

TEST(BearerTokensTest, RejectsTokensMetadataCannotCarry) {
  EXPECT_EQ(BearerTokens::FromTokens("tokens", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BearerTokens::FromTokens("tokens", {""}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BearerTokens::FromTokens("tokens", {"a\tb"}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace gradserver

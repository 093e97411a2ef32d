#include "tests/service/test_pki.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gtest/gtest.h"

namespace gradservicetest {

bool MakeTestPki(const std::string& dir, TestPki* pki) {
  const char* source = std::getenv("GRAD_SOURCE_DIR");
  if (source == nullptr) source = GRAD_SOURCE_DIR_DEFAULT;
  const auto quote = [](const std::string& text) {
    return absl::StrCat("'", absl::StrReplaceAll(text, {{"'", "'\\''"}}), "'");
  };
  const std::string command = absl::StrCat(
      "bash ", quote(absl::StrCat(source, "/tests/service/make_test_pki.sh")), " ", quote(dir));
  const int status = std::system(command.c_str());
  if (status != 0) {
    ADD_FAILURE() << command << " failed with status " << status
                  << " (is openssl installed? deploy/install-deps.sh installs it)";
    return false;
  }
  pki->dir = dir;
  pki->ca = dir + "/ca.pem";
  pki->server_cert = dir + "/server.pem";
  pki->server_key = dir + "/server.key";
  pki->client_cert = dir + "/client.pem";
  pki->client_key = dir + "/client.key";
  pki->other_ca = dir + "/other_ca.pem";
  pki->other_client_cert = dir + "/other_client.pem";
  pki->other_client_key = dir + "/other_client.key";
  pki->token_file = dir + "/tokens";
  std::ofstream(pki->token_file, std::ios::trunc)
      << "# accepted bearer tokens\n"
      << kFirstToken << "\n\n  " << kSecondToken << "\n";
  return true;
}

std::string ReadTextFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

}  // namespace gradservicetest

// A throwaway PKI for the TLS tests, made at test time by tests/service/make_test_pki.sh (which
// needs openssl), and a bearer-token file.

#ifndef TESTS_SERVICE_TEST_PKI_H_
#define TESTS_SERVICE_TEST_PKI_H_

#include <string>

namespace gradservicetest {

// PEM files in one directory.
struct TestPki {
  std::string dir;
  std::string ca;                       // the CA that signed the three below
  std::string server_cert, server_key;  // for DNS:localhost and IP:127.0.0.1
  std::string client_cert, client_key;
  std::string other_ca;  // an unrelated CA, and a client certificate it signed
  std::string other_client_cert, other_client_key;
  // Accepted tokens kFirstToken and kSecondToken, with a comment and a blank line.
  std::string token_file;
};

inline constexpr char kFirstToken[] = "first-token-7f3a9c";
inline constexpr char kSecondToken[] = "second-token-51be02";

// Makes the PKI in `dir` (created if needed). Fails the current test, and returns false, if the
// script fails. The script is found through $GRAD_SOURCE_DIR (set by CTest), else in this
// source tree.
bool MakeTestPki(const std::string& dir, TestPki* pki);

// The contents of `path` ("" if it cannot be read).
std::string ReadTextFile(const std::string& path);

}  // namespace gradservicetest

#endif  // TESTS_SERVICE_TEST_PKI_H_

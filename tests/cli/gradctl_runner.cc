#include "tests/cli/gradctl_runner.h"

#include <sys/wait.h>

#include <cstdlib>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "tests/service/test_pki.h"

namespace gradclitest {

std::ostream& operator<<(std::ostream& os, const GradctlRun& run) {
  return os << "exit " << run.exit_code << "\n--- stdout\n" << run.out << "--- stderr\n" << run.err;
}

std::string ShellQuote(const std::string& arg) {
  return absl::StrCat("'", absl::StrReplaceAll(arg, {{"'", "'\\''"}}), "'");
}

GradctlRun RunGradctl(const std::string& dir, const std::vector<std::string>& args,
                      const std::vector<std::string>& env) {
  std::vector<std::string> words = {"env", "-u", "GRADCTL_AUTH_TOKEN"};
  for (const std::string& assignment : env) words.push_back(ShellQuote(assignment));
  words.push_back(ShellQuote(GRADCTL_PATH));
  for (const std::string& arg : args) words.push_back(ShellQuote(arg));
  const std::string out = dir + "/gradctl.stdout";
  const std::string err = dir + "/gradctl.stderr";
  const std::string command = absl::StrCat(absl::StrJoin(words, " "), " >", ShellQuote(out), " 2>",
                                           ShellQuote(err), " </dev/null");
  const int status = std::system(command.c_str());
  GradctlRun run;
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  run.out = gradservicetest::ReadTextFile(out);
  run.err = gradservicetest::ReadTextFile(err);
  return run;
}

}  // namespace gradclitest

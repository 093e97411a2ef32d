// Runs the gradctl binary (GRADCTL_PATH, compiled in) as a child process for the CLI tests and
// captures what it printed.

#ifndef TESTS_CLI_GRADCTL_RUNNER_H_
#define TESTS_CLI_GRADCTL_RUNNER_H_

#include <ostream>
#include <string>
#include <vector>

namespace gradclitest {

struct GradctlRun {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Exit code, stdout and stderr, for failure messages.
std::ostream& operator<<(std::ostream& os, const GradctlRun& run);

// `arg` quoted for the shell.
std::string ShellQuote(const std::string& arg);

// Runs gradctl with `args` and the environment assignments `env` ("NAME=value"), stdin empty,
// its output kept in `dir`/gradctl.stdout and gradctl.stderr (`dir` must exist), and waits for
// it. GRADCTL_AUTH_TOKEN is unset unless `env` sets it, so a token in the test's environment
// never reaches a server.
GradctlRun RunGradctl(const std::string& dir, const std::vector<std::string>& args,
                      const std::vector<std::string>& env = {});

}  // namespace gradclitest

#endif  // TESTS_CLI_GRADCTL_RUNNER_H_

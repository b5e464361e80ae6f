// libFuzzer target: the configuration parser. The first byte picks the form: even, the rest is a JSON
// config file given with --config; odd, the rest is a command line (arguments separated by newlines) after
// "mptrain train". A configuration that parses is validated as the executable does. Any outcome but
// success or mpt::InputError is a finding.
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_input_file.hpp"
#include "mptrain/config.hpp"
#include "mptrain/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  std::vector<std::string> args = {"mptrain", "train"};
  const std::string rest(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((data[0] & 1) == 0) {
    args.push_back("--config");
    args.push_back(mpt::fuzz::write_input(data + 1, size - 1, ".json"));
  } else {
    size_t start = 0;
    for (size_t nl; (nl = rest.find('\n', start)) != std::string::npos; start = nl + 1)
      args.push_back(rest.substr(start, nl - start));
    args.push_back(rest.substr(start));
    // --help (or -h among short flags) prints the whole help text each time: not interesting.
    for (const std::string& a : args)
      if (a.starts_with("--help") ||
          (a.size() > 1 && a[0] == '-' && a[1] != '-' && a.find('h') != std::string::npos))
        return 0;
  }
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  try {
    mpt::RunConfig config;
    if (mpt::parse_command_line(static_cast<int>(argv.size()), argv.data(), config)) {
      config.validate();
      (void)config.to_json().dump();
      (void)mpt::parse_inject_overflow(config.inject_overflow);
    }
  } catch (const mpt::InputError&) {
  }
  return 0;
}

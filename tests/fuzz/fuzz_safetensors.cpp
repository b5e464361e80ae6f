// libFuzzer target: the safetensors reader and the checkpoint verification on arbitrary bytes. Any input
// must either load or throw mpt::InputError; every other exception, crash or sanitizer report is a finding.
#include <cstdint>
#include <string>

#include "fuzz_input_file.hpp"
#include "mptrain/checkpoint.hpp"
#include "mptrain/error.hpp"
#include "mptrain/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = mpt::fuzz::write_input(data, size, ".safetensors");
  try {
    const mpt::SafetensorsFile file = mpt::read_safetensors(path);
    // Read every tensor back as FP32 (the conversion checks the dtype and the byte count).
    for (const auto& [name, tensor] : file.tensors) {
      try {
        (void)tensor.as<float>(name);
      } catch (const mpt::InputError&) {
      }
    }
    (void)mpt::read_checkpoint(path);  // format and checksum verification
  } catch (const mpt::InputError&) {
  }
  return 0;
}

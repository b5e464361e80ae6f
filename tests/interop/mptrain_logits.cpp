// Test tool: mptrain's own forward on given token sequences, for comparison with transformers.
//   mptrain_logits CHECKPOINT TOKENS.safetensors OUT.safetensors
// reads the checkpoint's FP32 master weights, runs the model in FP32 on the CPU backend over the I32 tensor
// "tokens" [B, T] of TOKENS, and writes the F32 tensor "logits" [B, T, V] (padding columns dropped) to OUT.
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "mptrain/checkpoint.hpp"
#include "mptrain/comm_mpi.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/model.hpp"
#include "mptrain/safetensors.hpp"

int main(int argc, char** argv) {
  mpt::MpiSession mpi(&argc, &argv);
  if (argc != 4) {
    std::fprintf(stderr, "usage: mptrain_logits CHECKPOINT TOKENS.safetensors OUT.safetensors\n");
    return 2;
  }
  try {
    const mpt::SafetensorsFile ckpt = mpt::read_checkpoint(argv[1]);
    mpt::GPTConfig cfg;
    cfg.vocab_size = mpt::checkpoint_int(ckpt, "vocab_size");
    cfg.max_seq_len = mpt::checkpoint_int(ckpt, "seq_len");
    cfg.num_layers = mpt::checkpoint_int(ckpt, "layers");
    cfg.num_heads = mpt::checkpoint_int(ckpt, "heads");
    cfg.channels = mpt::checkpoint_int(ckpt, "channels");
    const mpt::SafetensorsFile input = mpt::read_safetensors(argv[2]);
    const mpt::LoadedTensor& tokens_tensor = input.at("tokens");
    const std::vector<int32_t> tokens = tokens_tensor.as<int32_t>("tokens");
    const int64_t B = tokens_tensor.shape.at(0), T = tokens_tensor.shape.at(1);

    mpt::MpiCommunicator self(MPI_COMM_SELF);
    auto backend = mpt::make_cpu_backend();
    mpt::EngineConfig ec;
    ec.dtype = mpt::DType::f32;
    mpt::MixedPrecisionEngine engine(mpt::gpt_tensors(cfg), ec, self, *backend);
    std::vector<float> values;
    for (const mpt::TensorSpec& spec : mpt::gpt_tensors(cfg)) {
      const auto w = ckpt.at("master." + spec.name).as<float>(spec.name);
      values.insert(values.end(), w.begin(), w.end());
    }
    engine.set_parameters(values);
    mpt::GPT model(cfg, engine.layout(), *backend, mpt::DType::f32);
    model.forward(engine.params(), tokens.data(), nullptr, B, T);
    const int64_t V = cfg.vocab_size, Vp = cfg.padded_vocab_size();
    std::vector<float> padded(static_cast<size_t>(B * T * Vp)), logits;
    backend->copy_to_host(padded.data(), model.logits(), padded.size() * sizeof(float));
    for (int64_t row = 0; row < B * T; ++row)
      logits.insert(logits.end(), padded.begin() + row * Vp, padded.begin() + row * Vp + V);
    mpt::write_safetensors(argv[3], {{"logits", mpt::DType::f32, {B, T, V}, logits.data()}}, {});
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mptrain_logits: %s\n", e.what());
    return 1;
  }
}

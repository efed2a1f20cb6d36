// The build's one CUDA translation unit that includes <tq/cuda.hpp> (built only with TQ_CUDA): it
// compiles every kernel once and registers the CUDA backend; CMake links its object into
// `paligemma`, `tq_tests` and `tq_bench` (the object library tq_cuda_backend), so `--device cuda`
// works in every subcommand and every test and benchmark sees CUDA tensors through the plain tq::
// API (see the comment at the top of <tq/cuda.hpp>).
#include <tq/cuda.hpp>

// The one translation unit of tq_tests that includes <tq/cuda.hpp>: it compiles the CUDA kernels
// and registers the CUDA backend for every test (see the comment at the top of that header).
#include <tq/cuda.hpp>

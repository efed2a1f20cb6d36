// The paligemma executable's one CUDA translation unit (built only with TQ_CUDA): it compiles every
// kernel and registers the CUDA backend, so `--device cuda` works in all subcommands, which are
// plain C++ (see the comment at the top of <tq/cuda.hpp>).
#include <tq/cuda.hpp>

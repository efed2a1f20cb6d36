// tq: the whole framework in one include.
#pragma once
#include "tq/core/error.hpp"
#include "tq/core/dtype.hpp"
#include "tq/core/device.hpp"
#include "tq/core/tensor.hpp"
#include "tq/core/rng.hpp"
#include "tq/core/thread_pool.hpp"
#include "tq/ops/elementwise.hpp"
#include "tq/ops/reduce.hpp"
#include "tq/ops/matmul.hpp"
#include "tq/autograd/engine.hpp"
#include "tq/autograd/checkpoint.hpp"
#include "tq/autograd/gradcheck.hpp"

// Data-parallel training over NCCL: the whole of tq::dist in one include (plain C++; the NCCL
// communicator itself is in kernels/nccl.cuh, registered by tq::cuda::register_nccl_backend()).
#pragma once
#include "tq/dist/env.hpp"
#include "tq/dist/tcp_store.hpp"
#include "tq/dist/communicator.hpp"
#include "tq/dist/grad_bucket.hpp"
#include "tq/dist/shard.hpp"

// tq: the whole framework in one include.
#pragma once
#include "tq/core/error.hpp"

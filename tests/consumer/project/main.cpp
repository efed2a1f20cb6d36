// Uses the installed tq the way an outside project would: build tensors, run ops and autograd.
#include <tq/tq.hpp>

#include <cstdio>

int main() {
  try {
    TQ_CHECK(1 + 1 == 3, "expected failure");
  } catch (const tq::Error& e) {
    std::printf("tq consumer ok\n");
    return 0;
  }
  return 1;
}

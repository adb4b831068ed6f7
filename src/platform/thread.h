// thread.h — how the library starts a thread of its own.
//
// Every thread the library starts (a Writer's sync, indexer, key index growth and pages-ahead
// threads, the Python binding's async appender) starts through start_thread(), which returns only
// once the new thread runs. A thread's start-up allocates (its stack, TLS); a fork in that
// instant would hand the child an allocator locked by a thread the child does not have.
#pragma once

#include <future>
#include <memory>
#include <thread>
#include <utility>

namespace embstore::detail {

template <typename Body>
std::thread start_thread(Body&& body) {
  // Shared with the new thread, which may still be inside set_value() when the wait returns.
  auto started = std::make_shared<std::promise<void>>();
  std::future<void> running = started->get_future();
  std::thread thread([started, body = std::forward<Body>(body)]() mutable {
    started->set_value();
    started.reset();
    body();
  });
  running.wait();
  return thread;
}

}  // namespace embstore::detail

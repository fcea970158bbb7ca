// A fixed set of worker threads that run the tasks of one parallel_for at a time. The calling
// thread works too, so ThreadPool(n) starts n - 1 workers. Tasks are handed out dynamically, so a
// task must not depend on which thread runs it or in which order (results stay deterministic as
// long as each task writes its own outputs).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace rtllm {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);  // <= 0: all hardware threads
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Calls fn(task, thread) for every task in [0, num_tasks); thread is in [0, num_threads()).
  // Returns when all tasks are done; rethrows the first exception a task threw. Not reentrant.
  // Allocates nothing. `work_per_task` (in multiply-adds or element operations) lets small jobs run
  // on the calling thread alone, where waking the workers would cost more than it saves.
  template <typename F>
  void parallel_for(int64_t num_tasks, F&& fn, int64_t work_per_task = kMinParallelWork) {
    using Fn = std::remove_reference_t<F>;
    TaskFn call = [](void* ctx, int64_t task, int thread) { (*static_cast<Fn*>(ctx))(task, thread); };
    void* ctx = const_cast<void*>(static_cast<const void*>(&fn));
    if (num_tasks * work_per_task < kMinParallelWork) {
      for (int64_t t = 0; t < num_tasks; ++t) call(ctx, t, 0);
      return;
    }
    run(num_tasks, call, ctx);
  }

  static constexpr int64_t kMinParallelWork = 1 << 15;

 private:
  using TaskFn = void (*)(void* ctx, int64_t task, int thread);
  void run(int64_t num_tasks, TaskFn fn, void* ctx);
  void work(int thread);  // runs tasks of the current job until none are left
  void worker_loop(int thread);

  int num_threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  // The current job; written by run() before bumping generation_.
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::atomic<uint64_t> generation_{0};
  int num_busy_ = 0;  // workers still in the current job (under mutex_)
  std::atomic<int> num_busy_atomic_{0};  // a copy of num_busy_ to spin on without the lock
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace rtllm

// _embstore — the pybind11 module under the `embstore` Python package (see embstore/__init__.py
// for the documented, public Python API; names here are private building blocks).
//
// Arrays handed out point straight into the store's mappings: their numpy `base` is a _Mapping
// object holding Reader::owner(), so a view outlives the Reader that made it. Arrays handed in
// are read in place: the GIL is released while rows are copied into the store. An async writer
// copies them into its queue before append returns, or (copy=False) keeps a reference to the
// caller's array until its background thread has copied it (async_writer.h).
#include <cxxabi.h>
#include <pthread.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "async_writer.h"
#include "embstore/embstore.h"
#include "embstore/staged_output.h"
#include "platform/os.h"
#include "shard_set_internals.h"
#include "sigterm_relay.h"

namespace py = pybind11;

namespace embstore::python {
namespace {

constexpr const char* kCutOffAtExit =
    "embstore: a thread was inside an embstore call when the interpreter finalized (a daemon "
    "thread); the call does not return, and rows it had not handed over are not stored\n";

// The interpreter's main thread (threading.main_thread()), set at import: the thread that
// finalizes it, and may take the GIL while it does. In a child forked by another thread, that
// thread is the child's main one (as threading.main_thread() says there): set again at fork.
unsigned long g_main_thread = 0;

// True when the interpreter is finalizing and this thread is not the one doing it: CPython will
// not give it the GIL again.
bool cut_off_by_finalization() {
#if PY_VERSION_HEX >= 0x030D0000
  const bool finalizing = Py_IsFinalizing() != 0;
#else
  const bool finalizing = _Py_IsFinalizing() != 0;
#endif
  return finalizing && PyThread_get_thread_ident() != g_main_thread;
}

// Only Python's default SIGINT handler (signal.default_int_handler, which raises
// KeyboardInterrupt) ends the wait: a handler of the program's own that returns normally (one
// that sets a stop flag, or embstore's own deferral while a recorder hands its rows over:
// _InterruptDeferred) asks for no call to be cut short, so the wait goes on, as Python retries
// a system call interrupted by a signal whose handler returned (PEP 475); that handler runs
// once the call returns.
// (_signal, the C module under signal: no Python code runs here.)
bool sigint_raises() noexcept {
  PyObject* signal_module = PyImport_ImportModule("_signal");
  if (signal_module == nullptr) {
    PyErr_Clear();
    return true;
  }
  PyObject* handler = PyObject_CallMethod(signal_module, "getsignal", "i", SIGINT);
  PyObject* default_handler = PyObject_GetAttrString(signal_module, "default_int_handler");
  const bool raises =
      handler == nullptr || default_handler == nullptr || handler == default_handler;
  if (handler == nullptr || default_handler == nullptr) PyErr_Clear();
  Py_XDECREF(handler);
  Py_XDECREF(default_handler);
  Py_DECREF(signal_module);
  return raises;
}

// Ctrl-C while the main thread waits (the writer lock, room in an async queue, the queue
// written: os::set_interrupt_check): the wait looks every 100 ms whether SIGINT came and, if so,
// ends before anything is written (kInterrupted). No Python handler runs inside the wait: the
// call holds the Writer's locks, and a handler may close that Writer (the SIGTERM relay of
// multiprocessing children does), which would then wait for them for ever. The SIGINT is set
// pending again, and raise_python_error() runs the handlers once the call has unwound: Python's
// default one raises KeyboardInterrupt, which the call raises. Other threads, and a finalizing
// interpreter, wait on; other signals are handled when the call returns, as Python does for any
// C call.
bool python_interrupted() noexcept {
  if (PyThread_get_thread_ident() != g_main_thread || !Py_IsInitialized()) return false;
#if PY_VERSION_HEX >= 0x030D0000
  if (Py_IsFinalizing()) return false;
#else
  if (_Py_IsFinalizing()) return false;
#endif
  const PyGILState_STATE gil = PyGILState_Ensure();
  // Takes a pending SIGINT without running its handler (no handler is marked as tripped
  // then, so the Python calls of sigint_raises() cannot run it); PyErr_SetInterrupt() makes it
  // pending again, for the handler.
  bool interrupted = PyOS_InterruptOccurred() != 0;
  if (interrupted) {
    interrupted = sigint_raises();
    PyErr_SetInterrupt();
  }
  PyGILState_Release(gil);
  return interrupted;
}

// The Writer lifetime lock a thread holds shared across a ReleaseGil scope (AliveLock), for
// ReleaseGil's park() to drop.
thread_local std::shared_mutex* t_alive_held = nullptr;

// Releases the GIL for its scope and takes it back at the end, as py::gil_scoped_release does,
// except once the interpreter is finalizing. CPython ends a thread that asks for the GIL then
// (pthread_exit, a forced unwinding), and that unwinding through a noexcept frame (the
// destructor of py::gil_scoped_release, append_call) was std::terminate: a daemon thread inside
// an append when the program ended aborted the process (SIGABRT, exit 134). Such a thread is
// parked instead, without the GIL, and ends with the process. It first drops the Writer
// lifetime lock taken in the scope, if any (`held`), and one its caller holds (AliveLock), so
// that closing the Writer during finalization does not wait for it, and says on stderr that the
// call did not return. A thread that was already waiting for the GIL when finalization began
// is ended by CPython inside PyEval_RestoreThread: hence the destructor may throw (the forced
// unwinding passes through it, releasing the locks on its way; append_call lets it through).
// (Python does not run daemon threads past its finalization anyway; nothing they had not
// handed over is stored.)
class ReleaseGil {
 public:
  ReleaseGil() : state_(PyEval_SaveThread()) {}
  explicit ReleaseGil(std::shared_lock<std::shared_mutex>& held) : ReleaseGil() { shared_ = &held; }
  explicit ReleaseGil(std::unique_lock<std::shared_mutex>& held) : ReleaseGil() { unique_ = &held; }
  ~ReleaseGil() noexcept(false) {
    if (cut_off_by_finalization()) park();
    PyEval_RestoreThread(state_);
  }
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;

 private:
  [[noreturn]] void park() {
    if (shared_ != nullptr && shared_->owns_lock()) shared_->unlock();
    if (unique_ != nullptr && unique_->owns_lock()) unique_->unlock();
    if (t_alive_held != nullptr) t_alive_held->unlock_shared();  // Its holder never resumes.
    std::fputs(kCutOffAtExit, stderr);
    for (;;) ::pause();
  }

  PyThreadState* state_;
  std::shared_lock<std::shared_mutex>* shared_ = nullptr;
  std::unique_lock<std::shared_mutex>* unique_ = nullptr;
};

// The Writer lifetime lock held shared by the calling thread (PyWriter::lock_alive()), known to
// ReleaseGil while held.
class AliveLock {
 public:
  explicit AliveLock(std::shared_lock<std::shared_mutex> lock)
      : lock_(std::move(lock)), previous_(t_alive_held) {
    t_alive_held = lock_.mutex();
  }
  ~AliveLock() { t_alive_held = previous_; }
  AliveLock(const AliveLock&) = delete;
  AliveLock& operator=(const AliveLock&) = delete;

 private:
  std::shared_lock<std::shared_mutex> lock_;
  std::shared_mutex* previous_;
};

[[noreturn]] void invalid(const std::string& message) {
  throw Error(ErrorCode::kInvalidArgument, message);
}

// Turns embstore::Error into the Python exception embstore._errors chooses for its code.
void raise_python_error(const Error& error) {
  // The locks of the call are released by now: the signal's handlers may run (a SIGINT
  // python_interrupted() set pending again). What it raises (KeyboardInterrupt) is the call's
  // exception; a handler changed to one that returns meanwhile leaves the call's own,
  // InterruptedError.
  if (error.code() == ErrorCode::kInterrupted && PyErr_CheckSignals() != 0) return;
  py::object make = py::module_::import("embstore._errors").attr("from_code");
  py::object exc =
      make(static_cast<int>(error.code()), std::string(error.what()), error.sys_errno());
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
}

// Keeps a store's mappings alive; the numpy `base` of every array a Reader hands out.
struct Mapping {
  std::shared_ptr<const void> owner;
  std::string path;
};

py::array make_view(const py::object& base, const py::dtype& dtype, std::vector<py::ssize_t> shape,
                    std::vector<py::ssize_t> strides, const void* data) {
  py::array array(dtype, std::move(shape), std::move(strides), data, base);
  // The mapping is PROT_READ: a write through the array must fail in Python, not fault.
  py::detail::array_proxy(array.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return array;
}

py::dtype numpy_dtype(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return py::dtype("float32");
    case DType::kFloat16:
      return py::dtype("float16");
    case DType::kBFloat16:
      return py::dtype("uint16");  // Raw bits; see Reader.vectors.
    case DType::kInt8:
      return py::dtype("int8");
    case DType::kUInt8:
      return py::dtype("uint8");
    case DType::kFloat64:
      return py::dtype("float64");
  }
  invalid("unknown dtype");
}

DType parse_dtype_arg(const std::string& name) {
  auto dtype = parse_dtype(name);
  if (!dtype) invalid("unknown dtype '" + name + "'");
  return *dtype;
}

// Reads a 1-D integer array (keys or epochs) into `out` (replacing its contents, keeping its
// capacity), refusing negative values. Errors name the array as `owner` + `what` (built only
// then: append calls this every batch).
void to_u64(const py::array& array, std::string_view owner, std::string_view what,
            std::vector<std::uint64_t>& out) {
  const auto name = [&] { return std::string(owner) + std::string(what); };
  if (array.ndim() != 1) {
    invalid(name() + " must be 1-D; got " + std::to_string(array.ndim()) + " dims");
  }
  const char kind = array.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    invalid(name() + " must be integers; got dtype " +
            py::str(static_cast<py::handle>(array.dtype())).cast<std::string>());
  }
  if (array.dtype().byteorder() == '>') {
    invalid(name() +
            " are big-endian; convert them to native byte order first "
            "(for example .astype(numpy.uint64))");
  }
  const py::ssize_t n = array.shape(0);
  const auto* base = static_cast<const char*>(array.data());
  const py::ssize_t stride = array.strides(0);
  const py::ssize_t size = array.itemsize();
  out.clear();
  if (kind == 'u' && size == 8 && (stride == 8 || n <= 1)) {  // Common case: nothing to check.
    if (reinterpret_cast<std::uintptr_t>(base) % alignof(std::uint64_t) == 0) {
      const auto* values = reinterpret_cast<const std::uint64_t*>(base);
      out.insert(out.end(), values, values + n);  // No zero fill first.
    } else {  // A numpy array may start anywhere (frombuffer with an offset).
      out.resize(static_cast<std::size_t>(n));
      if (n > 0) std::memcpy(out.data(), base, static_cast<std::size_t>(n) * 8);
    }
    return;
  }
  out.resize(static_cast<std::size_t>(n));
  for (py::ssize_t i = 0; i < n; ++i) {
    const char* p = base + i * stride;
    std::int64_t signed_value = 0;
    std::uint64_t value = 0;
    if (kind == 'u') {
      if (size == 8)
        value = *reinterpret_cast<const std::uint64_t*>(p);
      else if (size == 4)
        value = *reinterpret_cast<const std::uint32_t*>(p);
      else if (size == 2)
        value = *reinterpret_cast<const std::uint16_t*>(p);
      else
        value = *reinterpret_cast<const std::uint8_t*>(p);
    } else {
      if (size == 8)
        signed_value = *reinterpret_cast<const std::int64_t*>(p);
      else if (size == 4)
        signed_value = *reinterpret_cast<const std::int32_t*>(p);
      else if (size == 2)
        signed_value = *reinterpret_cast<const std::int16_t*>(p);
      else
        signed_value = *reinterpret_cast<const std::int8_t*>(p);
      if (signed_value < 0) {
        invalid(name() + "[" + std::to_string(i) + "] is " + std::to_string(signed_value) +
                "; keys and epochs must be >= 0");
      }
      value = static_cast<std::uint64_t>(signed_value);
    }
    out[static_cast<std::size_t>(i)] = value;
  }
}

// Describes a 2-D array as a ConstMatrix without copying when the rows' elements are contiguous
// (any positive row stride works); otherwise returns a contiguous copy in `array`.
// Every refusal's message begins with the store's `path` and the call (append).
ConstMatrix describe_rows(py::array& array, const std::optional<std::string>& as_dtype,
                          bool& copied, const std::string& path) {
  const auto refuse = [&](const std::string& what) { invalid(path + ": append: " + what); };
  if (array.ndim() != 2) {
    refuse("vectors must be 2-D (rows, dim); got " + std::to_string(array.ndim()) + " dims");
  }
  const py::dtype dt = array.dtype();
  const char kind = dt.kind();
  const py::ssize_t size = dt.itemsize();
  DType dtype;
  if (as_dtype) {
    dtype = parse_dtype_arg(*as_dtype);
    if (static_cast<py::ssize_t>(dtype_size(dtype)) != size) {
      refuse("vectors: " + std::to_string(size) + "-byte elements cannot hold " + *as_dtype);
    }
  } else if (kind == 'f' && size == 4) {
    dtype = DType::kFloat32;
  } else if (kind == 'f' && size == 2) {
    dtype = DType::kFloat16;
  } else if (kind == 'f' && size == 8) {
    dtype = DType::kFloat64;
  } else if (kind == 'i' && size == 1) {
    dtype = DType::kInt8;
  } else if (kind == 'u' && size == 1) {
    dtype = DType::kUInt8;
  } else {
    refuse("vectors have dtype " + py::str(static_cast<py::handle>(dt)).cast<std::string>() +
           "; embstore takes float32, float16, bfloat16 (torch), float64, int8 or uint8");
  }
  if (dt.byteorder() == '>') {
    refuse("vectors are big-endian; convert them to native byte order first");
  }
  const py::ssize_t rows = array.shape(0);
  const py::ssize_t dim = array.shape(1);
  const py::ssize_t row_bytes = dim * size;
  const bool elements_packed = dim <= 1 || array.strides(1) == size;
  const bool rows_ok = rows <= 1 || array.strides(0) >= row_bytes;
  if (!elements_packed || !rows_ok) {
    array = py::module_::import("numpy").attr("ascontiguousarray")(array);
    copied = true;
  }
  const std::uint64_t stride = rows <= 1 ? static_cast<std::uint64_t>(row_bytes)
                                         : static_cast<std::uint64_t>(array.strides(0));
  if (dim > 0xffffffff) refuse("vectors: dim " + std::to_string(dim) + " is too large");
  return ConstMatrix{array.data(), dtype, static_cast<std::uint64_t>(rows),
                     static_cast<std::uint32_t>(dim), stride};
}

// ---- Writer -------------------------------------------------------------------------------

class PyWriter {
 public:
  PyWriter(Writer writer, std::uint64_t async_queue_bytes)
      : writer_(std::move(writer)), owner_pid_(current_process_id()) {
    if (async_queue_bytes > 0)
      async_ = std::make_unique<AsyncAppender>(*writer_, async_queue_bytes, &python_interrupted);
  }

  ~PyWriter() {
    if (current_process_id() != owner_pid_) {
      // A forked child: the background thread and any held mutex belong to the parent. Leak
      // them; the core Writer's destructor releases only the child's copies.
      (void)async_.release();
      return;
    }
    try {
      close(/*interruptible=*/false);
    } catch (...) {
      // Python's Writer.__del__ calls close() first, so an error here was already reported.
    }
  }

  py::object append(const py::array& keys, const py::object& epoch, py::array vectors,
                    const std::optional<std::string>& as_dtype, bool copy) {
    check_process();
    release_done();
    bool copied = false;
    Batch batch;
    batch.rows = describe_rows(vectors, as_dtype, copied, path_);
    if (!spare_keys_.empty()) {  // A buffer an earlier batch is done with: no allocation.
      batch.keys = std::move(spare_keys_.back());
      spare_keys_.pop_back();
    }
    to_u64(keys, path_, ": append: keys", batch.keys);
    if (py::isinstance<py::int_>(epoch)) {
      // Writer.append checked the type and the range [0, 2**64).
      batch.epoch = epoch.cast<std::uint64_t>();
    } else {
      to_u64(epoch.cast<py::array>(), path_, ": append: epochs", batch.epochs);
      if (batch.epochs.size() != batch.rows.rows) {
        invalid(writer_path() + ": append: " + std::to_string(batch.epochs.size()) +
                " epochs for " + std::to_string(batch.rows.rows) + " rows");
      }
    }
    if (batch.keys.size() != batch.rows.rows) {
      invalid(writer_path() + ": append: " + std::to_string(batch.keys.size()) + " keys for " +
              std::to_string(batch.rows.rows) + " rows");
    }
    const AliveLock alive = lock_open();
    if (async_ && async_->fits(async_->queue_bytes(batch.rows))) {
      // Checked here so a wrong dim or dtype is a ValueError from this call, not a deferred one.
      check_matches(batch.rows);
      // A contiguous copy made above is private already: hand it over like a donated array,
      // unless its rows are to be converted: then push() converts them, and a value beyond the
      // store's dtype is a ValueError from this call, not a failure of the queue.
      batch.borrowed = !copy || (copied && batch.rows.dtype == writer_->dtype());
      py::object keep;
      if (batch.borrowed) {
        keep = vectors;  // Referenced until the background thread has copied it.
        batch.hold = keep.ptr();
      }
      {
        ReleaseGil unlocked;
        async_->push(std::move(batch));
      }
      (void)keep.release();           // The queue owns this reference now; release_done() drops it.
      if (copied) ++copied_batches_;  // Counted once taken: a refused batch copied nothing used.
      return py::none();
    }
    if (async_) {
      // Larger than the whole queue: written here, after what is queued, straight from the
      // caller's array, as a synchronous append would.
      {
        ReleaseGil unlocked;
        async_->flush();
      }
      write_now(batch);
      if (copied) ++copied_batches_;
      return py::none();
    }
    const std::uint64_t first = write_now(batch);
    if (copied) ++copied_batches_;
    return py::int_(first);
  }

  // Appends in the calling thread (GIL released), counted in the sync statistics.
  std::uint64_t write_now(const Batch& batch) {
    std::uint64_t first;
    {
      ReleaseGil unlocked;
      const WorkClock clock;
      const std::span<const std::uint64_t> key_span(batch.keys);
      first =
          batch.epochs.empty()
              ? writer_->append(key_span, batch.epoch, batch.rows)
              : writer_->append(key_span, std::span<const std::uint64_t>(batch.epochs), batch.rows);
      const WorkClock::Elapsed spent = clock.elapsed();
      std::lock_guard guard(stats_mutex_);
      ++sync_stats_.batches;
      sync_stats_.rows += batch.rows.rows;
      sync_stats_.bytes += batch.rows.rows * record_bytes_;
      sync_stats_.append_seconds += spent.seconds;
      sync_stats_.append_cpu_seconds += spent.cpu_seconds;
    }
    return first;
  }

  void flush() {
    check_process();
    release_done();
    {
      const AliveLock alive = lock_open();
      if (async_) {
        ReleaseGil unlocked;
        async_->flush();
      }
    }
    release_done();
  }

  void sync() {
    flush();
    const AliveLock alive = lock_open();
    ReleaseGil unlocked;
    writer_->sync();
  }

  // Writes what is queued first: the rebuilt index covers every row appended before the call.
  void rebuild_key_index() {
    flush();
    const AliveLock alive = lock_open();
    ReleaseGil unlocked;
    writer_->rebuild_key_index();
  }

  // Writes what is queued first, so the rows appended before the call are the ones it counts.
  std::uint64_t truncate(std::uint64_t value, bool from_epoch) {
    flush();
    const AliveLock alive = lock_open();
    ReleaseGil unlocked;
    return from_epoch ? writer_->truncate_from_epoch(value) : writer_->truncate(value);
  }

  // `interruptible`: Writer.close(), where Ctrl-C may end the wait for the queue (below). The
  // exit handlers and garbage collection close with it false: nobody is there to call close()
  // again, so the queue is written whatever signal comes.
  void close(bool interruptible) {
    if (current_process_id() != owner_pid_) {
      (void)async_.release();
      return;
    }
    std::optional<Error> async_error;
    std::exception_ptr close_error;
    {
      std::unique_lock lifetime(lifetime_mutex_, std::defer_lock);
      {
        ReleaseGil unlocked(lifetime);
        {
          // Holding the gate while it waits, so that calls begun after it queue behind it
          // (lock_alive()); they then find the Writer closed.
          const std::lock_guard gate(gate_);
          lifetime.lock();
        }
        if (!writer_) return;
        if (async_) {
          // The queue written first by a wait that Ctrl-C ends (stop()'s join ignores it): the
          // KeyboardInterrupt then leaves the Writer open, its queue written on, for a close()
          // again or the exit finalizer. Any other error is stop()'s to report, below.
          if (interruptible) {
            try {
              async_->flush();
            } catch (const Error& error) {
              if (error.code() == ErrorCode::kInterrupted) throw;
            }
          }
          async_error = async_->stop();
        }
        try {
          writer_->close();
        } catch (...) {
          close_error = std::current_exception();
        }
      }
      if (async_) {
        final_stats_ = async_->stats();
        drop_holds();
        async_.reset();
      }
      writer_.reset();
    }
    if (async_error) throw Error(*async_error);
    if (close_error) std::rethrow_exception(close_error);
  }

  bool closed() const { return !writer_; }
  bool is_async() const { return async_ != nullptr || final_stats_.has_value(); }

  py::dict stats() {
    check_process();  // A forked child: async_'s mutex may be held by a thread not there.
    WriteStats s;
    if (async_) {
      s = async_->stats();
    } else if (final_stats_) {
      s = *final_stats_;
    }
    {
      // Batches written in the calling thread: all of them in sync mode, those larger than the
      // queue in async mode.
      std::lock_guard guard(stats_mutex_);
      s.batches += sync_stats_.batches;
      s.rows += sync_stats_.rows;
      s.bytes += sync_stats_.bytes;
      s.append_seconds += sync_stats_.append_seconds;
      s.append_cpu_seconds += sync_stats_.append_cpu_seconds;
    }
    py::dict out;
    out["batches"] = s.batches;
    out["rows"] = s.rows;
    out["bytes"] = s.bytes;
    out["append_seconds"] = s.append_seconds;
    out["append_cpu_seconds"] = s.append_cpu_seconds;
    out["copied_batches"] = copied_batches_;
    out["queued_bytes"] = s.queued_bytes;
    out["blocked_appends"] = s.blocked_appends;
    out["dropped_batches"] = s.dropped_batches;
    out["dropped_rows"] = s.dropped_rows;
    out["appends_woke_writer"] = s.appends_woke_writer;
    out["writer_naps"] = s.writer_naps;
    return out;
  }

  Writer& writer() {
    if (!writer_) throw Error(ErrorCode::kClosed, path_ + ": the Writer is closed");
    return *writer_;
  }

  void init_cached() {
    path_ = writer_->path();
    dim_ = writer_->dim();
    dtype_ = writer_->dtype();
    record_bytes_ = std::uint64_t{dim_} * dtype_size(dtype_);
  }

 private:
  void check_process() const {
    // Before any mutex: in a forked child one may be held by a thread that does not exist there.
    if (current_process_id() != owner_pid_) {
      throw Error(ErrorCode::kForkedChild, path_ + ": this Writer was opened by process " +
                                               std::to_string(owner_pid_) +
                                               "; a forked child must open its own Writer");
    }
  }

  // An empty batch's too, as Writer::append checks it.
  void check_matches(const ConstMatrix& rows) {
    if (rows.dim != dim_) {
      invalid(path_ + ": append: rows have dim " + std::to_string(rows.dim) +
              " but the store's dim is " + std::to_string(dim_));
    }
    const DType store = dtype_;
    if (!dtype_accepts(store, rows.dtype)) {
      invalid(path_ + ": append: cannot append " + std::string(dtype_name(rows.dtype)) +
              " rows to a " + std::string(dtype_name(store)) + " store");
    }
  }

  // Called with the GIL held: the lifetime lock (lock_alive()) of a Writer still open, else
  // kClosed.
  AliveLock lock_open() {
    std::shared_lock lock = lock_alive();
    if (!writer_) throw Error(ErrorCode::kClosed, path_ + ": the Writer is closed");
    return AliveLock(std::move(lock));
  }

  // Called with the GIL held; takes the lifetime lock without blocking while holding the GIL.
  // Through the gate first: a close() waiting for the lock holds it. glibc's shared mutex lets
  // a shared locker in while another holds it shared, even with an exclusive locker waiting:
  // with two threads appending in turn close() (and so the program's exit) waited for ever.
  std::shared_lock<std::shared_mutex> lock_alive() {
    if (!gate_.try_lock()) {
      ReleaseGil unlocked;
      gate_.lock();
      gate_.unlock();  // Before the GIL is taken back: a thread parked there holds no gate.
    } else {
      gate_.unlock();
    }
    std::shared_lock lock(lifetime_mutex_, std::try_to_lock);
    if (!lock.owns_lock()) {
      ReleaseGil unlocked(lock);
      lock.lock();
    }
    return lock;
  }

  std::string writer_path() const { return path_; }

  // Drops the references to arrays the background thread has finished with (GIL held). Into a
  // vector of this call's own: a last reference's release may run Python code (a torch
  // tensor's), which lets another thread take the GIL and call this too (its append, its
  // flush()); iterating a member vector that call cleared and refilled freed arrays twice and
  // crashed (a review: SIGSEGV with torch tensors appended with copy=False and a flushing thread).
  void release_done() {
    if (!async_) return;
    std::vector<void*> holds;
    async_->take_done(holds, spare_keys_);
    for (void* hold : holds) Py_DECREF(static_cast<PyObject*>(hold));
  }
  void drop_holds() { release_done(); }

  std::optional<Writer> writer_;
  std::unique_ptr<AsyncAppender> async_;
  std::shared_mutex lifetime_mutex_;  // Shared by calls using writer_, exclusive for close().
  std::mutex gate_;                   // Held by close() while it waits for lifetime_mutex_.
  int owner_pid_;
  std::string path_;
  // The store's shape, fixed at creation: read once, not through the Writer's lock each call.
  std::uint32_t dim_ = 0;
  DType dtype_ = DType::kFloat32;
  std::uint64_t record_bytes_ = 0;
  // Key buffers of batches the queue is done with; used with the GIL held, never across a call
  // that may run Python code.
  std::vector<std::vector<std::uint64_t>> spare_keys_;
  std::mutex stats_mutex_;
  WriteStats sync_stats_;
  std::optional<WriteStats> final_stats_;
  std::uint64_t copied_batches_ = 0;
};

// ---- Writer.append's call, outside pybind11's dispatcher ---------------------------------
// Contract: NativeWriter.appender() returns a builtin function taking (keys, epoch, vectors,
// as_dtype, copy) positionally, exactly as PyWriter::append does, with the same errors. It is
// bound to a capsule that holds the PyWriter and a reference to its NativeWriter, so the
// PyWriter outlives every call (after close() a call raises ClosedError, as append does).
// Why: in a training loop the call comes after a step that left the caches cold, and there
// pybind11's dispatch of one call took ~8 us and its cast of `self` ~5 us (bench/RESULTS.md,
// "The async call in a training loop"): most of what a donated async append may take.

// Sets the Python error for the C++ exception being handled, as the module's translator and
// pybind11's would. Only inside a catch block.
void set_error_from_current_exception() noexcept {
  try {
    throw;
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const Error& e) {
    try {
      raise_python_error(e);
    } catch (py::error_already_set& import_error) {
      import_error.restore();
    } catch (...) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    // The standard exceptions as pybind11 maps them.
    PyObject* type = PyExc_RuntimeError;
    if (dynamic_cast<const std::out_of_range*>(&e)) {
      type = PyExc_IndexError;
    } else if (dynamic_cast<const std::overflow_error*>(&e)) {
      type = PyExc_OverflowError;
    } else if (dynamic_cast<const std::domain_error*>(&e) ||
               dynamic_cast<const std::invalid_argument*>(&e) ||
               dynamic_cast<const std::length_error*>(&e) ||
               dynamic_cast<const std::range_error*>(&e)) {
      type = PyExc_ValueError;
    }
    PyErr_SetString(type, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "embstore: unknown C++ exception");
  }
}

// Not noexcept: a thread CPython ends while it waits for the GIL (ReleaseGil) unwinds through.
PyObject* append_call(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  try {
    if (nargs != 5) {
      throw py::type_error("append(keys, epoch, vectors, as_dtype, copy) takes 5 arguments; got " +
                           std::to_string(nargs));
    }
    if (!py::isinstance<py::array>(args[0]) || !py::isinstance<py::array>(args[2])) {
      throw py::type_error("append: keys and vectors must be numpy arrays");
    }
    std::optional<std::string> as_dtype;
    if (args[3] != Py_None) {
      if (!PyUnicode_Check(args[3])) throw py::type_error("append: as_dtype must be a str or None");
      as_dtype = py::handle(args[3]).cast<std::string>();
    }
    const int copy = PyObject_IsTrue(args[4]);
    if (copy < 0) throw py::error_already_set();
    auto* self = static_cast<PyWriter*>(PyCapsule_GetPointer(capsule, nullptr));
    if (self == nullptr) throw py::error_already_set();
    return self
        ->append(py::reinterpret_borrow<py::array>(args[0]),
                 py::reinterpret_borrow<py::object>(args[1]),
                 py::reinterpret_borrow<py::array>(args[2]), as_dtype, copy != 0)
        .release()
        .ptr();
  } catch (abi::__forced_unwind&) {
    std::fputs(kCutOffAtExit, stderr);
    throw;  // The thread's end (ReleaseGil): never swallowed.
  } catch (...) {
    set_error_from_current_exception();
    return nullptr;
  }
}

PyMethodDef append_call_def = {
    "append", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(append_call)),
    METH_FASTCALL, "Writer.append's call into the C++ module."};

py::object make_appender(py::object native) {
  PyWriter* writer = &native.cast<PyWriter&>();
  py::capsule holder(writer, nullptr, [](PyObject* capsule) {
    Py_XDECREF(static_cast<PyObject*>(PyCapsule_GetContext(capsule)));
  });
  if (PyCapsule_SetContext(holder.ptr(), native.ptr()) != 0) throw py::error_already_set();
  (void)native.release();  // The capsule owns this reference now; its destructor drops it.
  PyObject* function = PyCFunction_NewEx(&append_call_def, holder.ptr(), nullptr);
  if (function == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(function);
}

constexpr double kMaxSyncIntervalSeconds = 1e9;

WriterOptions writer_options(const std::string& sync, std::optional<double> sync_interval_s,
                             std::optional<std::uint64_t> map_bytes) {
  WriterOptions options;
  if (sync == "none") {
    options.sync = SyncPolicy::kNone;
  } else if (sync == "every_append") {
    options.sync = SyncPolicy::kEveryAppend;
  } else if (sync == "interval") {
    options.sync = SyncPolicy::kInterval;
  } else {
    invalid("sync must be 'none', 'every_append' or 'interval'; got '" + sync + "'");
  }
  // None keeps the core's default (kDefaultSyncInterval).
  if (sync_interval_s) {
    // Checked before the conversion (a double beyond int64 is undefined behaviour there), and
    // at most 1e9 s (~31 years): the sync thread adds it to steady_clock::now() in int64
    // nanoseconds. Rounded up to whole milliseconds, so 0.0001 s is 1 ms, not 0.
    const double seconds = *sync_interval_s;
    if (!(seconds > 0 && seconds <= kMaxSyncIntervalSeconds)) {
      invalid("sync_interval is " + py::repr(py::float_(seconds)).cast<std::string>() +
              " s; use seconds > 0, at most 1e9");
    }
    options.sync_interval =
        std::chrono::milliseconds(static_cast<std::int64_t>(std::ceil(seconds * 1000.0)));
  }
  if (map_bytes) options.map_bytes = *map_bytes;
  return options;
}

std::unique_ptr<PyWriter> open_writer(
    const std::string& path, std::optional<std::uint32_t> dim,
    const std::optional<std::string>& dtype, const std::string& metadata,
    std::optional<std::uint64_t> segment_bytes, const std::string& sync,
    std::optional<double> sync_interval_s, std::optional<std::uint64_t> map_bytes,
    std::uint64_t async_queue_bytes, bool create_only, bool key_index, bool huge_pages,
    std::uint64_t expected_rows) {
  WriterOptions options = writer_options(sync, sync_interval_s, map_bytes);
  options.huge_pages = huge_pages;
  options.expected_rows = expected_rows;
  std::optional<Writer> writer;
  {
    ReleaseGil unlocked;
    if (dim) {
      CreateOptions create;
      create.dim = *dim;
      create.dtype = dtype ? parse_dtype_arg(*dtype) : DType::kFloat32;
      create.metadata = metadata;
      if (segment_bytes) create.segment_bytes = *segment_bytes;
      create.key_index = key_index;
      writer = create_only ? Writer::create(path, create, options)
                           : Writer::open_or_create(path, create, options);
    } else {
      if (dtype) options.expect_dtype = parse_dtype_arg(*dtype);
      writer = Writer::open(path, options);
    }
  }
  auto result = std::make_unique<PyWriter>(std::move(*writer), async_queue_bytes);
  result->init_cached();
  return result;
}

// ---- Reader -------------------------------------------------------------------------------

// Thread-safety: every call takes mutex_ (so refresh/wait never race views of the snapshot);
// wait() holds it with the GIL released.
class PyReader {
 public:
  // `options`: those `reader` was opened with (map_bytes is kept for opening the store again).
  PyReader(Reader reader, const ReaderOptions& options) : reader_(std::move(reader)) {
    mapping_ = py::cast(Mapping{reader_->owner(), reader_->path()});
    path_ = reader_->path();
    map_bytes_ = options.map_bytes;
    mapped_generation_ = reader_->generation();
  }

  std::uint64_t size() {
    auto lock = guard();
    return reader().size();
  }
  std::uint64_t refresh() {
    auto lock = guard();
    reader().refresh();
    drop_older_generations();
    return reader().size();
  }
  std::uint64_t generation() {
    auto lock = guard();
    return reader().generation();
  }

  // `timeout_s`: None or any value beyond what the clock can count waits without a limit
  // (Reader.wait rejects negative and NaN timeouts).
  bool wait(std::uint64_t min_rows, std::optional<double> timeout_s) {
    using Clock = std::chrono::steady_clock;
    auto deadline = Clock::time_point::max();
    const double left_s = std::chrono::duration<double>(deadline - Clock::now()).count();
    // Compared as doubles: converting a larger timeout to the clock's ticks would overflow.
    if (timeout_s && *timeout_s < left_s / 2) {
      deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(std::max(0.0, *timeout_s)));
    }
    // Slices, so that Ctrl-C (a pending Python signal) interrupts a long wait; each holds
    // mutex_ (the C++ wait refreshes) for at most kLockedSlice, so that other threads' calls on
    // this Reader wait no longer than that.
    constexpr auto kSlice = std::chrono::milliseconds(200);
    constexpr auto kLockedSlice = std::chrono::milliseconds(20);
    for (;;) {
      bool reached;
      const auto now = Clock::now();
      const auto slice_end = deadline - now > kSlice ? now + kSlice : deadline;
      {
        adopt_after_fork();
        ReleaseGil unlocked;
        std::lock_guard lock(mutex_);
        reached = reader().wait(min_rows,
                                std::min<Clock::duration>(slice_end - Clock::now(), kLockedSlice));
      }
      {
        auto lock = guard();
        if (reader().generation() != mapped_generation_) {
          drop_older_generations();
          reached = reader().size() >= min_rows;
        }
      }
      if (reached) return true;
      if (Clock::now() >= deadline) return false;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    }
  }

  py::array vectors(std::uint64_t begin, std::optional<std::uint64_t> end) {
    auto lock = guard();
    const RowsView view = reader().rows(begin, end.value_or(reader().size()));
    const auto item = static_cast<py::ssize_t>(dtype_size(view.dtype));
    return make_view(mapping_, numpy_dtype(view.dtype),
                     {static_cast<py::ssize_t>(view.rows), static_cast<py::ssize_t>(view.dim)},
                     {static_cast<py::ssize_t>(view.row_bytes), item}, view.data);
  }

  // Rows [begin, end) in a private copy-on-write mapping (Reader::private_rows): a writable
  // array, whose base owns the mapping (not the Reader's), for tensors changed in place.
  py::array private_rows(std::uint64_t begin, std::optional<std::uint64_t> end) {
    auto lock = guard();
    auto rows = std::make_unique<PrivateRows>();
    const std::uint64_t stop = end.value_or(reader().size());
    {
      ReleaseGil unlocked;  // A copy, where the file cannot be mapped, takes time.
      *rows = reader().private_rows(begin, stop);
    }
    const DType dtype = reader().dtype();
    const auto item = static_cast<py::ssize_t>(dtype_size(dtype));
    const auto dim = static_cast<py::ssize_t>(reader().dim());
    std::byte* data = rows->data();
    const auto count = static_cast<py::ssize_t>(rows->rows());
    py::capsule owner(rows.release(), [](void* p) { delete static_cast<PrivateRows*>(p); });
    return py::array(numpy_dtype(dtype), {count, dim}, {dim * item, item}, data, owner);
  }

  py::array strided(bool keys, std::uint64_t begin, std::optional<std::uint64_t> end) {
    auto lock = guard();
    const std::uint64_t stop = end.value_or(reader().size());
    const StridedView<std::uint64_t> view =
        keys ? reader().keys(begin, stop) : reader().epochs(begin, stop);
    return make_view(mapping_, py::dtype("uint64"), {static_cast<py::ssize_t>(view.size)},
                     {static_cast<py::ssize_t>(view.stride_bytes)}, view.data);
  }

  // Row `row` after checking its checksum: (key, epoch, read-only view of the row).
  py::tuple record(std::uint64_t row) {
    auto lock = guard();
    const Record rec = reader().record(row);
    const DType dtype = reader().dtype();
    const auto item = static_cast<py::ssize_t>(dtype_size(dtype));
    py::array view = make_view(mapping_, numpy_dtype(dtype),
                               {static_cast<py::ssize_t>(reader().dim())}, {item}, rec.data);
    return py::make_tuple(rec.key, rec.epoch, view);
  }

  py::dict verify(std::uint64_t begin, std::optional<std::uint64_t> end) {
    auto lock = guard();
    VerifyReport report;
    {
      ReleaseGil unlocked;
      report = reader().verify(begin, end.value_or(reader().size()));
    }
    py::dict out;
    out["begin_row"] = report.begin_row;
    out["end_row"] = report.end_row;
    out["rows_checked"] = report.rows_checked;
    out["bad_row_count"] = report.bad_row_count;
    out["bad_rows"] = report.bad_rows;
    out["key_index_checked"] = report.key_index_checked;
    out["key_index_problems"] = report.key_index_problems;
    out["key_index_problem"] = report.key_index_problem;
    out["header_problem"] = report.header_problem;
    out["rows_to_cut"] = report.rows_to_cut;
    out["ok"] = report.ok();
    return out;
  }

  // ---- Lookups by key (Reader::find & co.); -1 marks "none" in row arrays.
  // The lookups below release the GIL while the C++ lookup runs: one through the key index
  // takes well under a microsecond, but one that scans (a store kept without a key index, rows
  // past its watermark, after a reboot) reads the snapshot's whole offset index, and holding the
  // GIL for that stalls every other thread of the program (a server's, a DataLoader's).
  std::int64_t find(std::uint64_t key, std::optional<std::uint64_t> epoch) {
    auto lock = guard();
    const Reader& r = reader();
    std::optional<std::uint64_t> row;
    {
      ReleaseGil unlocked;
      row = epoch ? r.find(key, *epoch) : r.find(key);
    }
    return row ? static_cast<std::int64_t>(*row) : -1;
  }
  // The zero-copy row of (key, epoch) as Reader::lookup() finds it (its key and epoch
  // confirmed, its checksum checked), or KeyError.
  py::array get(std::uint64_t key, std::optional<std::uint64_t> epoch) {
    auto lock = guard();
    const Reader& r = reader();
    std::vector<Record> found;
    {
      ReleaseGil unlocked;
      found = r.lookup(key, epoch, false);
    }
    if (found.empty()) {
      throw py::key_error("key " + std::to_string(key) +
                          (epoch ? " at epoch " + std::to_string(*epoch) : std::string()) +
                          " is not in " + path_ + " (snapshot of " +
                          std::to_string(reader().size()) + " rows)");
    }
    const DType dtype = reader().dtype();
    return make_view(mapping_, numpy_dtype(dtype), {static_cast<py::ssize_t>(reader().dim())},
                     {static_cast<py::ssize_t>(dtype_size(dtype))}, found[0].data);
  }
  py::array find_many(
      py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast> keys,
      std::optional<py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>> epochs) {
    auto lock = guard();
    py::array_t<std::int64_t> out(keys.size());
    const std::span<const std::uint64_t> k(keys.data(), keys.size());
    const std::span<const std::uint64_t> e =
        epochs ? std::span<const std::uint64_t>(epochs->data(), epochs->size())
               : std::span<const std::uint64_t>();
    const std::span<std::int64_t> o(out.mutable_data(), out.size());
    ReleaseGil unlocked;
    reader().find_many(k, e, o);
    return out;
  }
  // Rows [begin, end) copied into `out` (checked: C-contiguous, writeable, the store's dtype or,
  // for bfloat16, int16 too, shape (end - begin, dim)) or a new array; Reader::read(), GIL
  // released. With `check` each row is checked against its checksum (ReadCheck::kChecksums).
  py::array read(std::uint64_t begin, std::optional<std::uint64_t> end,
                 std::optional<py::array> out, bool check) {
    auto lock = guard();
    const Reader& r = reader();
    const std::uint64_t stop = end.value_or(r.size());
    if (stop > r.size()) r.read(begin, stop, nullptr, 0);  // Raises, naming the range.
    const py::dtype dtype = numpy_dtype(r.dtype());
    const auto rows = static_cast<py::ssize_t>(stop >= begin ? stop - begin : 0);
    const auto dim = static_cast<py::ssize_t>(r.dim());
    py::array dest;
    if (out) {
      dest = *out;
      const std::string where = r.path() + ": read: out ";
      // bfloat16 rows are 16-bit patterns: uint16 as `vectors` shows them, or int16 as a
      // torch.bfloat16 tensor's .view(torch.int16).numpy() does.
      const bool bits16 = r.dtype() == DType::kBFloat16 && dest.dtype().equal(py::dtype("int16"));
      if (!dest.dtype().equal(dtype) && !bits16) {
        invalid(where + "has dtype " +
                py::str(static_cast<py::handle>(dest.dtype())).cast<std::string>() +
                "; the store's rows are " +
                py::str(static_cast<py::handle>(dtype)).cast<std::string>());
      }
      if (dest.ndim() != 2 || dest.shape(0) != rows || dest.shape(1) != dim) {
        std::string shape;
        for (py::ssize_t i = 0; i < dest.ndim(); ++i) {
          shape += (i ? ", " : "") + std::to_string(dest.shape(i));
        }
        invalid(where + "has shape (" + shape + "); rows [" + std::to_string(begin) + ", " +
                std::to_string(stop) + ") need (" + std::to_string(rows) + ", " +
                std::to_string(dim) + ")");
      }
      if (!(dest.flags() & py::array::c_style) || !dest.writeable()) {
        invalid(where + "must be C-contiguous and writeable");
      }
    } else {
      dest = py::array(dtype, {rows, dim});
    }
    void* data = dest.mutable_data();
    const auto bytes = static_cast<std::size_t>(dest.nbytes());
    {
      ReleaseGil unlocked;
      r.read(begin, stop, data, bytes, check ? ReadCheck::kChecksums : ReadCheck::kNone);
    }
    return dest;
  }
  // rows (-1: a row of zeros) copied into one dense (n, dim) array.
  // check: each row against its checksum (kCorruption naming the first that fails).
  py::array gather(py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> rows,
                   bool check) {
    auto lock = guard();
    const Reader& r = reader();
    const py::dtype dtype = numpy_dtype(r.dtype());
    py::array out(dtype,
                  {static_cast<py::ssize_t>(rows.size()), static_cast<py::ssize_t>(r.dim())});
    const std::span<const std::int64_t> in(rows.data(), rows.size());
    void* dest = out.mutable_data();
    const std::size_t bytes = static_cast<std::size_t>(out.nbytes());
    ReleaseGil unlocked;
    r.gather(in, dest, bytes, check ? ReadCheck::kChecksums : ReadCheck::kNone);
    return out;
  }
  py::list history(std::uint64_t key) {
    auto lock = guard();
    const Reader& r = reader();
    std::vector<KeyVersion> versions;
    {
      ReleaseGil unlocked;
      versions = r.history(key);
    }
    py::list out;
    for (const KeyVersion& v : versions) out.append(py::make_tuple(v.row, v.epoch));
    return out;
  }
  py::array epoch_rows(std::uint64_t epoch) {
    auto lock = guard();
    const Reader& r = reader();
    std::vector<std::uint64_t> rows;
    {
      ReleaseGil unlocked;
      rows = r.epoch_rows(epoch);
    }
    py::array_t<std::int64_t> out(rows.size());
    std::copy(rows.begin(), rows.end(), out.mutable_data());
    return out;
  }
  py::dict epoch_counts() {
    auto lock = guard();
    py::dict out;
    for (const EpochRows& e : reader().epochs()) out[py::int_(e.epoch)] = e.rows;
    return out;
  }

  Reader& reader() {
    if (!reader_) throw Error(ErrorCode::kClosed, path_ + ": the Reader is closed");
    return *reader_;
  }
  // f(reader()) with mutex_ held.
  template <typename F>
  auto locked(F&& f) {
    auto lock = guard();
    return f(reader());
  }

  // mutex_ and the GIL held. After a refresh or wait that crossed a truncate the Reader maps the
  // new generation's files, and a C++ Reader keeps the older generations' files (unlinked by
  // the truncate) mapped for as long as it lives, since a view taken before may still point
  // into them (reader.h). Every array made here holds its mappings itself (mapping_ is its
  // base), so the store is opened again at its new generation and the old Reader dropped: the
  // old files' mappings, and their space on disk, go once no array taken from them is left
  // (a dashboard following a run that resumes from checkpoints kept a copy of the store per
  // truncate). Left as it is when the path holds another store now (the next refresh() says so).
  void drop_older_generations() {
    if (reader().generation() == mapped_generation_) return;
    const std::string store_id = reader().info(InfoDetail::kState).store_id;
    ReaderOptions options;
    options.map_bytes = map_bytes_;
    std::optional<Reader> fresh;
    {
      ReleaseGil unlocked;
      fresh = Reader::open(path_, options);
      if (fresh->info(InfoDetail::kState).store_id != store_id) return;
    }
    reader_ = std::move(fresh);
    mapping_ = py::cast(Mapping{reader_->owner(), reader_->path()});
    mapped_generation_ = reader_->generation();
  }

  // GIL held. In a forked child, before its first use of mutex_: the thread that held it at the
  // fork (one in wait(), say) does not exist there, and its lock would be held forever, so the
  // mutex is made anew; under the GIL, once per child, before any thread of it locks mutex_.
  void adopt_after_fork() {
    if (current_process_id() == mutex_pid_) return;
    new (&mutex_) std::mutex();
    mutex_pid_ = current_process_id();
  }

  std::unique_lock<std::mutex> guard() {
    adopt_after_fork();
    std::unique_lock lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock()) {
      ReleaseGil unlocked;
      lock.lock();
    }
    return lock;
  }

  void close() {
    auto lock = guard();
    reader_.reset();
    // Views keep the mappings through mapping_ (their base); the closed Reader keeps nothing.
    mapping_ = py::none();
  }
  bool closed() const { return !reader_; }
  const std::string& path() const { return path_; }

 private:
  std::optional<Reader> reader_;
  py::object mapping_;
  std::string path_;
  std::uint64_t map_bytes_ = 0;
  std::uint64_t mapped_generation_ = 0;  // The generation reader_ was opened at.
  std::mutex mutex_;
  int mutex_pid_ = current_process_id();  // The process mutex_ belongs to (adopt_after_fork()).
};

py::dict info_dict(const StoreInfo& info) {
  py::dict out;
  out["path"] = info.path;
  out["format_major"] = info.format_major;
  out["format_minor"] = info.format_minor;
  out["dtype"] = std::string(dtype_name(info.dtype));
  out["dim"] = info.dim;
  out["record_bytes"] = info.record_bytes;
  out["segment_bytes"] = info.segment_bytes;
  out["keeps_key_index"] = info.keeps_key_index;
  out["store_id"] = info.store_id;
  out["created_unix_ns"] = info.created_unix_ns;
  out["metadata"] = info.metadata;
  out["generation"] = info.generation;
  out["committed_rows"] = info.committed_rows;
  out["durable_rows"] = info.durable_rows;
  out["rows_to_cut"] = info.rows_to_cut;
  out["capacity_rows"] = info.capacity_rows;
  out["last_commit_unix_ns"] = info.last_commit_unix_ns;
  out["data_file_bytes"] = info.data_file_bytes;
  out["index_file_bytes"] = info.index_file_bytes;
  out["distinct_keys"] = info.distinct_keys;
  py::dict epochs;
  for (const EpochRows& e : info.epochs) epochs[py::int_(e.epoch)] = e.rows;
  out["epochs"] = epochs;
  out["key_index"] = info.key_index;
  out["key_index_used"] = info.key_index_used;
  return out;
}

// A Python callable the SIGTERM relay thread calls (sigterm_relay.h), kept for the life of the
// process: the thread may call it at the interpreter's end.
void keep_for_relay(py::object*& kept, py::object callable) {
  if (kept == nullptr) kept = new py::object();
  *kept = std::move(callable);
}

// Calls it from the relay thread under the GIL. With `result_matters`, returns what it returned
// (as a bool); otherwise true once it returned. False when it raised (reported as unraisable)
// or the interpreter has ended (the caller then takes the signal's default action).
bool call_from_relay(py::object* kept, bool result_matters) {
  if (!Py_IsInitialized()) return false;
  py::gil_scoped_acquire locked;
  try {
    const py::object result = (*kept)();
    return !result_matters || py::bool_(result);
  } catch (py::error_already_set& error) {
    error.discard_as_unraisable("embstore: writing at SIGTERM");
    return false;
  }
}

}  // namespace
}  // namespace embstore::python

PYBIND11_MODULE(_embstore, m) {
  using namespace embstore;
  using namespace embstore::python;
  m.doc() = "Private C++ core of the embstore package; use the names exported by `embstore`.";
  g_main_thread =
      py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  // The forking thread is the child's only thread (its ident is pthread_self's, as
  // PyThread_get_thread_ident() gives it, without the GIL, which fork's handlers may not take).
  pthread_atfork(nullptr, nullptr,
                 [] { g_main_thread = static_cast<unsigned long>(pthread_self()); });
  detail::os::set_interrupt_check(&python_interrupted);

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& error) {
      raise_python_error(error);
    }
  });

  m.def("_refuse_output_inside", &refuse_output_inside, py::arg("out"), py::arg("store"),
        "ValueError naming both when `out` lies inside the store directory `store` (the rule "
        "of every tool that reads a store and writes elsewhere: embstore/store.h), for io.py's "
        "outputs.");
  m.def(
      "_relay_sigterm",
      [](py::object stuck) {
        if (stuck.is_none()) return relay_sigterm();
        static py::object* kept = nullptr;
        keep_for_relay(kept, std::move(stuck));
        return relay_sigterm([] { return call_from_relay(kept, /*result_matters=*/true); });
      },
      py::arg("stuck") = py::none(),
      "Puts the SIGTERM relay (sigterm_relay.h) in front of Python's SIGTERM handler; from the "
      "main thread. `stuck()` is called from the relay thread when the main thread did not run "
      "the handler within the nudges: true if it had the process ended. False if it could not.");
  m.def(
      "_write_on_sigterm",
      [](py::object write) {
        static py::object* kept = nullptr;
        keep_for_relay(kept, std::move(write));
        return write_on_sigterm([] { return call_from_relay(kept, /*result_matters=*/false); });
      },
      "Has SIGTERM call `write` from the relay thread where Python cannot handle it "
      "(sigterm_relay.h, write_on_sigterm); from any thread. False if SIGTERM is not at its "
      "default action.");
  m.def("_ignore_repeated_sigterm", &ignore_repeated_sigterm,
        "A SIGTERM is being acted on: one more within a few seconds is the same request "
        "delivered twice and is ignored, a later one ends the process at once, saying so "
        "(sigterm_relay.h, ignore_repeated_sigterm).");

  m.attr("library_version") = kLibraryVersion;
  m.attr("format_version") =
      std::to_string(kFormatVersionMajor) + "." + std::to_string(kFormatVersionMinor);
  m.attr("max_dim") = kMaxDim;
  m.attr("default_segment_bytes") = kDefaultSegmentBytes;
  m.attr("default_map_bytes") = kDefaultMapBytes;
  m.attr("default_sync_interval") =
      std::chrono::duration<double>(kDefaultSyncInterval).count();  // seconds

  m.def("dtype_aliases", [] {
    py::dict aliases;
    for (const DTypeAlias& alias : dtype_aliases()) {
      aliases[py::str(std::string(alias.name))] = std::string(dtype_name(alias.dtype));
    }
    return aliases;
  });
  m.def("error_code_name",
        [](int code) { return std::string(error_code_name(static_cast<ErrorCode>(code))); });
  // The checks append() makes of keys, in one native call: for the recorder's batch(), which
  // runs every training step (a numpy reduction there cost ~60 us in a training loop).
  m.def(
      "check_keys",
      [](const py::array& keys, const std::string& what) {
        std::vector<std::uint64_t> values;
        to_u64(keys, "", what, values);
      },
      py::arg("keys"), py::arg("what"));

  m.def(
      "create_store",
      [](const std::string& path, std::uint32_t dim, const std::string& dtype,
         const std::string& metadata, std::optional<std::uint64_t> segment_bytes, bool key_index) {
        CreateOptions options;
        options.dim = dim;
        options.dtype = parse_dtype_arg(dtype);
        options.metadata = metadata;
        if (segment_bytes) options.segment_bytes = *segment_bytes;
        options.key_index = key_index;
        ReleaseGil unlocked;
        // Refused where every Writer would refuse the store (a network or FUSE file system), as
        // embstore create refuses it: a store made there was a time bomb for a training job.
        Writer::check_filesystem(path);
        create_store(path, options);
      },
      py::arg("path"), py::arg("dim"), py::arg("dtype"), py::arg("metadata"),
      py::arg("segment_bytes"), py::arg("key_index"));

  m.def(
      "salvage",
      [](const std::string& store, const std::string& out) {
        SalvageReport report;
        {
          ReleaseGil unlocked;
          // Ctrl-C ends the copy at its next step; nothing is left at `out`.
          report = salvage(store, out, [&](std::uint64_t, std::uint64_t) {
            if (python_interrupted()) throw Error(ErrorCode::kInterrupted, out + ": interrupted");
          });
        }
        py::list lost;
        for (const auto& [begin, end] : report.lost_ranges) lost.append(py::make_tuple(begin, end));
        py::dict d;
        d["header_source"] = report.header_source;
        d["rows_scanned"] = report.rows_scanned;
        d["rows_copied"] = report.rows_copied;
        d["rows_lost"] = report.rows_lost;
        d["lost_ranges"] = lost;
        d["damage"] = report.damage;
        d["writer_active"] = report.writer_active;
        d["warning"] = report.warning;
        return d;
      },
      py::arg("store"), py::arg("out"));

  m.def(
      "read_info",
      [](const std::string& path) {
        StoreInfo info;
        {
          ReleaseGil unlocked;
          info = read_info(path);
        }
        return info_dict(info);
      },
      py::arg("path"));

  m.def(
      "read_generation",
      [](const std::string& path) {
        ReleaseGil unlocked;
        return read_generation(path);
      },
      py::arg("path"));

  py::class_<Mapping>(m, "_Mapping",
                      "Keeps a store's mappings alive: the numpy base of every Reader view.")
      .def_property_readonly("path", [](const Mapping& self) { return self.path; })
      .def("__repr__",
           [](const Mapping& self) { return "<embstore mapping of " + self.path + ">"; });

  // embstore.io's new outputs, built and published by the rule of every tool's
  // (embstore/staged_output.h). Called with the GIL held: each call is short (a close of a
  // synced store, a rename), and a Ctrl-C is acted on after it.
  py::class_<StagedOutput>(m, "_StagedOutput")
      .def(py::init([](const std::string& out, const std::string& shape) {
             const OutputShape s = shape == "file"           ? OutputShape::kFile
                                   : shape == "store_inside" ? OutputShape::kStoreInside
                                                             : OutputShape::kDirectory;
             return std::make_unique<StagedOutput>(out, s);
           }),
           py::arg("out"), py::arg("shape") = "directory")
      .def_static("require_absent", &StagedOutput::require_absent, py::arg("out"))
      .def_property_readonly("path", &StagedOutput::path)
      .def_property_readonly("out", &StagedOutput::out)
      .def_property_readonly("working_dir", &StagedOutput::working_dir)
      .def(
          "naming_out",
          [](const StagedOutput& self, const std::string& message, int err) -> py::object {
            std::string named = self.naming_out(message, err);
            if (named.empty()) return py::none();
            return py::str(named);
          },
          py::arg("message"), py::arg("errno") = 0)
      .def(
          "close_writer",
          [](const StagedOutput& self, PyWriter& writer, std::uint64_t rows) {
            const Writer& w = writer.writer();
            return self.close_store(rows, w.committed_rows(), w.durable_rows(),
                                    [&writer] { writer.close(/*interruptible=*/false); });
          },
          py::arg("writer"), py::arg("rows"))
      .def("publish", &StagedOutput::publish)
      .def("discard", &StagedOutput::discard);
  py::class_<PyWriter>(m, "NativeWriter")
      .def(py::init(&open_writer), py::arg("path"), py::arg("dim"), py::arg("dtype"),
           py::arg("metadata"), py::arg("segment_bytes"), py::arg("sync"), py::arg("sync_interval"),
           py::arg("map_bytes"), py::arg("async_queue_bytes"), py::arg("create_only"),
           py::arg("key_index"), py::arg("huge_pages") = false, py::arg("expected_rows") = 0)
      .def("appender", &make_appender)
      .def("flush", &PyWriter::flush)
      .def("sync", &PyWriter::sync)
      .def("truncate", &PyWriter::truncate, py::arg("value"), py::arg("from_epoch"))
      .def("rebuild_key_index", &PyWriter::rebuild_key_index)
      .def("close", &PyWriter::close, py::arg("interruptible") = true)
      .def("stats", &PyWriter::stats)
      .def_property_readonly("closed", &PyWriter::closed)
      .def_property_readonly("is_async", &PyWriter::is_async)
      .def_property_readonly("dim", [](PyWriter& self) { return self.writer().dim(); })
      .def_property_readonly(
          "dtype", [](PyWriter& self) { return std::string(dtype_name(self.writer().dtype())); })
      .def_property_readonly("path", [](PyWriter& self) { return self.writer().path(); })
      .def("committed_rows", [](PyWriter& self) { return self.writer().committed_rows(); })
      .def("durable_rows", [](PyWriter& self) { return self.writer().durable_rows(); })
      .def(
          "info",
          [](PyWriter& self, bool key_stats) {
            return info_dict(
                self.writer().info(key_stats ? InfoDetail::kFull : InfoDetail::kState));
          },
          py::arg("key_stats") = true);

  py::class_<PyReader>(m, "NativeReader")
      .def(py::init([](const std::string& path, std::optional<std::uint64_t> map_bytes,
                       std::optional<std::uint64_t> max_rows) {
             ReaderOptions options;
             if (map_bytes) options.map_bytes = *map_bytes;
             if (max_rows) options.max_rows = *max_rows;
             std::optional<Reader> reader;
             {
               ReleaseGil unlocked;
               reader = Reader::open(path, options);
             }
             return std::make_unique<PyReader>(std::move(*reader), options);
           }),
           py::arg("path"), py::arg("map_bytes"), py::arg("max_rows") = py::none())
      .def("size", &PyReader::size)
      .def("refresh", &PyReader::refresh)
      .def_property_readonly("generation", &PyReader::generation)
      .def("wait", &PyReader::wait, py::arg("min_rows"), py::arg("timeout"))
      .def("vectors", &PyReader::vectors, py::arg("begin"), py::arg("end"))
      .def("private_rows", &PyReader::private_rows, py::arg("begin"), py::arg("end"))
      .def(
          "keys",
          [](PyReader& self, std::uint64_t begin, std::optional<std::uint64_t> end) {
            return self.strided(true, begin, end);
          },
          py::arg("begin"), py::arg("end"))
      .def(
          "epochs",
          [](PyReader& self, std::uint64_t begin, std::optional<std::uint64_t> end) {
            return self.strided(false, begin, end);
          },
          py::arg("begin"), py::arg("end"))
      .def("verify", &PyReader::verify, py::arg("begin"), py::arg("end"))
      .def("record", &PyReader::record, py::arg("row"))
      .def("find", &PyReader::find, py::arg("key"), py::arg("epoch"))
      .def("get", &PyReader::get, py::arg("key"), py::arg("epoch"))
      .def("find_many", &PyReader::find_many, py::arg("keys"), py::arg("epochs"))
      .def("gather", &PyReader::gather, py::arg("rows"), py::arg("check") = false)
      .def("read", &PyReader::read, py::arg("begin"), py::arg("end"), py::arg("out"),
           py::arg("check"))
      .def("history", &PyReader::history, py::arg("key"))
      .def("epoch_rows", &PyReader::epoch_rows, py::arg("epoch"))
      .def("epoch_counts", &PyReader::epoch_counts)
      .def("close", &PyReader::close)
      .def_property_readonly("closed", &PyReader::closed)
      .def_property_readonly("path", &PyReader::path)
      // Every call under the Reader's lock (locked()): a refresh in another thread (wait()
      // releases the GIL) may replace the C++ Reader or move its snapshot.
      .def_property_readonly(
          "dim", [](PyReader& self) { return self.locked([](Reader& r) { return r.dim(); }); })
      .def_property_readonly(
          "dtype",
          [](PyReader& self) {
            return self.locked([](Reader& r) { return std::string(dtype_name(r.dtype())); });
          })
      .def_property_readonly(
          "metadata",
          [](PyReader& self) {
            return self.locked([](Reader& r) { return py::bytes(r.metadata()); });
          })
      .def(
          "info",
          [](PyReader& self, bool key_stats) {
            return self.locked([&](Reader& r) {
              return info_dict(r.info(key_stats ? InfoDetail::kFull : InfoDetail::kState));
            });
          },
          py::arg("key_stats") = true);

  // Several stores as one (include/embstore/shard_set.h): manifests, the shard checks of
  // ShardSet::open (embstore.ShardSet reuses them) and merge_stores.
  m.def("manifest_file", &manifest_file, py::arg("path"),
        "The manifest file `path` names (a *.json file, or a directory holding manifest.json), "
        "or None for a store path: the core's rule (ShardSet::open).");
  m.def(
      "read_manifest",
      [](const std::string& path) {
        const Manifest manifest = read_manifest(path);
        py::list shards;
        for (const auto& shard : manifest.shards) {
          py::dict entry;
          entry["path"] = shard.path;
          entry["store_id"] = shard.store_id;
          entry["rows"] = shard.rows;
          entry["epochs"] = shard.epochs;
          entry["generation"] = shard.generation;
          shards.append(entry);
        }
        py::dict out;
        out["dim"] = manifest.dim;
        out["dtype"] = std::string(dtype_name(manifest.dtype));
        out["metadata"] = manifest.metadata;
        out["shards"] = shards;
        return out;
      },
      py::arg("path"));
  // A shard entry as read_manifest gives it (generation optional: 0).
  const auto manifest_shard = [](const py::handle& item) -> ManifestShard {
    const auto entry = item.cast<py::dict>();
    return {entry["path"].cast<std::string>(), entry["store_id"].cast<std::string>(),
            entry["rows"].cast<std::uint64_t>(), entry["epochs"].cast<std::vector<std::uint64_t>>(),
            entry.contains("generation") ? entry["generation"].cast<std::uint64_t>() : 0};
  };
  m.def(
      "write_manifest",
      [manifest_shard](const std::string& path, const py::dict& fields) {
        Manifest manifest;
        manifest.dim = fields["dim"].cast<std::uint32_t>();
        manifest.dtype = parse_dtype_arg(fields["dtype"].cast<std::string>());
        manifest.metadata = fields["metadata"].cast<std::string>();
        for (const auto& item : fields["shards"].cast<py::list>()) {
          manifest.shards.push_back(manifest_shard(item));
        }
        ReleaseGil unlocked;
        write_manifest(path, manifest);
      },
      py::arg("path"), py::arg("manifest"));
  m.def(
      "resolve_shards",
      [](const std::vector<std::string>& manifest_or_stores,
         std::optional<std::uint64_t> map_bytes) {
        std::vector<std::string> paths;
        std::vector<std::string> store_ids;
        std::vector<std::uint64_t> generations;
        std::string metadata;
        {
          ReleaseGil unlocked;
          ReaderOptions options;
          if (map_bytes) options.map_bytes = *map_bytes;
          const ShardSet set = ShardSet::open(manifest_or_stores, options);
          for (std::size_t i = 0; i < set.shard_count(); ++i) {
            paths.push_back(set.shard_path(i));
            store_ids.push_back(set.shard(i).info(InfoDetail::kState).store_id);
            generations.push_back(set.shard(i).generation());
          }
          metadata = set.metadata();
        }
        return py::make_tuple(paths, py::bytes(metadata), store_ids, generations);
      },
      py::arg("manifest_or_stores"), py::arg("map_bytes") = py::none());
  // ShardSet::refresh()'s rules for a manifest read again, for embstore.ShardSet's
  // follow_manifest(), whose shards held are its own Readers (src/shard_set_internals.h).
  m.def(
      "listed_shard_path",
      [manifest_shard](const std::string& manifest_file, const py::dict& entry) {
        return detail::listed_shard_path(manifest_file, manifest_shard(entry));
      },
      py::arg("manifest_file"), py::arg("entry"));
  m.def(
      "check_manifest_unchanged",
      [](const std::string& manifest_path, const py::dict& now, std::uint32_t dim,
         const std::string& dtype) {
        Manifest manifest;
        manifest.dim = now["dim"].cast<std::uint32_t>();
        manifest.dtype = parse_dtype_arg(now["dtype"].cast<std::string>());
        detail::check_manifest_unchanged(manifest_path, manifest, dim, parse_dtype_arg(dtype));
      },
      py::arg("manifest_path"), py::arg("now"), py::arg("dim"), py::arg("dtype"));
  // The shard of one manifest entry, opened and checked as ShardSet::open checks it, as a
  // NativeReader (embstore.Reader's).
  m.def(
      "open_listed_shard",
      [manifest_shard](const std::string& manifest_path, const py::dict& entry_fields,
                       const std::string& path, std::uint32_t dim, const std::string& dtype_text,
                       std::optional<std::uint64_t> map_bytes,
                       const std::vector<std::string>& held_store_ids,
                       const std::vector<std::string>& held_paths) {
        const ManifestShard entry = manifest_shard(entry_fields);
        const DType dtype = parse_dtype_arg(dtype_text);
        ReaderOptions options;
        if (map_bytes) options.map_bytes = *map_bytes;
        std::optional<Reader> reader;
        {
          ReleaseGil unlocked;
          reader = detail::open_listed_shard(manifest_path, dim, dtype, entry, path, options,
                                             held_store_ids, held_paths);
        }
        return std::make_unique<PyReader>(std::move(*reader), options);
      },
      py::arg("manifest_path"), py::arg("entry"), py::arg("path"), py::arg("dim"), py::arg("dtype"),
      py::arg("map_bytes"), py::arg("held_store_ids"), py::arg("held_paths"));
  m.def(
      "merge_stores",
      [](const std::string& out, const std::vector<std::string>& manifest_or_stores,
         const py::object& progress, const py::object& on_epoch_drop,
         const py::object& on_metadata_replaced) {
        StoreInfo info;
        std::string warning;
        {
          ReleaseGil unlocked;
          const ShardSet set = ShardSet::open(manifest_or_stores);
          // on_epoch_drop(shard path, row, epoch, previous epoch) for each shard whose epochs go
          // down (shard_set.h, epoch_drops), before anything is written.
          if (!on_epoch_drop.is_none()) {
            for (const EpochDrop& drop : epoch_drops(set)) {
              py::gil_scoped_acquire locked;
              on_epoch_drop(set.shard_path(drop.shard), drop.row, drop.epoch, drop.previous);
            }
          }
          // on_metadata_replaced(shard path, its metadata, the manifest's) for each shard whose
          // metadata the manifest's replaces (shard_set.h, metadata_overrides), as bytes.
          if (!on_metadata_replaced.is_none()) {
            for (const std::size_t s : metadata_overrides(set)) {
              py::gil_scoped_acquire locked;
              on_metadata_replaced(set.shard_path(s), py::bytes(set.shard(s).metadata()),
                                   py::bytes(set.metadata()));
            }
          }
          info = merge_stores(
              out, set,
              [&](const MergeProgress& done) {
                if (progress.is_none()) {
                  // Ctrl-C ends the merge at its next step (nothing is left at `out`); with a
                  // callback, the KeyboardInterrupt its call raises does.
                  if (python_interrupted())
                    throw Error(ErrorCode::kInterrupted, out + ": interrupted");
                  return;
                }
                py::gil_scoped_acquire locked;
                progress(done.rows_done, done.rows_total, *done.shard_path);
              },
              &warning);
        }
        py::dict out_info = info_dict(info);
        out_info["warning"] = warning;
        return out_info;
      },
      py::arg("out"), py::arg("manifest_or_stores"), py::arg("progress"),
      py::arg("on_epoch_drop") = py::none(), py::arg("on_metadata_replaced") = py::none());
}

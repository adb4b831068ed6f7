// Scenario 23: the checkers themselves. Every other scenario passes when the verifier (the
// invariant, harness.h) and the reader role find nothing; a checker that could not fail would
// pass them all. Here stores are planted with each kind of fault they look for, written through
// the public API so that every row is checksum-valid and only the property in question is
// broken, with ack logs that say what a correct run would have left. The verifier must fail on
// every plant and `reader --once` on every plant a reader can see, and both must pass the
// unplanted control, so that what fails them is the plant.
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "scenarios.h"
#include "support/payload.h"

namespace embstore::torture {
namespace {

struct Plant {
  const char* name;
  bool reader_sees;  // The reader role looks for it too (it has no ack logs).
  // Appends to `writer` (writer id 1, seed and dim of the Setup) and logs to `log`.
  std::function<void(Writer& writer, AckLog& log, Schedule& schedule, std::uint32_t dim)> plant;
  // The verifier checks it as a power-loss image (--power-loss, scenario 6's oracle): acked
  // batches may be missing there, durable ones not.
  bool power_loss = false;
};

// Batch `index` of writer 1 as a correct run writes it; `rows` of its rows (all by default),
// epoch `epoch` (its index by default), the value at (row, column) (0, 0) changed by `nudge`.
void append_batch(Writer& writer, Schedule& schedule, std::uint32_t dim, std::uint64_t index,
                  std::uint64_t rows = ~0ull, std::uint64_t epoch = ~0ull, float nudge = 0) {
  const Schedule::Batch b = schedule.batch(index);
  const std::uint64_t n = rows == ~0ull ? b.rows : rows;
  std::vector<std::uint64_t> keys;
  for (std::uint64_t i = 0; i < n; ++i) keys.push_back(test::make_key(1, b.first_seq + i));
  std::vector<float> values = test::batch_payload(1, b.first_seq, n, dim);
  values[0] += nudge;
  writer.append(keys, epoch == ~0ull ? b.index : epoch,
                ConstMatrix{values.data(), DType::kFloat32, n, dim, 0});
}

void logged(AckLog& log, Schedule& schedule, std::uint64_t index) {
  const Schedule::Batch b = schedule.batch(index);
  log.intent(b.first_seq, b.rows);
  log.acked(b.first_seq, b.rows);
}

// Batches [0, 3) acked, a sync logged after batch `synced` (its rows and those before are
// durable), and only batch 0 stored: what a power cut leaves when batches 1 and 2 were lost.
void lost_after(Writer& w, AckLog& log, Schedule& s, std::uint32_t dim, std::uint64_t synced) {
  for (std::uint64_t i = 0; i < 3; ++i) {
    logged(log, s, i);
    if (i == synced) log.durable(s.batch(i).first_seq + s.batch(i).rows);
  }
  append_batch(w, s, dim, 0);
}

// The first batch index at or after `from` with at least two rows (a batch that can be cut).
std::uint64_t batch_of_two(Schedule& schedule, std::uint64_t from) {
  while (schedule.batch(from).rows < 2) ++from;
  return from;
}

const std::vector<Plant>& plants() {
  static const std::vector<Plant> table = {
      {"control: three whole batches, logged", true,
       [](Writer& w, AckLog& log, Schedule& s, std::uint32_t dim) {
         for (std::uint64_t i = 0; i < 3; ++i) {
           logged(log, s, i);
           append_batch(w, s, dim, i);
         }
       }},
      {"an acked batch is missing", false,
       [](Writer& w, AckLog& log, Schedule& s, std::uint32_t dim) {
         for (std::uint64_t i = 0; i < 3; ++i) logged(log, s, i);
         append_batch(w, s, dim, 0);
         append_batch(w, s, dim, 2);
       }},
      {"a batch that was never attempted is stored", false,
       [](Writer& w, AckLog& log, Schedule& s, std::uint32_t dim) {
         logged(log, s, 0);
         append_batch(w, s, dim, 0);
         append_batch(w, s, dim, 1);
       }},
      {"a batch is stored twice", false,
       [](Writer& w, AckLog& log, Schedule& s, std::uint32_t dim) {
         for (std::uint64_t i = 0; i < 2; ++i) logged(log, s, i);
         append_batch(w, s, dim, 0);
         append_batch(w, s, dim, 1);
         append_batch(w, s, dim, 1);
       }},
      {"the store ends inside a batch", true,
       [](Writer& w, AckLog& log, Schedule& s, std::uint32_t dim) {
         const std::uint64_t cut = batch_of_two(s, 0);
         for (std::uint64_t i = 0; i < cut; ++i) {
           logged(log, s, i);
           append_batch(w, s, dim, i);
         }
         log.intent(s.batch(cut).first_seq, s.batch(cut).rows);  // attempted, not acked
         append_batch(w, s, dim, cut, s.batch(cut).rows - 1);
       }},
      {"a row holds another value than its key's", true,
       [](Writer& w, AckLog& log, Schedule& s, std::uint32_t dim) {
         for (std::uint64_t i = 0; i < 2; ++i) logged(log, s, i);
         append_batch(w, s, dim, 0);
         append_batch(w, s, dim, 1, ~0ull, ~0ull, 0.5f);
       }},
      {"a batch has the wrong epoch", true,
       [](Writer& w, AckLog& log, Schedule& s, std::uint32_t dim) {
         for (std::uint64_t i = 0; i < 2; ++i) logged(log, s, i);
         append_batch(w, s, dim, 0);
         append_batch(w, s, dim, 1, ~0ull, 7);
       }},
      {"control: after a power cut, acked batches past the last sync are missing", false,
       [](Writer& w, AckLog& log, Schedule& s, std::uint32_t dim) {
         lost_after(w, log, s, dim, 0);
       },
       true},
      {"after a power cut, a batch a sync made durable is missing", false,
       [](Writer& w, AckLog& log, Schedule& s, std::uint32_t dim) {
         lost_after(w, log, s, dim, 2);
       },
       true},
  };
  return table;
}

bool fail(const std::string& text) {
  std::fprintf(stderr, "FAIL: %s\n", text.c_str());
  return false;
}

}  // namespace

bool scenario_checkers(std::uint64_t seed) {
  bool ok = true;
  // The checkers' figures of a planted store (rows lost, torn rows seen) are the plant's, not
  // the library's: kept out of the summary, which fails on any of them.
  const std::vector<std::string> no_stats = {"EMBSTORE_STATS_DIR="};
  for (const Plant& plant : plants()) {
    const bool control = std::string(plant.name).rfind("control", 0) == 0;
    Setup s("checkers", seed);
    s.create(64 << 10);
    {
      Writer writer = Writer::open(s.params().store, wopts());
      AckLog log(s.params().log_dir, 1);
      Schedule schedule(s.params().seed, 1, s.params().max_batch);
      plant.plant(writer, log, schedule, s.params().dim);
      writer.close();
    }
    std::fprintf(stderr, "-- plant: %s (the checkers %s)\n", plant.name,
                 control ? "must pass" : "must fail");
    auto args = role_args("verifier", s.params());
    args.insert(args.end(), {"--context", std::string("plant: ") + plant.name});
    if (plant.power_loss) args.push_back("--power-loss");
    const ExitStatus verifier = wait_child(spawn_self(args, no_stats));
    if (control ? !(verifier.exited && verifier.code == 0)
                : !(verifier.exited && verifier.code == 1)) {
      ok = fail(std::string(plant.name) + ": the verifier " + verifier.describe() +
                (control ? ", on a correct store" : ", where it must report the plant (exit 1)"));
    }
    if (control || plant.reader_sees) {
      auto reader_args = role_args("reader", s.params());
      reader_args.push_back("--once");
      const ExitStatus reader = wait_child(spawn_self(reader_args, no_stats));
      if (control ? !(reader.exited && reader.code == 0) : !(reader.exited && reader.code == 1)) {
        ok = fail(std::string(plant.name) + ": the reader " + reader.describe() +
                  (control ? ", on a correct store" : ", where it must report the plant (exit 1)"));
      }
    }
    stat_add("checker_plants");
  }
  return ok;
}

}  // namespace embstore::torture

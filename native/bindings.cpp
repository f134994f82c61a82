// Raw Python bindings of the C API in specee.h (module specee_pc._native).
// Each class owns one C object; the friendly API lives in specee_pc/.
#include "specee.h"

#include "ggml-cpu.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using float_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using int_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

class Weights {
  public:
    explicit Weights(const std::string & path) {
        char err[600] = {0};
        w_.reset(specee_weights_init_from_file(path.c_str(), err, sizeof(err)));
        if (!w_) throw py::value_error(err);
        info_ = specee_weights_get_info(w_.get());
    }

    const specee_weights_info & info() const { return info_; }

    float_array output_norm() const { return float_array(info_.n_embd, specee_weights_output_norm(w_.get())); }

    float_array lm_head_rows(const std::vector<int32_t> & ids) const {
        float_array rows({(py::ssize_t) ids.size(), (py::ssize_t) info_.n_embd});
        bool ok;
        {
            py::gil_scoped_release release;
            ok = specee_weights_lm_head_rows(w_.get(), ids.data(), (int32_t) ids.size(), rows.mutable_data());
        }
        if (!ok) throw py::index_error("token id out of range [0, " + std::to_string(info_.n_vocab) + ")");
        return rows;
    }

    float_array embd_rows(const std::vector<int32_t> & ids) const {
        float_array rows({(py::ssize_t) ids.size(), (py::ssize_t) info_.n_embd});
        if (!specee_weights_embd_rows(w_.get(), ids.data(), (int32_t) ids.size(), rows.mutable_data())) {
            throw py::index_error("token id out of range [0, " + std::to_string(info_.n_vocab) + ")");
        }
        return rows;
    }

    // one hidden state [n_embd], or rows of them [n, n_embd]
    float_array final_norm(const float_array & x) const {
        if ((x.ndim() != 1 && x.ndim() != 2) || x.shape(x.ndim() - 1) != info_.n_embd) {
            throw py::value_error("final_norm expects vectors of n_embd = " + std::to_string(info_.n_embd) + " values");
        }
        float_array y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
        for (py::ssize_t i = 0; i < x.size() / info_.n_embd; ++i) {
            specee_weights_final_norm(w_.get(), x.data() + i * info_.n_embd, y.mutable_data() + i * info_.n_embd);
        }
        return y;
    }

    const specee_weights * get() const { return w_.get(); }

  private:
    struct deleter {
        void operator()(specee_weights * w) const { specee_weights_free(w); }
    };
    std::unique_ptr<specee_weights, deleter> w_;
    specee_weights_info info_{};
};

class ExitController {
  public:
    ExitController(const Weights & weights, int32_t n_threads)
        : n_embd_(weights.info().n_embd), n_vocab_(weights.info().n_vocab),
          e_(specee_exit_init(weights.get(), n_threads)) {}

    specee_exit * get() { return e_.get(); }

    void set_predictor(int32_t il, const float_array & fc1_w, const float_array & fc1_b, const float_array & fc2_w,
                       float fc2_b) {
        if (fc1_w.ndim() != 2 || fc1_b.ndim() != 1 || fc2_w.ndim() != 1 || fc1_b.shape(0) != fc1_w.shape(0) ||
            fc2_w.shape(0) != fc1_w.shape(0)) {
            throw py::value_error("predictor shapes must be fc1_w [H, F], fc1_b [H], fc2_w [H]");
        }
        if (!specee_exit_set_predictor(e_.get(), il, (int32_t) fc1_w.shape(0), (int32_t) fc1_w.shape(1), fc1_w.data(),
                                       fc1_b.data(), fc2_w.data(), fc2_b)) {
            throw py::value_error("bad predictor for layer " + std::to_string(il) +
                                  ": layer out of range, or feature count not 3k or not the same for all layers");
        }
    }
    void set_rule(int32_t rule, float threshold, float threshold_unmatched) {
        if (rule != SPECEE_RULE_VERIFY && rule != SPECEE_RULE_CANDIDATES) throw py::value_error("unknown exit rule");
        specee_exit_set_rule(e_.get(), (specee_exit_rule) rule, threshold, threshold_unmatched);
    }
    void set_schedule(const std::vector<int32_t> & layers) {
        specee_exit_set_schedule(e_.get(), layers.data(), (int32_t) layers.size());
    }
    void set_forced(const std::vector<int32_t> & layers) {
        specee_exit_set_forced(e_.get(), layers.data(), (int32_t) layers.size());
    }
    void set_candidates(const std::vector<int32_t> & ids, const std::vector<uint8_t> & matched) {
        if (!matched.empty() && matched.size() != ids.size()) throw py::value_error("one matched flag per candidate");
        if (!specee_exit_set_candidates(e_.get(), ids.data(), matched.empty() ? nullptr : matched.data(),
                                        (int32_t) ids.size())) {
            throw py::index_error("candidate token id out of range [0, " + std::to_string(n_vocab_) + ")");
        }
    }

    void begin_step() { specee_exit_begin_step(e_.get()); }

    float_array score(int32_t il, const float_array & rows) const {
        if (rows.ndim() != 2) throw py::value_error("score expects feature rows [n, 3k]");
        float_array out(rows.shape(0));
        for (py::ssize_t i = 0; i < rows.shape(0); ++i) {
            const float s = specee_exit_score(e_.get(), il, rows.data(i, 0));
            if (s < 0) throw py::key_error("no predictor for layer " + std::to_string(il));
            out.mutable_data()[i] = s;
        }
        return out;
    }

    bool check_layer(int32_t il, const float_array & hidden) {
        if (hidden.ndim() != 1 || hidden.shape(0) != n_embd_)
            throw py::value_error("hidden state must have n_embd values");
        return specee_exit_check_layer(e_.get(), il, hidden.data());
    }

    py::dict step() const {
        const specee_exit_step s = specee_exit_get_step(e_.get());
        py::dict d;
        d["exit_layer"] = s.exit_layer;
        d["exit_token"] = s.exit_token;
        d["n_checks"] = s.n_checks;
        d["n_lm_heads"] = s.n_lm_heads;
        d["last_score"] = s.last_score;
        d["predictor_us"] = s.predictor_us;
        d["lm_head_us"] = s.lm_head_us;
        return d;
    }

    py::object logits() const {
        const float * l = specee_exit_get_logits(e_.get());
        if (!l) return py::none();
        return float_array(n_vocab_, l);
    }

  private:
    struct deleter {
        void operator()(specee_exit * e) const { specee_exit_free(e); }
    };
    int32_t n_embd_;
    int32_t n_vocab_;
    std::unique_ptr<specee_exit, deleter> e_;
};

class DraftHead {
  public:
    DraftHead(const std::string & path, const Weights & weights, int32_t n_ctx, int32_t n_threads, bool gpu)
        : n_embd_(weights.info().n_embd) {
        char err[600] = {0};
        h_.reset(specee_head_init_from_file(path.c_str(), weights.get(), n_ctx, n_threads, gpu, err, sizeof(err)));
        if (!h_) throw py::value_error(path + ": " + err);
        info_ = specee_head_get_info(h_.get());
    }

    const specee_head_info & info() const { return info_; }

    std::vector<int32_t> vocab() const {
        const int32_t * v = specee_head_vocab(h_.get());
        return std::vector<int32_t>(v, v + info_.n_draft_vocab);
    }

    float_array logits() const { return float_array(info_.n_draft_vocab, specee_head_logits(h_.get())); }

    void set_features(int32_t pos, const float_array & hidden) {
        if (hidden.ndim() != 2 || hidden.shape(1) != n_embd_) throw py::value_error("features must be [n, n_embd]");
        if (!specee_head_set_features(h_.get(), pos, (int32_t) hidden.shape(0), hidden.data())) {
            throw py::index_error("feature positions outside the draft head's context");
        }
    }

    std::vector<int32_t> propose(const int_array & tokens, int32_t k) {
        std::vector<int32_t> out(std::max(k, 0));
        int32_t n;
        {
            py::gil_scoped_release release;
            n = specee_head_propose(h_.get(), tokens.data(), (int32_t) tokens.size(), k, out.data());
        }
        out.resize(n);
        return out;
    }

    // a chain of greedy drafts and their probabilities (specee_head_draft)
    std::pair<std::vector<int32_t>, std::vector<float>> draft(const int_array & tokens, int32_t n_draft) {
        if (n_draft < 1) throw py::value_error("draft: n_draft must be at least 1");
        std::vector<int32_t> out(n_draft);
        std::vector<float> probs(n_draft);
        int32_t n;
        {
            py::gil_scoped_release release;
            n = specee_head_draft(h_.get(), tokens.data(), (int32_t) tokens.size(), n_draft, out.data(), probs.data());
        }
        out.resize(n);
        probs.resize(n);
        return {out, probs};
    }

    // merged with prompt lookup (specee_head_lookup_propose)
    std::vector<int32_t> lookup_propose(const int_array & tokens, int32_t k, int32_t lead, int32_t max_ngram,
                                        int32_t window) {
        return merged(tokens, k, lead, max_ngram, window, nullptr);
    }

    // the same with the flags the exit controller's unmatched threshold reads
    std::pair<std::vector<int32_t>, std::vector<bool>>
    lookup_propose_flagged(const int_array & tokens, int32_t k, int32_t lead, int32_t max_ngram, int32_t window) {
        std::vector<uint8_t> matched(std::max(k, 0));
        std::vector<int32_t> ids = merged(tokens, k, lead, max_ngram, window, matched.data());
        return {ids, std::vector<bool>(matched.begin(), matched.begin() + ids.size())};
    }

    bool prefill(const int_array & tokens) {
        py::gil_scoped_release release;
        return specee_head_prefill(h_.get(), tokens.data(), (int32_t) tokens.size());
    }

    py::tuple forward(const std::vector<int32_t> & tokens) {
        const py::ssize_t rows = (py::ssize_t) tokens.size() - 1;
        if (rows < 1) throw py::value_error("forward needs at least 2 tokens");
        float_array hidden({rows, (py::ssize_t) n_embd_});
        float_array logits({rows, (py::ssize_t) info_.n_draft_vocab});
        if (!specee_head_forward(h_.get(), tokens.data(), (int32_t) tokens.size(), hidden.mutable_data(),
                                 logits.mutable_data())) {
            throw py::value_error(
                "draft head forward failed: features missing for these positions, or too many tokens");
        }
        return py::make_tuple(hidden, logits);
    }

    specee_head * get() { return h_.get(); }

  private:
    // matched: NULL, or room for k flags
    std::vector<int32_t> merged(const int_array & tokens, int32_t k, int32_t lead, int32_t max_ngram, int32_t window,
                                uint8_t * matched) {
        if (max_ngram < 1 || window < 1)
            throw py::value_error("prompt lookup needs max_ngram and window of at least 1");
        if (lead < 0) throw py::value_error("lead: how many of the head's candidates come first, at least 0");
        std::vector<int32_t> out(std::max(k, 0));
        int32_t n;
        {
            py::gil_scoped_release release;
            n = specee_head_lookup_propose(h_.get(), tokens.data(), (int32_t) tokens.size(), k, lead, max_ngram, window,
                                           out.data(), matched);
        }
        out.resize(n);
        return out;
    }

    struct deleter {
        void operator()(specee_head * h) const { specee_head_free(h); }
    };
    int32_t n_embd_;
    std::unique_ptr<specee_head, deleter> h_;
    specee_head_info info_{};
};

class Hook {
  public:
    Hook(int32_t n_layer, int32_t n_embd) : n_layer_(n_layer), n_embd_(n_embd), h_(specee_hook_init(n_layer, n_embd)) {}

    uintptr_t callback_address() const { return reinterpret_cast<uintptr_t>(&specee_hook_eval_callback); }
    uintptr_t user_data_address() const { return reinterpret_cast<uintptr_t>(h_.get()); }

    void set_capture(const std::vector<int32_t> & layers) {
        for (int32_t il : layers) check_layer(il);
        specee_hook_set_capture(h_.get(), layers.data(), (int32_t) layers.size());
    }
    void begin_step(int32_t pos) { specee_hook_begin_step(h_.get(), pos); }
    void set_row_capture(int32_t il) { specee_hook_set_row_capture(h_.get(), il); }
    float_array rows() const {
        const int32_t n = specee_hook_n_rows(h_.get());
        float_array out({(py::ssize_t) n, (py::ssize_t) n_embd_});
        if (n) memcpy(out.mutable_data(), specee_hook_rows(h_.get()), (size_t) n * n_embd_ * sizeof(float));
        return out;
    }
    void set_masking(bool on) { specee_hook_set_masking(h_.get(), on); }
    void prune_holes(int32_t n_pos) { specee_hook_prune_holes(h_.get(), n_pos); }
    int32_t n_holes() const { return specee_hook_n_holes(h_.get()); }

    float_array hidden(int32_t il) const {
        check_layer(il);
        float_array out(n_embd_);
        if (!specee_hook_get_hidden(h_.get(), il, out.mutable_data())) {
            throw py::key_error("layer " + std::to_string(il) + " was not captured in the last decode step");
        }
        return out;
    }

    void set_exit(py::object controller, bool armed) {
        specee_exit * e = controller.is_none() ? nullptr : controller.cast<ExitController &>().get();
        specee_hook_set_exit(h_.get(), e, armed);
        exit_ = controller; // the controller must live while the hook points to it
    }

    std::vector<int32_t> seen_layers() const {
        std::vector<int32_t> seen;
        for (int32_t il = 0; il < n_layer_; ++il) {
            if (specee_hook_saw_layer(h_.get(), il)) seen.push_back(il);
        }
        return seen;
    }

  private:
    void check_layer(int32_t il) const {
        if (il < 0 || il >= n_layer_)
            throw py::index_error("layer " + std::to_string(il) + " out of range [0, " + std::to_string(n_layer_) +
                                  ")");
    }
    struct deleter {
        void operator()(specee_hook * h) const { specee_hook_free(h); }
    };
    int32_t n_layer_;
    int32_t n_embd_;
    std::unique_ptr<specee_hook, deleter> h_;
    py::object exit_ = py::none();
};

} // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "specee-pc native core: GGUF weight reader and llama.cpp eval-callback hook";

    py::class_<Weights>(m, "Weights", "Final norm and LM-head rows read from a GGUF file")
        .def(py::init<const std::string &>(), py::arg("path"))
        .def_property_readonly("arch", [](const Weights & w) { return std::string(w.info().arch); })
        .def_property_readonly("n_layer", [](const Weights & w) { return w.info().n_layer; })
        .def_property_readonly("n_embd", [](const Weights & w) { return w.info().n_embd; })
        .def_property_readonly("n_vocab", [](const Weights & w) { return w.info().n_vocab; })
        .def_property_readonly("norm_eps", [](const Weights & w) { return w.info().norm_eps; })
        .def_property_readonly("tokenizer_hash", [](const Weights & w) { return w.info().tokenizer_hash; })
        .def_property_readonly("lm_head_tensor", [](const Weights & w) { return std::string(w.info().lm_head_tensor); })
        .def_property_readonly("lm_head_type", [](const Weights & w) { return std::string(w.info().lm_head_type); })
        .def("output_norm", &Weights::output_norm)
        .def("lm_head_rows", &Weights::lm_head_rows, py::arg("ids"))
        .def("final_norm", &Weights::final_norm, py::arg("x"))
        .def("embd_rows", &Weights::embd_rows, py::arg("ids"))
        .def(
            "lm_head_logits",
            [](const Weights & w, const float_array & z, int32_t n_threads) {
                if (z.ndim() != 1 || z.shape(0) != w.info().n_embd)
                    throw py::value_error("lm_head_logits expects n_embd values");
                float_array out(w.info().n_vocab);
                {
                    py::gil_scoped_release release;
                    specee_weights_lm_head_logits(w.get(), z.data(), out.mutable_data(), n_threads);
                }
                return out;
            },
            py::arg("z"), py::arg("n_threads") = 1);

    m.def(
        "cpu_buffer_type_address", []() { return reinterpret_cast<uintptr_t>(ggml_backend_cpu_buffer_type()); },
        "ggml's CPU buffer type, for llama_model_params.tensor_buft_overrides");

    m.def(
        "cpu_extra_buffer_types",
        []() {
            std::vector<std::string> names;
            while (const char * name = specee_cpu_extra_buffer_type_name((int32_t) names.size()))
                names.emplace_back(name);
            return names;
        },
        "names of the CPU backend's extra buffer types, where llama.cpp stores repacked weights");

    m.attr("RULE_VERIFY") = (int) SPECEE_RULE_VERIFY;
    m.attr("RULE_CANDIDATES") = (int) SPECEE_RULE_CANDIDATES;

    py::class_<ExitController>(m, "ExitController", "SpecEE exit decision after scheduled layers")
        .def(py::init<const Weights &, int32_t>(), py::arg("weights"), py::arg("n_threads") = 1, py::keep_alive<1, 2>())
        .def("set_predictor", &ExitController::set_predictor, py::arg("layer"), py::arg("fc1_w"), py::arg("fc1_b"),
             py::arg("fc2_w"), py::arg("fc2_b"))
        .def("set_rule", &ExitController::set_rule, py::arg("rule"), py::arg("threshold"),
             py::arg("threshold_unmatched"))
        .def("set_schedule", &ExitController::set_schedule, py::arg("layers"))
        .def("set_forced", &ExitController::set_forced, py::arg("layers"))
        .def("set_candidates", &ExitController::set_candidates, py::arg("ids"),
             py::arg("matched") = std::vector<uint8_t>(),
             "candidate ids and, per candidate, whether prompt lookup found it (empty: all)")
        .def("begin_step", &ExitController::begin_step)
        .def("score", &ExitController::score, py::arg("layer"), py::arg("features"),
             "the layer's predictor scores for feature rows [n, 3k]")
        .def("check_layer", &ExitController::check_layer, py::arg("layer"), py::arg("hidden"),
             "run the exit decision on a layer's hidden state; True: the step would stop there")
        .def("step", &ExitController::step)
        .def("logits", &ExitController::logits);

    py::class_<DraftHead>(m, "DraftHead", "EAGLE-1 draft head of a predictor file, run with ggml")
        .def(py::init<const std::string &, const Weights &, int32_t, int32_t, bool>(), py::arg("path"),
             py::arg("weights"), py::arg("n_ctx"), py::arg("n_threads") = 1, py::arg("gpu") = false,
             py::keep_alive<1, 3>())
        .def_property_readonly("n_draft_vocab", [](const DraftHead & h) { return h.info().n_draft_vocab; })
        .def_property_readonly(
            "n_repacked", [](const DraftHead & h) { return h.info().n_repacked; },
            "matrices held repacked for the CPU's faster kernels (of 6: fc, qkv, output, "
            "gate_up, down, LM-head rows)")
        .def_property_readonly(
            "rows_run", [](DraftHead & h) { return specee_head_rows_run(h.get()); }, "rows computed since creation")
        .def("vocab", &DraftHead::vocab)
        .def("logits", &DraftHead::logits)
        .def(
            "reset", [](DraftHead & h) { specee_head_reset(h.get()); }, "forget every stored feature and cached row")
        .def("set_features", &DraftHead::set_features, py::arg("pos"), py::arg("hidden"),
             "the target's hidden states (before the final norm) at positions pos, pos+1, ...")
        .def("propose", &DraftHead::propose, py::arg("tokens"), py::arg("k"),
             "top-k target ids for the token after the context (empty when a feature is missing)")
        .def("draft", &DraftHead::draft, py::arg("tokens"), py::arg("n_draft"),
             "(ids, probs): a chain of n_draft greedy drafts after the context, each reading the head's own "
             "predicted feature; empty when a feature is missing")
        .def("lookup_propose", &DraftHead::lookup_propose, py::arg("tokens"), py::arg("k"), py::arg("lead"),
             py::arg("max_ngram") = 3, py::arg("window") = 1024,
             "the head's top lead, then prompt-lookup matches, then the head's next")
        .def("lookup_propose_flagged", &DraftHead::lookup_propose_flagged, py::arg("tokens"), py::arg("k"),
             py::arg("lead"), py::arg("max_ngram") = 3, py::arg("window") = 1024,
             "(ids, matched): lookup_propose's candidates and whether lookup found each")
        .def("prefill", &DraftHead::prefill, py::arg("tokens"),
             "after a prompt: run the rows its tokens determine (False when a feature is missing)")
        .def(
            "time_lm_head", [](DraftHead & h, int32_t n_runs) { return specee_head_time_lm_head(h.get(), n_runs); },
            py::arg("n_runs") = 50, "median ms of the draft-vocabulary LM head alone")
        .def("forward", &DraftHead::forward, py::arg("tokens"), "rows 0..n-2 afresh: (hidden [n-1, n_embd], logits)");

    m.def(
        "lookup_matches",
        [](const py::array_t<int32_t, py::array::c_style> & tokens, int32_t k, int32_t max_ngram, int32_t window) {
            if (tokens.ndim() != 1) throw py::value_error("lookup_matches: tokens must be one-dimensional");
            // at most one match per earlier position
            std::vector<int32_t> out(std::max<int64_t>(0, std::min<int64_t>(k, tokens.size())));
            out.resize(specee_lookup_matches(tokens.data(), (int32_t) tokens.size(), k, max_ngram, window, out.data()));
            return out;
        },
        py::arg("tokens"), py::arg("k"), py::arg("max_ngram") = 3, py::arg("window") = 1024,
        "prompt lookup: up to k tokens that followed the context's last n-gram, longest and latest first");

    m.def(
        "lookup_continuation",
        [](const py::array_t<int32_t, py::array::c_style> & tokens, int32_t min_ngram, int32_t max_ngram,
           int32_t window, int32_t max_len) {
            if (tokens.ndim() != 1) throw py::value_error("lookup_continuation: tokens must be one-dimensional");
            if (min_ngram < 1 || max_ngram < min_ngram || window < 2 || max_len < 1) {
                throw py::value_error(
                    "lookup_continuation: need 1 <= min_ngram <= max_ngram, window >= 2, max_len >= 1");
            }
            std::vector<int32_t> out(max_len);
            int32_t match = 0;
            out.resize(specee_lookup_continuation(tokens.data(), (int32_t) tokens.size(), min_ngram, max_ngram, window,
                                                  max_len, out.data(), &match));
            return std::make_pair(out, match);
        },
        py::arg("tokens"), py::arg("min_ngram"), py::arg("max_ngram"), py::arg("window"), py::arg("max_len"),
        "(tokens, n-gram length): what followed the latest earlier occurrence of the longest suffix n-gram");

    py::class_<Hook>(m, "Hook", "Native eval callback that captures per-layer hidden states")
        .def(py::init<int32_t, int32_t>(), py::arg("n_layer"), py::arg("n_embd"))
        .def_property_readonly("callback_address", &Hook::callback_address)
        .def_property_readonly("user_data_address", &Hook::user_data_address)
        .def("set_capture", &Hook::set_capture, py::arg("layers"))
        .def("begin_step", &Hook::begin_step, py::arg("pos") = -1)
        .def("set_row_capture", &Hook::set_row_capture, py::arg("layer"))
        .def("rows", &Hook::rows, "every output row of the row-capture layer in the last step [n, n_embd]")
        .def("set_masking", &Hook::set_masking, py::arg("on"))
        .def("prune_holes", &Hook::prune_holes, py::arg("n_pos"))
        .def_property_readonly("n_holes", &Hook::n_holes)
        .def("hidden", &Hook::hidden, py::arg("layer"))
        .def("set_exit", &Hook::set_exit, py::arg("controller"), py::arg("armed"))
        .def("seen_layers", &Hook::seen_layers);
}

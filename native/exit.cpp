// specee_exit: the SpecEE exit decision after a scheduled layer (see specee.h).
#include "specee.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

namespace {

// one predictor: Linear(F, H) -> ReLU -> Linear(H, 1) -> sigmoid
struct layer_mlp {
    int32_t n_hidden = 0;     // 0: no predictor for this layer
    std::vector<float> fc1_w; // [n_hidden][n_features]
    std::vector<float> fc1_b; // [n_hidden]
    std::vector<float> fc2_w; // [n_hidden]
    float fc2_b = 0.0f;

    float score(const float * x, int32_t n_features) const {
        float acc = fc2_b;
        for (int32_t j = 0; j < n_hidden; ++j) {
            const float * row = fc1_w.data() + (size_t) j * n_features;
            float a = fc1_b[j];
            for (int32_t i = 0; i < n_features; ++i) a += row[i] * x[i];
            acc += fc2_w[j] * std::max(a, 0.0f);
        }
        return 1.0f / (1.0f + std::exp(-acc));
    }
};

using clock_type = std::chrono::steady_clock;

double micros_since(clock_type::time_point t0) {
    return std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
}

} // namespace

struct specee_exit {
    const specee_weights * weights = nullptr;
    int32_t n_layer = 0, n_embd = 0, n_vocab = 0, n_threads = 1;

    std::vector<layer_mlp> mlp; // [n_layer]
    int32_t n_features = 0;
    specee_exit_rule rule = SPECEE_RULE_VERIFY;
    float threshold = 0.5f;
    float threshold_unmatched = 0.5f; // for candidates prompt lookup did not find

    std::vector<uint8_t> scheduled;    // [n_layer]
    std::vector<uint8_t> forced;       // [n_layer]
    std::vector<int32_t> cand;         // k candidate ids, drafter's order
    std::vector<uint8_t> cand_matched; // [k] whether prompt lookup found each in the context
    std::vector<float> cand_rows;      // [k][n_embd]

    // per step
    std::vector<float> z, features, p_prev, logits;
    bool have_prev = false;
    specee_exit_step step{};
};

specee_exit * specee_exit_init(const specee_weights * w, int32_t n_threads) {
    const specee_weights_info info = specee_weights_get_info(w);
    auto * e = new specee_exit();
    e->weights = w;
    e->n_layer = info.n_layer;
    e->n_embd = info.n_embd;
    e->n_vocab = info.n_vocab;
    e->n_threads = std::max(1, n_threads);
    e->mlp.resize(info.n_layer);
    e->scheduled.assign(info.n_layer, 0);
    e->forced.assign(info.n_layer, 0);
    e->z.resize(info.n_embd);
    e->logits.resize(info.n_vocab);
    specee_exit_begin_step(e);
    return e;
}

void specee_exit_free(specee_exit * e) {
    delete e;
}

bool specee_exit_set_predictor(specee_exit * e, int32_t il, int32_t n_hidden, int32_t n_features, const float * fc1_w,
                               const float * fc1_b, const float * fc2_w, float fc2_b) {
    if (il < 0 || il >= e->n_layer || n_hidden <= 0 || n_features <= 0 || n_features % 3 != 0) return false;
    if (e->n_features != 0 && n_features != e->n_features) return false; // one k for all layers
    e->n_features = n_features;
    layer_mlp & m = e->mlp[il];
    m.n_hidden = n_hidden;
    m.fc1_w.assign(fc1_w, fc1_w + (size_t) n_hidden * n_features);
    m.fc1_b.assign(fc1_b, fc1_b + n_hidden);
    m.fc2_w.assign(fc2_w, fc2_w + n_hidden);
    m.fc2_b = fc2_b;
    return true;
}

void specee_exit_set_rule(specee_exit * e, specee_exit_rule rule, float threshold, float threshold_unmatched) {
    e->rule = rule;
    e->threshold = threshold;
    e->threshold_unmatched = threshold_unmatched;
}

float specee_exit_score(const specee_exit * e, int32_t il, const float * x) {
    if (il < 0 || il >= e->n_layer || e->mlp[il].n_hidden == 0) return -1.0f;
    return e->mlp[il].score(x, e->n_features);
}

static void set_layers(std::vector<uint8_t> & flags, const int32_t * layers, int32_t n) {
    std::fill(flags.begin(), flags.end(), 0);
    for (int32_t i = 0; i < n; ++i) {
        if (layers[i] >= 0 && layers[i] < (int32_t) flags.size()) flags[layers[i]] = 1;
    }
}

void specee_exit_set_schedule(specee_exit * e, const int32_t * layers, int32_t n) {
    set_layers(e->scheduled, layers, n);
}

void specee_exit_set_forced(specee_exit * e, const int32_t * layers, int32_t n) {
    set_layers(e->forced, layers, n);
}

bool specee_exit_set_candidates(specee_exit * e, const int32_t * ids, const uint8_t * matched, int32_t k) {
    std::vector<float> rows((size_t) k * e->n_embd);
    if (!specee_weights_lm_head_rows(e->weights, ids, k, rows.data())) return false;
    e->cand.assign(ids, ids + k);
    if (matched) e->cand_matched.assign(matched, matched + k);
    else e->cand_matched.assign(k, 1);
    e->cand_rows.swap(rows);
    return true;
}

bool specee_exit_wants_layer(const specee_exit * e, int32_t il) {
    if (il < 0 || il >= e->n_layer) return false;
    if (e->forced[il]) return true;
    return e->scheduled[il] && e->mlp[il].n_hidden > 0 && 3 * (int32_t) e->cand.size() == e->n_features;
}

void specee_exit_begin_step(specee_exit * e) {
    e->have_prev = false;
    e->step = specee_exit_step{-1, -1, 0, 0, 0.0f, 0.0, 0.0};
}

// features [lc, p, d] of the candidates at this layer; leaves z = final_norm(h)
static void compute_features(specee_exit * e, const float * hidden) {
    const int32_t k = (int32_t) e->cand.size();
    specee_weights_final_norm(e->weights, hidden, e->z.data());
    e->features.assign(3 * k, 0.0f);
    float * lc = e->features.data();
    float * p = lc + k;
    float * d = p + k;
    float max_lc = -INFINITY;
    for (int32_t c = 0; c < k; ++c) {
        const float * row = e->cand_rows.data() + (size_t) c * e->n_embd;
        float acc = 0.0f;
        for (int32_t i = 0; i < e->n_embd; ++i) acc += row[i] * e->z[i];
        lc[c] = acc;
        max_lc = std::max(max_lc, acc);
    }
    float sum = 0.0f;
    for (int32_t c = 0; c < k; ++c) sum += (p[c] = std::exp(lc[c] - max_lc));
    for (int32_t c = 0; c < k; ++c) {
        p[c] /= sum;
        d[c] = e->have_prev ? p[c] - e->p_prev[c] : p[c];
    }
    e->p_prev.assign(p, p + k);
    e->have_prev = true;
}

static int32_t full_lm_head(specee_exit * e) {
    const auto t0 = clock_type::now();
    specee_weights_lm_head_logits(e->weights, e->z.data(), e->logits.data(), e->n_threads);
    e->step.lm_head_us += micros_since(t0);
    e->step.n_lm_heads++;
    return (int32_t) (std::max_element(e->logits.begin(), e->logits.end()) - e->logits.begin());
}

static bool exit_at(specee_exit * e, int32_t il, int32_t token) {
    e->step.exit_layer = il;
    e->step.exit_token = token;
    return true;
}

bool specee_exit_check_layer(specee_exit * e, int32_t il, const float * hidden) {
    if (!specee_exit_wants_layer(e, il)) return false;
    const auto t0 = clock_type::now();
    e->step.n_checks++;
    if (e->forced[il]) {
        specee_weights_final_norm(e->weights, hidden, e->z.data());
        e->step.predictor_us += micros_since(t0);
        return exit_at(e, il, full_lm_head(e));
    }
    compute_features(e, hidden);
    const float score = e->mlp[il].score(e->features.data(), e->n_features);
    e->step.last_score = score;
    e->step.predictor_us += micros_since(t0);
    // the exit token's own bar: prompt lookup's matches and the drafter's other candidates differ in how
    // often an exit on them is wrong and in how much the K/V holes of a masked exit cost later tokens
    const auto passes = [&](int32_t c) { return score > (e->cand_matched[c] ? e->threshold : e->threshold_unmatched); };
    const int32_t k = (int32_t) e->cand.size();
    // no candidate's bar passed: no exit, and verify need not run its full LM head
    bool any_passes = false;
    for (int32_t c = 0; c < k && !any_passes; ++c) any_passes = passes(c);
    if (!any_passes) return false;

    if (e->rule == SPECEE_RULE_CANDIDATES) {
        const float * lc = e->features.data();
        const int32_t best = (int32_t) (std::max_element(lc, lc + k) - lc);
        if (!passes(best)) return false;
        std::fill(e->logits.begin(), e->logits.end(), -INFINITY);
        for (int32_t c = 0; c < k; ++c) e->logits[e->cand[c]] = lc[c];
        return exit_at(e, il, e->cand[best]);
    }
    const int32_t token = full_lm_head(e);
    const auto it = std::find(e->cand.begin(), e->cand.end(), token);
    if (it == e->cand.end() || !passes((int32_t) (it - e->cand.begin()))) return false;
    return exit_at(e, il, token);
}

specee_exit_step specee_exit_get_step(const specee_exit * e) {
    return e->step;
}

const float * specee_exit_get_logits(const specee_exit * e) {
    return e->step.exit_layer >= 0 ? e->logits.data() : nullptr;
}

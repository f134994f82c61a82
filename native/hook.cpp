// specee_hook: a native eval callback that copies per-layer hidden states during llama_decode.
//
// llama.cpp calls the callback twice per graph node: "ask" (does the user want to see this
// node? a yes makes the scheduler compute up to it) and "observe" (the node is computed).
// A Python callback would cost ~0.5 ms per token (hundreds of asks), hence native code.
#include "specee.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstring>
#include <vector>

struct specee_hook {
    int32_t n_layer = 0;
    int32_t n_embd  = 0;

    std::vector<uint8_t> capture;  // [n_layer] layers whose hidden state the caller wants
    std::vector<uint8_t> seen;     // [n_layer] l_out-<i> nodes met during this step
    std::vector<uint8_t> captured; // [n_layer] layers copied during this step
    std::vector<float>   hidden;   // [n_layer][n_embd] last token's residual stream

    specee_exit * exit  = nullptr;  // decides where a step may stop (not owned)
    bool          armed = false;
    bool          cut   = false;    // this step stopped early
};

namespace {

// "l_out-<i>" -> i, anything else -> -1 (runs for every node: no allocation, no sscanf)
int32_t parse_layer_output(const char * name) {
    if (strncmp(name, "l_out-", 6) != 0) return -1;
    const char * p = name + 6;
    if (*p < '0' || *p > '9') return -1;
    int32_t il = 0;
    for (; *p >= '0' && *p <= '9'; ++p) il = il * 10 + (*p - '0');
    return *p == '\0' ? il : -1;
}

} // namespace

specee_hook * specee_hook_init(int32_t n_layer, int32_t n_embd) {
    auto * h = new specee_hook();
    h->n_layer = n_layer;
    h->n_embd  = n_embd;
    h->capture.assign(n_layer, 0);
    h->seen.assign(n_layer, 0);
    h->captured.assign(n_layer, 0);
    h->hidden.assign((size_t) n_layer * n_embd, 0.0f);
    return h;
}

void specee_hook_free(specee_hook * h) {
    delete h;
}

bool specee_hook_eval_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * h = static_cast<specee_hook *>(user_data);
    // after a cut, later graph splits (partial GPU offload) still run: ask to see each of
    // their nodes and refuse it, which stops that split too
    if (h->cut) return ask;
    const int32_t il = parse_layer_output(t->name);
    if (il < 0 || il >= h->n_layer) return !ask; // not ours: skip it, and never stop the graph
    const bool decides = h->armed && specee_exit_wants_layer(h->exit, il);
    if (ask) {
        h->seen[il] = 1;
        return h->capture[il] || decides;
    }
    if (t->type != GGML_TYPE_F32 || t->ne[0] != h->n_embd) return true;
    // the last column is the last token of the ubatch (the last layer keeps only output rows)
    float * hidden = h->hidden.data() + (size_t) il * h->n_embd;
    const size_t offset = (size_t) (t->ne[1] - 1) * t->nb[1];
    ggml_backend_tensor_get(t, hidden, offset, (size_t) h->n_embd * sizeof(float));
    h->captured[il] = 1;
    if (decides && specee_exit_check_layer(h->exit, il, hidden)) {
        h->cut = true;
        return false;
    }
    return true;
}

void specee_hook_set_capture(specee_hook * h, const int32_t * layers, int32_t n) {
    std::fill(h->capture.begin(), h->capture.end(), 0);
    for (int32_t i = 0; i < n; ++i) {
        if (layers[i] >= 0 && layers[i] < h->n_layer) h->capture[layers[i]] = 1;
    }
}

void specee_hook_begin_step(specee_hook * h) {
    std::fill(h->seen.begin(), h->seen.end(), 0);
    std::fill(h->captured.begin(), h->captured.end(), 0);
    h->cut = false;
    if (h->exit) specee_exit_begin_step(h->exit);
}

void specee_hook_set_exit(specee_hook * h, specee_exit * e, bool armed) {
    h->exit  = e;
    h->armed = e != nullptr && armed;
}

bool specee_hook_get_hidden(const specee_hook * h, int32_t il, float * out) {
    if (il < 0 || il >= h->n_layer || !h->captured[il]) return false;
    memcpy(out, h->hidden.data() + (size_t) il * h->n_embd, (size_t) h->n_embd * sizeof(float));
    return true;
}

bool specee_hook_saw_layer(const specee_hook * h, int32_t il) {
    return il >= 0 && il < h->n_layer && h->seen[il] != 0;
}

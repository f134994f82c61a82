// specee_hook: a native eval callback that copies per-layer hidden states during llama_decode.
//
// llama.cpp calls the callback twice per graph node: "ask" (does the user want to see this
// node? a yes makes the scheduler compute up to it) and "observe" (the node is computed).
// A Python callback would cost ~0.5 ms per token (hundreds of asks), hence native code.
#include "specee.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

struct specee_hook {
    int32_t n_layer = 0;
    int32_t n_embd = 0;

    std::vector<uint8_t> capture;  // [n_layer] layers whose hidden state the caller wants
    std::vector<uint8_t> seen;     // [n_layer] l_out-<i> nodes met during this step
    std::vector<uint8_t> captured; // [n_layer] layers copied during this step
    std::vector<float> hidden;     // [n_layer][n_embd] last token's residual stream
    int32_t row_layer = -1;        // layer whose every output row is kept (-1: none)
    std::vector<float> rows;       // [n][n_embd] those rows, over the step's ubatches

    specee_exit * exit = nullptr; // decides where a step may stop (not owned)
    bool armed = false;
    bool cut = false; // this step stopped early

    struct kv_hole {
        int32_t pos;
        int64_t cell;
        int32_t layer; // the exit layer: cells are hidden from deeper layers
    };
    bool masking = false;
    std::vector<kv_hole> holes;
    std::vector<uint8_t> hole_layers; // [n_layer] some hole exited after this layer
    int32_t step_pos = -1;
    int64_t step_cell = -1;                  // KV cell of this step's (single) token
    int32_t next_layer = 0;                  // layer whose nodes the scheduler is asking about
    const ggml_tensor * hidden_in = nullptr; // mask tensor last written, and the layer it is
    int32_t hidden_below = 0;                // complete for (holes of exit layer < this)
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

bool is_mask_consumer(const ggml_tensor * t) {
    return (t->op == GGML_OP_SOFT_MAX && t->src[1]) || (t->op == GGML_OP_FLASH_ATTN_EXT && t->src[3]);
}

// -inf for every query row of mask m at the cells of holes whose exit layer is in [from, to)
void write_holes(specee_hook * h, ggml_tensor * m, int32_t from, int32_t to) {
    if (m->type != GGML_TYPE_F32 && m->type != GGML_TYPE_F16) return;
    const uint16_t f16_neg_inf = 0xFC00;
    const float f32_neg_inf = -INFINITY;
    const void * value = m->type == GGML_TYPE_F32 ? (const void *) &f32_neg_inf : (const void *) &f16_neg_inf;
    const size_t size = ggml_type_size(m->type);
    const bool host = ggml_backend_buffer_is_host(m->buffer);
    for (const auto & hole : h->holes) {
        if (hole.layer < from || hole.layer >= to || hole.cell < 0 || hole.cell >= m->ne[0]) continue;
        for (int64_t row = 0; row < m->ne[1]; ++row) {
            const size_t offset = (size_t) row * m->nb[1] + (size_t) hole.cell * m->nb[0];
            if (host) {
                memcpy((char *) m->data + offset, value, size);
            } else {
                ggml_backend_tensor_set(m, value, offset, size);
            }
        }
    }
}

// Graph inputs are set before compute, so the ask phase can read them. The K-cache stores
// (SET_ROWS) index cells with attn_inp_k_idxs (stream * kv_size + cell). Each attention reads
// the KQ mask; when layer j's is asked about, layers < j are computed (the hook asks for a
// stop after each hole's exit layer), so the holes of exit layer < j can be hidden in the very
// tensor that attention reads: with several graph splits each has its own copy of the mask.
void note_kv_inputs(specee_hook * h, ggml_tensor * t) {
    if (t->op == GGML_OP_SET_ROWS) {
        const ggml_tensor * idxs = t->src[1];
        if (h->step_cell < 0 && idxs->type == GGML_TYPE_I64 && strcmp(idxs->name, "attn_inp_k_idxs") == 0) {
            ggml_backend_tensor_get(idxs, &h->step_cell, (size_t) (ggml_nelements(idxs) - 1) * sizeof(int64_t),
                                    sizeof(int64_t));
        }
    } else if (is_mask_consumer(t) && !h->holes.empty()) {
        ggml_tensor * m = t->op == GGML_OP_SOFT_MAX ? t->src[1] : t->src[3];
        const int32_t from = m == h->hidden_in ? h->hidden_below : 0;
        write_holes(h, m, from, h->next_layer);
        h->hidden_in = m;
        h->hidden_below = std::max(from, h->next_layer);
    }
}

void index_hole_layers(specee_hook * h) {
    std::fill(h->hole_layers.begin(), h->hole_layers.end(), 0);
    for (const auto & hole : h->holes) h->hole_layers[hole.layer] = 1;
}

} // namespace

specee_hook * specee_hook_init(int32_t n_layer, int32_t n_embd) {
    auto * h = new specee_hook();
    h->n_layer = n_layer;
    h->n_embd = n_embd;
    h->capture.assign(n_layer, 0);
    h->seen.assign(n_layer, 0);
    h->captured.assign(n_layer, 0);
    h->hidden.assign((size_t) n_layer * n_embd, 0.0f);
    h->hole_layers.assign(n_layer, 0);
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
    if (il < 0 || il >= h->n_layer) { // not ours: skip it, and never stop the graph
        if (ask && h->masking) note_kv_inputs(h, t);
        return !ask;
    }
    const bool decides = h->armed && specee_exit_wants_layer(h->exit, il);
    const bool hides = h->masking && h->hole_layers[il];
    if (ask) {
        h->seen[il] = 1;
        // the next nodes belong to layer il + 1; after the last layer, a next graph (ubatch) starts
        h->next_layer = il + 1 < h->n_layer ? il + 1 : 0;
        if (il + 1 == h->n_layer) h->hidden_in = nullptr;
        return h->capture[il] || decides || hides || il == h->row_layer;
    }
    if (t->type != GGML_TYPE_F32 || t->ne[0] != h->n_embd) return true;
    // the last column is the last token of the ubatch (the last layer keeps only output rows)
    float * hidden = h->hidden.data() + (size_t) il * h->n_embd;
    const size_t row_bytes = (size_t) h->n_embd * sizeof(float);
    if (il == h->row_layer) { // every row, the last one doubling as the hidden state
        const size_t n = h->rows.size();
        h->rows.resize(n + (size_t) t->ne[1] * h->n_embd);
        if (ggml_is_contiguous(t)) {
            ggml_backend_tensor_get(t, h->rows.data() + n, 0, (size_t) t->ne[1] * row_bytes);
        } else {
            for (int64_t r = 0; r < t->ne[1]; ++r) {
                ggml_backend_tensor_get(t, h->rows.data() + n + (size_t) r * h->n_embd, (size_t) r * t->nb[1],
                                        row_bytes);
            }
        }
        memcpy(hidden, h->rows.data() + h->rows.size() - h->n_embd, row_bytes);
    } else {
        ggml_backend_tensor_get(t, hidden, (size_t) (t->ne[1] - 1) * t->nb[1], row_bytes);
    }
    h->captured[il] = 1;
    if (decides && specee_exit_check_layer(h->exit, il, hidden)) {
        h->cut = true;
        if (h->masking) {
            h->holes.push_back({h->step_pos, h->step_cell, il});
            h->hole_layers[il] = 1;
        }
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

void specee_hook_set_row_capture(specee_hook * h, int32_t il) {
    h->row_layer = il >= 0 && il < h->n_layer ? il : -1;
    h->rows.clear();
}

int32_t specee_hook_n_rows(const specee_hook * h) {
    return (int32_t) (h->rows.size() / h->n_embd);
}

const float * specee_hook_rows(const specee_hook * h) {
    return h->rows.data();
}

void specee_hook_begin_step(specee_hook * h, int32_t pos) {
    std::fill(h->seen.begin(), h->seen.end(), 0);
    std::fill(h->captured.begin(), h->captured.end(), 0);
    h->cut = false;
    h->rows.clear();
    h->step_pos = pos;
    h->step_cell = -1;
    h->next_layer = 0;
    h->hidden_in = nullptr;
    if (h->exit) specee_exit_begin_step(h->exit);
}

void specee_hook_set_exit(specee_hook * h, specee_exit * e, bool armed) {
    h->exit = e;
    h->armed = e != nullptr && armed;
    if (!h->armed) h->cut = false; // a cut belongs to its step: decodes the engine does not run must not inherit it
}

bool specee_hook_get_hidden(const specee_hook * h, int32_t il, float * out) {
    if (il < 0 || il >= h->n_layer || !h->captured[il]) return false;
    memcpy(out, h->hidden.data() + (size_t) il * h->n_embd, (size_t) h->n_embd * sizeof(float));
    return true;
}

bool specee_hook_saw_layer(const specee_hook * h, int32_t il) {
    return il >= 0 && il < h->n_layer && h->seen[il] != 0;
}

void specee_hook_set_masking(specee_hook * h, bool on) {
    h->masking = on;
    if (!on) {
        h->holes.clear();
        index_hole_layers(h);
    }
}

void specee_hook_prune_holes(specee_hook * h, int32_t n_pos) {
    h->holes.erase(std::remove_if(h->holes.begin(), h->holes.end(),
                                  [n_pos](const specee_hook::kv_hole & hole) { return hole.pos >= n_pos; }),
                   h->holes.end());
    index_hole_layers(h);
}

int32_t specee_hook_n_holes(const specee_hook * h) {
    return (int32_t) h->holes.size();
}

// specee_head: an EAGLE-1 draft head run with ggml (see specee.h).
//
// Row j of the head reads the target's normed final hidden state at position j (the feature)
// and the embedding of the token at j + 1, and predicts the feature at j + 1; its logits over
// the draft vocabulary are the candidates for the token at j + 2. One decoder layer (no input
// norm, as EAGLE-1), its own KV cache over positions, the target's LM-head rows for the draft
// vocabulary copied as stored.
//
// Decoding proposes one row per step, so that graph is built once per STEP_LEN_ALIGN positions
// and reused: its K/V writes go through index inputs (set_rows) and its attention spans a padded
// length with the tail masked. Q/K/V and gate/up are fused at load (one matrix product each).
// On the CPU, matrices its kernels can interleave (q4_0, on x86 with AVX2 and on ARM) are stored repacked, as
// llama.cpp stores its own weights (SmolLM2's head: a proposal 17% faster than unpacked q4_0).
#include "specee.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "gguf.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <numeric>
#include <string>
#include <vector>

namespace {

constexpr int GRAPH_SIZE = 256;
constexpr int32_t MAX_ROWS = 256;        // rows per graph
constexpr int64_t MAX_SCORES = 16 << 20; // [len, rows, n_head] attention scores per graph (64 MiB of f32)
constexpr int32_t STEP_LEN_ALIGN = 64;   // a step graph attends over a multiple of this many positions

const char * const WEIGHT_NAMES[] = {
    "head.fc.weight",       "head.fc.bias",         "head.attn_q.weight",
    "head.attn_k.weight",   "head.attn_v.weight",   "head.attn_output.weight",
    "head.ffn_norm.weight", "head.ffn_gate.weight", "head.ffn_up.weight",
    "head.ffn_down.weight",
};
enum weight_index { FC_W, FC_B, WQ, WK, WV, WO, FFN_NORM, W_GATE, W_UP, W_DOWN, N_WEIGHTS };

struct head_error {
    std::string msg;
};

[[noreturn]] void fail(const std::string & msg) {
    throw head_error{msg};
}

uint32_t get_u32(const gguf_context * g, const char * key) {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_UINT32)
        fail(std::string("no draft head in this file (no ") + key + ")");
    return gguf_get_val_u32(g, id);
}

float get_f32(const gguf_context * g, const char * key) {
    const int64_t id = gguf_find_key(g, key);
    if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_FLOAT32)
        fail(std::string("no draft head in this file (no ") + key + ")");
    return gguf_get_val_f32(g, id);
}

// which fused matrix a file tensor is part of: 0 (q/k/v), 1 (gate/up), -1 none
int fused_part(int i) {
    return i == WQ || i == WK || i == WV ? 0 : i == W_GATE || i == W_UP ? 1 : -1;
}

} // namespace

struct head_inputs {
    ggml_tensor *x, *pos, *mask, *k_idx, *v_idx;
};

// a built and allocated graph (the one-row step graph is kept across proposals)
struct head_graph {
    ggml_context * ctx = nullptr;
    ggml_cgraph * gf = nullptr;
    head_inputs in{};
    ggml_tensor * hidden = nullptr; // [n_embd, n]
    ggml_tensor * logits = nullptr; // [n_draft_vocab, n or 1]
    int32_t len = 0;                // KV positions its attention spans
};

struct specee_head {
    const specee_weights * target = nullptr;
    specee_head_info info{};
    int32_t n_ctx = 0;

    ggml_backend_t backend = nullptr;
    ggml_threadpool_t threadpool = nullptr;      // CPU: kept across proposals (no thread start per graph)
    ggml_backend_buffer_type_t repack = nullptr; // the CPU backend's repacking buffer type, if any
    ggml_context * ctx_w = nullptr;              // vectors, KV cache, matrices not repacked
    ggml_backend_buffer_t buf_w = nullptr;
    ggml_context * ctx_m = nullptr; // matrices in the repacking buffer
    ggml_backend_buffer_t buf_m = nullptr;
    ggml_gallocr_t galloc = nullptr;      // multi-row graphs
    ggml_gallocr_t step_galloc = nullptr; // the step graph only: its allocation must outlive other graphs
    ggml_tensor * w[N_WEIGHTS] = {};      // WQ/WK/WV and W_GATE/W_UP stay unallocated: read into w_qkv, w_gate_up
    ggml_tensor * w_qkv = nullptr;        // [n_embd, q + 2 kv]
    ggml_tensor * w_gate_up = nullptr;    // [n_embd, 2 n_ff]: gate rows, then up rows
    ggml_tensor * lm_rows = nullptr;      // [n_embd, n_draft_vocab], the target's type
    ggml_tensor * k_cache = nullptr;      // [n_head_kv * head_dim, n_ctx]
    ggml_tensor * v_cache = nullptr;      // [n_ctx, n_head_kv * head_dim]: transposed, attention reads it as is
    std::vector<int32_t> vocab;           // draft id -> target id

    std::vector<float> features;       // [n_ctx][n_embd] normed target hidden states by position
    std::vector<uint8_t> have;         // [n_ctx]
    std::vector<int32_t> cache_tokens; // token of each cached row (row j holds token j + 1)
    int64_t rows_run = 0;              // rows computed so far (what a proposal cost)
    std::vector<float> logits;         // last row's draft-vocabulary logits
    std::vector<float> last_hidden;    // last row's hidden state: the feature it predicts
    std::vector<uint8_t> graph_meta;   // tensor and graph structs of a multi-row graph
    std::vector<uint8_t> step_meta;    // ... of the step graph
    head_graph step;
    std::vector<float> x, mask; // graph inputs, kept across proposals (no allocation per step)
    std::vector<int32_t> pos;
    std::vector<int64_t> k_idx, v_idx;
};

namespace {

// The CPU backend's extra buffer types, null-terminated (found as llama.cpp finds them), or null
ggml_backend_buffer_type_t * cpu_extra_buffer_types(ggml_backend_dev_t cpu) {
    auto extra_bufts = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
        ggml_backend_dev_backend_reg(cpu), "ggml_backend_dev_get_extra_bufts");
    return extra_bufts ? extra_bufts(cpu) : nullptr;
}

// The CPU backend's buffer type that stores matrices interleaved for its faster kernels
// (llama.cpp's "CPU_REPACK"), or null
ggml_backend_buffer_type_t cpu_repack_buffer_type(ggml_backend_dev_t cpu) {
    for (ggml_backend_buffer_type_t * b = cpu_extra_buffer_types(cpu); b && *b; ++b) {
        if (!strcmp(ggml_backend_buft_name(*b), "CPU_REPACK")) return *b;
    }
    return nullptr;
}

// Whether the CPU backend multiplies by a [ne0, ne1] matrix of this type held in buft
// (llama.cpp's test for its weights: a mul_mat whose weight sits in an empty buffer of buft)
bool mul_mat_supported(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft, ggml_type type, int64_t ne0,
                       int64_t ne1) {
    ggml_context * ctx = ggml_init(ggml_init_params{ggml_tensor_overhead() * 3, nullptr, /*no_alloc =*/true});
    ggml_tensor * w = ggml_new_tensor_2d(ctx, type, ne0, ne1);
    ggml_tensor * op = ggml_mul_mat(ctx, w, ggml_new_tensor_1d(ctx, GGML_TYPE_F32, ne0));
    ggml_backend_buffer_t empty = ggml_backend_buft_alloc_buffer(buft, 0);
    w->buffer = empty;
    const bool ok = empty && ggml_backend_dev_supports_op(dev, op);
    if (empty) ggml_backend_buffer_free(empty);
    ggml_free(ctx);
    return ok;
}

// A matrix tensor: in the repacking buffer when there is one that takes it, else with the rest
ggml_tensor * new_matrix(specee_head * h, ggml_type type, int64_t ne0, int64_t ne1) {
    const bool repack = h->repack && mul_mat_supported(ggml_backend_get_device(h->backend), h->repack, type, ne0, ne1);
    return ggml_new_tensor_2d(repack ? h->ctx_m : h->ctx_w, type, ne0, ne1);
}

void load_weights(specee_head * h, const char * path) {
    ggml_context * meta = nullptr;
    gguf_context * g = gguf_init_from_file(path, gguf_init_params{/*no_alloc =*/true, /*ctx =*/&meta});
    if (!g) fail("not a readable GGUF file");
    FILE * f = nullptr;
    try {
        specee_head_info & in = h->info;
        in.n_embd = specee_weights_get_info(h->target).n_embd;
        in.n_head = (int32_t) get_u32(g, "specee.head.n_head");
        in.n_head_kv = (int32_t) get_u32(g, "specee.head.n_head_kv");
        in.head_dim = (int32_t) get_u32(g, "specee.head.head_dim");
        in.n_ff = (int32_t) get_u32(g, "specee.head.n_ff");
        in.rope_freq_base = get_f32(g, "specee.head.rope_freq_base");
        in.norm_eps = get_f32(g, "specee.head.norm_eps");
        if (in.n_head <= 0 || in.n_head_kv <= 0 || in.n_head % in.n_head_kv != 0 || in.head_dim <= 0 ||
            in.head_dim % 2 != 0) {
            fail("draft head has a bad attention shape");
        }
        const int64_t d = in.n_embd, q = (int64_t) in.n_head * in.head_dim, kv = (int64_t) in.n_head_kv * in.head_dim,
                      ff = in.n_ff;
        const int64_t shapes[N_WEIGHTS][2] = {{2 * d, d}, {d, 1}, {d, q},  {d, kv}, {d, kv},
                                              {q, d},     {d, 1}, {d, ff}, {d, ff}, {ff, d}};

        const ggml_tensor * vocab_t = ggml_get_tensor(meta, "head.vocab");
        if (!vocab_t || vocab_t->type != GGML_TYPE_I32 || ggml_n_dims(vocab_t) != 1)
            fail("draft head has no head.vocab (i32)");
        in.n_draft_vocab = (int32_t) vocab_t->ne[0];

        h->ctx_w = ggml_init(ggml_init_params{ggml_tensor_overhead() * 10, nullptr, /*no_alloc =*/true});
        h->ctx_m = ggml_init(ggml_init_params{ggml_tensor_overhead() * 6, nullptr, /*no_alloc =*/true});
        const ggml_tensor * src[N_WEIGHTS];
        for (int i = 0; i < N_WEIGHTS; ++i) {
            src[i] = ggml_get_tensor(meta, WEIGHT_NAMES[i]);
            if (!src[i]) fail(std::string("draft head has no ") + WEIGHT_NAMES[i]);
            if (src[i]->ne[0] != shapes[i][0] || ggml_nrows(src[i]) != shapes[i][1]) {
                fail(std::string("draft head tensor ") + WEIGHT_NAMES[i] + " has the wrong shape for this model");
            }
            // vectors are added/multiplied in f32; matrices in a type the file format allows
            const bool vector = i == FC_B || i == FFN_NORM;
            const ggml_type t = src[i]->type;
            const bool matrix_ok =
                t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0;
            if (vector ? t != GGML_TYPE_F32 : !matrix_ok) {
                fail(std::string("draft head tensor ") + WEIGHT_NAMES[i] + " has type " + ggml_type_name(t) +
                     (vector ? ", not f32" : ", not one of f32, f16, q8_0, q4_0"));
            }
            if (fused_part(i) >= 0) continue;
            h->w[i] = vector ? ggml_new_tensor_2d(h->ctx_w, t, shapes[i][0], shapes[i][1])
                             : new_matrix(h, t, shapes[i][0], shapes[i][1]);
        }
        if (src[WQ]->type != src[WK]->type || src[WQ]->type != src[WV]->type || src[W_GATE]->type != src[W_UP]->type) {
            fail("draft head stores q/k/v (or gate/up) in different types: they are fused into one matrix");
        }
        h->w_qkv = new_matrix(h, src[WQ]->type, d, q + 2 * kv);
        h->w_gate_up = new_matrix(h, src[W_GATE]->type, d, 2 * ff);
        const ggml_type lm_type = (ggml_type) specee_weights_lm_head_ggml_type(h->target);
        h->lm_rows = new_matrix(h, lm_type, d, in.n_draft_vocab);
        h->k_cache = ggml_new_tensor_2d(h->ctx_w, GGML_TYPE_F32, kv, h->n_ctx);
        h->v_cache = ggml_new_tensor_2d(h->ctx_w, GGML_TYPE_F32, h->n_ctx, kv);
        h->buf_w = ggml_backend_alloc_ctx_tensors(h->ctx_w, h->backend);
        if (!h->buf_w) fail("cannot allocate the draft head's weights");
        ggml_backend_buffer_clear(h->buf_w, 0);
        for (ggml_tensor * t = ggml_get_first_tensor(h->ctx_m); t; t = ggml_get_next_tensor(h->ctx_m, t))
            ++in.n_repacked;
        if (in.n_repacked > 0) {
            h->buf_m = ggml_backend_alloc_ctx_tensors_from_buft(h->ctx_m, h->repack);
            if (!h->buf_m) fail("cannot allocate the draft head's weights");
        }
        // tensor data from the file
        f = fopen(path, "rb");
        if (!f) fail("cannot open the file");
        const size_t data_offset = gguf_get_data_offset(g);
        auto read = [&](const char * name, void * dst, size_t size) {
            const int64_t id = gguf_find_tensor(g, name);
            if (gguf_get_tensor_size(g, id) != size)
                fail(std::string("draft head tensor ") + name + " has an unexpected size");
            if (fseek(f, (long) (data_offset + gguf_get_tensor_offset(g, id)), SEEK_SET) != 0 ||
                fread(dst, 1, size, f) != size) {
                fail(std::string("truncated file: cannot read ") + name);
            }
        };
        // a repacking buffer takes a matrix in one piece: fused parts are stacked here first, in
        // file order (q, k, v / gate, up)
        std::vector<uint8_t> bytes, fused[2];
        for (int i = 0; i < N_WEIGHTS; ++i) {
            const int part = fused_part(i);
            bytes.resize(ggml_row_size(src[i]->type, src[i]->ne[0]) * ggml_nrows(src[i]));
            read(WEIGHT_NAMES[i], bytes.data(), bytes.size());
            if (part < 0) ggml_backend_tensor_set(h->w[i], bytes.data(), 0, bytes.size());
            else fused[part].insert(fused[part].end(), bytes.begin(), bytes.end());
        }
        ggml_backend_tensor_set(h->w_qkv, fused[0].data(), 0, fused[0].size());
        ggml_backend_tensor_set(h->w_gate_up, fused[1].data(), 0, fused[1].size());
        h->vocab.resize(in.n_draft_vocab);
        read("head.vocab", h->vocab.data(), h->vocab.size() * sizeof(int32_t));
        bytes.resize(ggml_nbytes(h->lm_rows));
        if (!specee_weights_lm_head_rows_raw(h->target, h->vocab.data(), in.n_draft_vocab, bytes.data())) {
            fail("draft head vocabulary has token ids outside the model's vocabulary");
        }
        ggml_backend_tensor_set(h->lm_rows, bytes.data(), 0, bytes.size());
        fclose(f);
        f = nullptr;
    } catch (...) {
        if (f) fclose(f);
        gguf_free(g);
        ggml_free(meta);
        throw;
    }
    gguf_free(g);
    ggml_free(meta);
}

// The graph of n rows attending over KV positions [0, len): writes the rows' K/V into the cache
// at the positions given as inputs (k_idx, v_idx), then returns the hidden states [n_embd, n] and
// logits [n_draft_vocab, n or 1]. The mask hides positions a row may not see, padding included.
void build_graph(specee_head * h, int32_t n, int32_t len, bool all_logits, head_graph & g) {
    const specee_head_info & hi = h->info;
    const int64_t d = hi.n_embd, hd = hi.head_dim, q_size = (int64_t) hi.n_head * hd, kv = (int64_t) hi.n_head_kv * hd;
    ggml_context * ctx = g.ctx;
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, GRAPH_SIZE, false);
    head_inputs & in = g.in;

    in.x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 2 * d, n); // [embedding of the next token, feature] (EAGLE's order)
    in.pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    in.mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, len, n);
    in.k_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n);
    in.v_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n * kv);
    for (ggml_tensor * t : {in.x, in.pos, in.mask, in.k_idx, in.v_idx}) ggml_set_input(t);

    ggml_tensor * x = ggml_add(ctx, ggml_mul_mat(ctx, h->w[FC_W], in.x), h->w[FC_B]);

    // attention, no input norm; rope as GPT-NeoX (rotate halves)
    ggml_tensor * qkv = ggml_mul_mat(ctx, h->w_qkv, x); // [q + 2 kv, n]
    const size_t f = sizeof(float);
    ggml_tensor * q = ggml_view_3d(ctx, qkv, hd, hi.n_head, n, hd * f, qkv->nb[1], 0);
    ggml_tensor * k = ggml_view_3d(ctx, qkv, hd, hi.n_head_kv, n, hd * f, qkv->nb[1], q_size * f);
    ggml_tensor * v = ggml_view_2d(ctx, qkv, kv, n, qkv->nb[1], (q_size + kv) * f);
    if (n > 1) v = ggml_cont(ctx, v); // one column is contiguous as it is
    q = ggml_rope_ext(ctx, q, in.pos, nullptr, (int) hd, GGML_ROPE_TYPE_NEOX, 0, hi.rope_freq_base, 1.0f, 0.0f, 1.0f,
                      0.0f, 0.0f);
    k = ggml_rope_ext(ctx, k, in.pos, nullptr, (int) hd, GGML_ROPE_TYPE_NEOX, 0, hi.rope_freq_base, 1.0f, 0.0f, 1.0f,
                      0.0f, 0.0f);

    // K/V of these rows into the cache, then attention reads the cache through the writes
    // (the views hang off them: computed after them); V is stored transposed, one value per row
    ggml_tensor * k_all = ggml_set_rows(ctx, h->k_cache, ggml_reshape_2d(ctx, k, kv, n), in.k_idx);
    ggml_tensor * v_all = ggml_set_rows(ctx, ggml_reshape_2d(ctx, h->v_cache, 1, ggml_nelements(h->v_cache)),
                                        ggml_reshape_2d(ctx, v, 1, kv * n), in.v_idx);
    ggml_tensor * K = ggml_view_3d(ctx, k_all, hd, hi.n_head_kv, len, hd * f, h->k_cache->nb[1], 0);
    ggml_tensor * V =
        ggml_view_3d(ctx, v_all, len, hd, hi.n_head_kv, h->v_cache->nb[1], hd * h->v_cache->nb[1], 0); // [len, hd, kvh]
    ggml_tensor * kq =
        ggml_mul_mat(ctx, ggml_permute(ctx, K, 0, 2, 1, 3), ggml_permute(ctx, q, 0, 2, 1, 3)); // [len, n, n_head]
    kq = ggml_soft_max_ext(ctx, kq, in.mask, 1.0f / sqrtf((float) hd), 0.0f);
    ggml_tensor * kqv = ggml_mul_mat(ctx, V, kq); // [hd, n, n_head]
    ggml_tensor * attn = ggml_reshape_2d(ctx, ggml_cont(ctx, ggml_permute(ctx, kqv, 0, 2, 1, 3)), hd * hi.n_head, n);
    x = ggml_add(ctx, x, ggml_mul_mat(ctx, h->w[WO], attn));

    // SwiGLU MLP with pre-norm: silu(gate) * up in one op over the fused product
    ggml_tensor * xn = ggml_mul(ctx, ggml_rms_norm(ctx, x, hi.norm_eps), h->w[FFN_NORM]);
    x = ggml_add(ctx, x, ggml_mul_mat(ctx, h->w[W_DOWN], ggml_swiglu(ctx, ggml_mul_mat(ctx, h->w_gate_up, xn))));

    ggml_tensor * last = all_logits ? x : ggml_view_2d(ctx, x, d, 1, x->nb[1], (size_t) (n - 1) * x->nb[1]);
    g.hidden = x;
    g.logits = ggml_mul_mat(ctx, h->lm_rows, last);
    ggml_set_output(g.hidden);
    ggml_set_output(g.logits);
    ggml_build_forward_expand(gf, g.hidden);
    ggml_build_forward_expand(gf, g.logits);
    g.gf = gf;
    g.len = len;
}

// graph inputs for rows [p0, p0 + n) of a graph spanning g.len positions; false on an unknown token
bool set_inputs(specee_head * h, const head_graph & g, const int32_t * tokens, int32_t p0, int32_t n) {
    const int32_t d = h->info.n_embd, kv = h->info.n_head_kv * h->info.head_dim, len = g.len;
    h->x.resize((size_t) n * 2 * d);
    for (int32_t i = 0; i < n; ++i) {
        float * row = h->x.data() + (size_t) i * 2 * d;
        if (!specee_weights_embd_rows(h->target, tokens + p0 + 1 + i, 1, row)) return false;
        memcpy(row + d, h->features.data() + (size_t) (p0 + i) * d, (size_t) d * sizeof(float));
    }
    h->pos.resize(n);
    std::iota(h->pos.begin(), h->pos.end(), p0);
    h->k_idx.assign(h->pos.begin(), h->pos.end());
    h->v_idx.resize((size_t) n * kv);
    for (int32_t i = 0; i < n; ++i) {
        for (int32_t r = 0; r < kv; ++r) h->v_idx[(size_t) i * kv + r] = (int64_t) r * h->n_ctx + p0 + i;
    }
    h->mask.assign((size_t) len * n, 0.0f);
    for (int32_t i = 0; i < n; ++i) { // row i sees positions <= p0 + i
        std::fill(h->mask.begin() + (size_t) i * len + p0 + i + 1, h->mask.begin() + (size_t) (i + 1) * len, -INFINITY);
    }
    ggml_backend_tensor_set(g.in.x, h->x.data(), 0, ggml_nbytes(g.in.x));
    ggml_backend_tensor_set(g.in.pos, h->pos.data(), 0, ggml_nbytes(g.in.pos));
    ggml_backend_tensor_set(g.in.mask, h->mask.data(), 0, ggml_nbytes(g.in.mask));
    ggml_backend_tensor_set(g.in.k_idx, h->k_idx.data(), 0, ggml_nbytes(g.in.k_idx));
    ggml_backend_tensor_set(g.in.v_idx, h->v_idx.data(), 0, ggml_nbytes(g.in.v_idx));
    return true;
}

// The step graph spanning len positions, built and allocated once per length
head_graph * step_graph(specee_head * h, int32_t len) {
    if (h->step.len == len) return &h->step;
    if (h->step.ctx) ggml_free(h->step.ctx);
    h->step = head_graph{};
    h->step.ctx = ggml_init(ggml_init_params{h->step_meta.size(), h->step_meta.data(), /*no_alloc =*/true});
    build_graph(h, 1, len, false, h->step);
    if (!ggml_gallocr_alloc_graph(h->step_galloc, h->step.gf)) {
        h->step.len = 0;
        return nullptr;
    }
    return &h->step;
}

// Runs rows [p0, p0 + n) over the stored features and tokens[p0 + 1 ..]; false on a missing
// feature or allocation failure. Copies hidden states / logits out when asked.
bool run_rows(specee_head * h, const int32_t * tokens, int32_t p0, int32_t n, float * out_hidden, float * out_logits,
              bool all_logits) {
    for (int32_t j = p0; j < p0 + n; ++j) {
        if (!h->have[j]) return false;
    }
    // from here the cache's rows >= p0 change: a failure must not leave them claimed
    if ((int32_t) h->cache_tokens.size() > p0) h->cache_tokens.resize(p0);
    head_graph rows_graph;
    head_graph * g = nullptr;
    if (n == 1 && !all_logits) {
        g = step_graph(h, std::min(h->n_ctx, (p0 + STEP_LEN_ALIGN) / STEP_LEN_ALIGN * STEP_LEN_ALIGN));
    } else {
        rows_graph.ctx = ggml_init(ggml_init_params{h->graph_meta.size(), h->graph_meta.data(), /*no_alloc =*/true});
        build_graph(h, n, p0 + n, all_logits, rows_graph);
        if (ggml_gallocr_alloc_graph(h->galloc, rows_graph.gf)) g = &rows_graph;
    }
    bool ok =
        g && set_inputs(h, *g, tokens, p0, n) && ggml_backend_graph_compute(h->backend, g->gf) == GGML_STATUS_SUCCESS;
    if (ok) {
        if (out_hidden) ggml_backend_tensor_get(g->hidden, out_hidden, 0, ggml_nbytes(g->hidden));
        ggml_backend_tensor_get(g->logits, out_logits ? out_logits : h->logits.data(), 0, ggml_nbytes(g->logits));
        const size_t row_bytes = (size_t) h->info.n_embd * sizeof(float);
        ggml_backend_tensor_get(g->hidden, h->last_hidden.data(), (size_t) (n - 1) * row_bytes, row_bytes);
        h->cache_tokens.insert(h->cache_tokens.end(), tokens + p0 + 1, tokens + p0 + n + 1);
        h->rows_run += n;
    }
    if (rows_graph.ctx) ggml_free(rows_graph.ctx);
    return ok;
}

// Compute memory for the step graph at its longest: decoding then never grows its buffer
void reserve_step_graph(specee_head * h) {
    head_graph g;
    g.ctx = ggml_init(ggml_init_params{h->step_meta.size(), h->step_meta.data(), /*no_alloc =*/true});
    build_graph(h, 1, h->n_ctx, false, g);
    const bool ok = ggml_gallocr_reserve(h->step_galloc, g.gf);
    ggml_free(g.ctx);
    if (!ok) fail("cannot allocate the draft head's compute memory");
}

} // namespace

const char * specee_cpu_extra_buffer_type_name(int32_t i) {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_buffer_type_t * b = cpu ? cpu_extra_buffer_types(cpu) : nullptr;
    for (; b && *b && i > 0; ++b, --i) {}
    return b && *b && i == 0 ? ggml_backend_buft_name(*b) : nullptr;
}

specee_head * specee_head_init_from_file(const char * path, const specee_weights * target, int32_t n_ctx,
                                         int32_t n_threads, bool gpu, char * err, size_t err_size) {
    auto * h = new specee_head();
    h->target = target;
    h->n_ctx = std::max(2, n_ctx);
    try {
        ggml_backend_dev_t dev = gpu ? ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU) : nullptr;
        h->backend = dev ? ggml_backend_dev_init(dev, nullptr) : ggml_backend_cpu_init();
        if (!h->backend) fail("cannot start a ggml backend for the draft head");
        if (!dev) {
            ggml_threadpool_params params = ggml_threadpool_params_default(std::max(1, n_threads));
            params.poll = 0; // sleep between proposals: llama.cpp's own workers need the cores then
            h->threadpool = ggml_threadpool_new(&params);
            if (!h->threadpool) fail("cannot start the draft head's threads");
            ggml_backend_cpu_set_n_threads(h->backend, std::max(1, n_threads));
            ggml_backend_cpu_set_threadpool(h->backend, h->threadpool);
            h->repack = cpu_repack_buffer_type(ggml_backend_get_device(h->backend));
        }
        load_weights(h, path);
        h->galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(h->backend));
        h->step_galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(h->backend));
        if (!h->galloc || !h->step_galloc) fail("cannot create the draft head's graph allocators");
        h->features.assign((size_t) h->n_ctx * h->info.n_embd, 0.0f);
        h->have.assign(h->n_ctx, 0);
        h->logits.resize(h->info.n_draft_vocab);
        h->last_hidden.resize(h->info.n_embd);
        h->graph_meta.resize(ggml_tensor_overhead() * GRAPH_SIZE + ggml_graph_overhead_custom(GRAPH_SIZE, false));
        h->step_meta.resize(h->graph_meta.size());
        reserve_step_graph(h);
        return h;
    } catch (const head_error & e) {
        if (err && err_size > 0) snprintf(err, err_size, "%s", e.msg.c_str());
    } catch (const std::exception & e) {
        if (err && err_size > 0) snprintf(err, err_size, "cannot load the draft head: %s", e.what());
    }
    specee_head_free(h);
    return nullptr;
}

void specee_head_free(specee_head * h) {
    if (!h) return;
    if (h->step.ctx) ggml_free(h->step.ctx);
    if (h->step_galloc) ggml_gallocr_free(h->step_galloc);
    if (h->galloc) ggml_gallocr_free(h->galloc);
    if (h->buf_w) ggml_backend_buffer_free(h->buf_w);
    if (h->ctx_w) ggml_free(h->ctx_w);
    if (h->buf_m) ggml_backend_buffer_free(h->buf_m);
    if (h->ctx_m) ggml_free(h->ctx_m);
    if (h->backend) ggml_backend_free(h->backend);
    if (h->threadpool) ggml_threadpool_free(h->threadpool);
    delete h;
}

specee_head_info specee_head_get_info(const specee_head * h) {
    return h->info;
}

const int32_t * specee_head_vocab(const specee_head * h) {
    return h->vocab.data();
}

const float * specee_head_logits(const specee_head * h) {
    return h->logits.data();
}

void specee_head_reset(specee_head * h) {
    std::fill(h->have.begin(), h->have.end(), 0);
    h->cache_tokens.clear();
}

bool specee_head_set_features(specee_head * h, int32_t pos, int32_t n, const float * hidden) {
    if (pos < 0 || n < 0 || pos + n > h->n_ctx) return false;
    const int32_t d = h->info.n_embd;
    for (int32_t i = 0; i < n; ++i) {
        specee_weights_final_norm(h->target, hidden + (size_t) i * d, h->features.data() + (size_t) (pos + i) * d);
        h->have[pos + i] = 1;
    }
    // cached rows from pos on read old features
    if ((int32_t) h->cache_tokens.size() > pos) h->cache_tokens.resize(pos);
    return true;
}

namespace {

// Brings the cache to rows [0, n_rows) of tokens: rows whose token still matches stay cached (a
// rollback drops the rest); the rest run, the last one always (its logits are the proposal's)
bool sync_rows(specee_head * h, const int32_t * tokens, int32_t n_rows) {
    int32_t keep = 0;
    const int32_t limit = std::min<int32_t>((int32_t) h->cache_tokens.size(), n_rows - 1);
    while (keep < limit && h->cache_tokens[keep] == tokens[keep + 1]) ++keep;
    for (int32_t p0 = keep, rows; p0 < n_rows; p0 += rows) {
        rows = (int32_t) std::max<int64_t>(
            1, std::min<int64_t>(MAX_ROWS, MAX_SCORES / ((int64_t) n_rows * h->info.n_head)));
        rows = std::min(rows, n_rows - p0);
        if (!run_rows(h, tokens, p0, rows, nullptr, nullptr, false)) return false;
    }
    return true;
}

} // namespace

bool specee_head_prefill(specee_head * h, const int32_t * tokens, int32_t n) {
    if (n > h->n_ctx) return false;
    return n < 2 || sync_rows(h, tokens, n - 1);
}

int64_t specee_head_rows_run(const specee_head * h) {
    return h->rows_run;
}

int32_t specee_head_propose(specee_head * h, const int32_t * tokens, int32_t n, int32_t k, int32_t * out) {
    if (n < 2 || n > h->n_ctx || k <= 0 || !sync_rows(h, tokens, n - 1)) return 0;
    // top k by insertion into a sorted prefix of out (k is a handful)
    k = std::min(k, h->info.n_draft_vocab);
    std::vector<float> best(k, -INFINITY);
    std::fill(out, out + k, 0);
    const float * l = h->logits.data();
    for (int32_t i = 0; i < h->info.n_draft_vocab; ++i) {
        if (!(l[i] > best[k - 1])) continue;
        int32_t j = k - 1;
        for (; j > 0 && l[i] > best[j - 1]; --j) {
            best[j] = best[j - 1];
            out[j] = out[j - 1];
        }
        best[j] = l[i];
        out[j] = i;
    }
    for (int32_t i = 0; i < k; ++i) out[i] = h->vocab[out[i]];
    return k;
}

int32_t specee_head_draft(specee_head * h, const int32_t * tokens, int32_t n, int32_t n_draft, int32_t * out,
                          float * probs) {
    if (n < 2 || n_draft < 1 || n + n_draft - 2 > h->n_ctx || !sync_rows(h, tokens, n - 1)) return 0;
    // chain rows read predicted features at positions first.. : the real ones (or none) come back after
    const int32_t d = h->info.n_embd, first = n - 1, n_saved = n_draft - 1;
    const size_t f0 = (size_t) first * d;
    std::vector<float> saved_features(h->features.begin() + f0, h->features.begin() + f0 + (size_t) n_saved * d);
    std::vector<uint8_t> saved_have(h->have.begin() + first, h->have.begin() + first + n_saved);
    std::vector<int32_t> chain(tokens, tokens + n);
    int32_t m = 0;
    for (;;) {
        const float * l = h->logits.data();
        const int32_t best = (int32_t) (std::max_element(l, l + h->info.n_draft_vocab) - l);
        double sum = 0.0;
        for (int32_t i = 0; i < h->info.n_draft_vocab; ++i) sum += std::exp((double) (l[i] - l[best]));
        out[m] = h->vocab[best];
        probs[m] = (float) (1.0 / sum);
        if (++m == n_draft) break;
        // the row just run predicted the feature at the position of the token it read
        const int32_t p = first + m - 1;
        std::copy(h->last_hidden.begin(), h->last_hidden.end(), h->features.begin() + (size_t) p * d);
        h->have[p] = 1;
        chain.push_back(out[m - 1]);
        if (!run_rows(h, chain.data(), p, 1, nullptr, nullptr, false)) break;
    }
    std::copy(saved_features.begin(), saved_features.end(), h->features.begin() + f0);
    std::copy(saved_have.begin(), saved_have.end(), h->have.begin() + first);
    if ((int32_t) h->cache_tokens.size() > first) h->cache_tokens.resize(first);
    return m;
}

bool specee_head_forward(specee_head * h, const int32_t * tokens, int32_t n, float * out_hidden, float * out_logits) {
    if (n < 2 || n > h->n_ctx) return false;
    h->cache_tokens.clear();
    return run_rows(h, tokens, 0, n - 1, out_hidden, out_logits, true);
}

double specee_head_time_lm_head(specee_head * h, int32_t n_runs) {
    std::vector<uint8_t> meta(ggml_tensor_overhead() * 8 + ggml_graph_overhead_custom(8, false));
    ggml_context * ctx = ggml_init(ggml_init_params{meta.size(), meta.data(), /*no_alloc =*/true});
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, 8, false);
    ggml_tensor * x = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, h->info.n_embd);
    ggml_set_input(x);
    ggml_tensor * logits = ggml_mul_mat(ctx, h->lm_rows, x);
    ggml_set_output(logits);
    ggml_build_forward_expand(gf, logits);
    std::vector<double> ms;
    if (ggml_gallocr_alloc_graph(h->galloc, gf)) {
        std::vector<float> ones(h->info.n_embd, 1.0f);
        ggml_backend_tensor_set(x, ones.data(), 0, ggml_nbytes(x));
        // timed as a proposal meets it: after a target step has streamed the model through the
        // caches. Read, not written: dirty lines would charge write-backs that a step's weights
        // (read only) never cause
        std::vector<uint8_t> evict(64 << 20, 1);
        volatile uint8_t sink = 0; // keeps the reads
        for (int32_t i = 0; i < std::max(1, n_runs); ++i) {
            for (size_t b = 0; b < evict.size(); b += 64) sink = (uint8_t) (sink + evict[b]);
            const auto t0 = std::chrono::steady_clock::now();
            ggml_backend_graph_compute(h->backend, gf);
            ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        }
    }
    ggml_free(ctx);
    if (ms.empty()) return -1.0;
    std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
    return ms[ms.size() / 2];
}

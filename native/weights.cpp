// specee_weights: final norm and LM-head rows read from the GGUF file itself.
#include "specee.h"

#include "ggml-cpu.h"
#include "ggml.h"
#include "gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

struct specee_weights {
    std::string arch;
    std::string lm_head_tensor;
    int32_t n_layer = 0;
    int32_t n_embd = 0;
    int32_t n_vocab = 0;
    float norm_eps = 0.0f;
    uint64_t tokenizer_hash = 0;

    std::vector<float> output_norm; // [n_embd]
    ggml_type lm_head_type = GGML_TYPE_F32;
    size_t lm_head_row_bytes = 0;
    const uint8_t * lm_head_data = nullptr; // into the mapping
    ggml_type embd_type = GGML_TYPE_F32;
    size_t embd_row_bytes = 0;
    const uint8_t * embd_data = nullptr; // token_embd.weight, into the mapping

    void * map = MAP_FAILED;
    size_t map_size = 0;
};

namespace {

struct load_error {
    std::string msg;
};

[[noreturn]] void fail(const char * fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    throw load_error{buf};
}

// gguf reports parse errors through ggml's log; collect them for our own message instead
// of letting them reach the terminal as extra lines.
struct log_capture {
    ggml_log_callback prev_cb = nullptr;
    void * prev_data = nullptr;
    std::string text;

    log_capture() {
        ggml_log_get(&prev_cb, &prev_data);
        ggml_log_set(on_log, this);
    }
    ~log_capture() { ggml_log_set(prev_cb, prev_data); }

    static void on_log(ggml_log_level level, const char * msg, void * user_data) {
        auto * self = static_cast<log_capture *>(user_data);
        if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) self->text += msg;
    }

    // the last non-empty line, without the "gguf_init_from_file_impl: " prefix
    std::string last_line() const {
        std::string s = text;
        while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
        s = s.substr(s.find_last_of('\n') == std::string::npos ? 0 : s.find_last_of('\n') + 1);
        const size_t colon = s.find(": ");
        return colon == std::string::npos ? s : s.substr(colon + 2);
    }
};

void to_float(ggml_type type, const void * src, float * dst, int64_t n) {
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    ggml_get_type_traits(type)->to_float(src, dst, n);
}

bool can_dequantize(ggml_type type) {
    return type == GGML_TYPE_F32 || ggml_get_type_traits(type)->to_float != nullptr;
}

int64_t find_key(const gguf_context * g, const std::string & key, gguf_type type) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id >= 0 && gguf_get_kv_type(g, id) != type) fail("metadata key %s has an unexpected type", key.c_str());
    return id;
}

void check_magic(const char * path) {
    FILE * f = fopen(path, "rb");
    if (!f) fail("cannot open: %s", strerror(errno));
    char magic[4] = {0, 0, 0, 0};
    const size_t n = fread(magic, 1, 4, f);
    fclose(f);
    if (n < 4 || memcmp(magic, GGUF_MAGIC, 4) != 0) fail("not a GGUF file (no GGUF magic at its start)");
}

void read_metadata(specee_weights * w, const gguf_context * g) {
    int64_t id = find_key(g, "general.architecture", GGUF_TYPE_STRING);
    if (id < 0) fail("no general.architecture in the GGUF metadata");
    w->arch = gguf_get_val_str(g, id);

    id = find_key(g, w->arch + ".block_count", GGUF_TYPE_UINT32);
    if (id < 0) fail("no %s.block_count in the GGUF metadata", w->arch.c_str());
    w->n_layer = (int32_t) gguf_get_val_u32(g, id);

    id = find_key(g, w->arch + ".attention.layer_norm_rms_epsilon", GGUF_TYPE_FLOAT32);
    if (id < 0) fail("no %s.attention.layer_norm_rms_epsilon: not an RMSNorm model", w->arch.c_str());
    w->norm_eps = gguf_get_val_f32(g, id);

    id = gguf_find_key(g, "tokenizer.ggml.tokens");
    if (id >= 0 && gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY && gguf_get_arr_type(g, id) == GGUF_TYPE_STRING) {
        uint64_t hash = 1469598103934665603ull;
        for (size_t i = 0; i < gguf_get_arr_n(g, id); ++i) {
            for (const char * c = gguf_get_arr_str(g, id, i);; ++c) { // the terminating NUL separates tokens
                hash = (hash ^ (uint8_t) *c) * 1099511628211ull;
                if (*c == '\0') break;
            }
        }
        w->tokenizer_hash = hash;
    }
}

// every tensor's data must lie inside the file: a cut-off download fails here, not later
void check_tensor_bounds(const gguf_context * g, size_t file_size) {
    const size_t data_offset = gguf_get_data_offset(g);
    for (int64_t i = 0; i < gguf_get_n_tensors(g); ++i) {
        const size_t end = data_offset + gguf_get_tensor_offset(g, i) + gguf_get_tensor_size(g, i);
        if (end > file_size) {
            fail("truncated GGUF file: tensor %s ends at byte %zu but the file has %zu bytes",
                 gguf_get_tensor_name(g, i), end, file_size);
        }
    }
}

void map_file(specee_weights * w, const char * path) {
    const int fd = open(path, O_RDONLY);
    if (fd < 0) fail("cannot open: %s", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        fail("cannot stat: %s", strerror(errno));
    }
    w->map_size = (size_t) st.st_size;
    w->map = mmap(nullptr, w->map_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (w->map == MAP_FAILED) fail("cannot map the file: %s", strerror(errno));
}

void read_output_norm(specee_weights * w, const gguf_context * g, const ggml_context * meta, const uint8_t * data) {
    const int64_t id = gguf_find_tensor(g, "output_norm.weight");
    if (id < 0) fail("no output_norm.weight tensor");
    const ggml_tensor * t = ggml_get_tensor(const_cast<ggml_context *>(meta), "output_norm.weight");
    if (!can_dequantize(t->type)) fail("output_norm.weight has type %s, which cannot be read", ggml_type_name(t->type));
    w->n_embd = (int32_t) t->ne[0];
    w->output_norm.resize(w->n_embd);
    to_float(t->type, data + gguf_get_tensor_offset(g, id), w->output_norm.data(), w->n_embd);
}

// LM head: output.weight, or the token embedding when the model ties them
void find_lm_head(specee_weights * w, const gguf_context * g, const ggml_context * meta, const uint8_t * data) {
    w->lm_head_tensor = "output.weight";
    int64_t id = gguf_find_tensor(g, w->lm_head_tensor.c_str());
    if (id < 0) {
        w->lm_head_tensor = "token_embd.weight";
        id = gguf_find_tensor(g, w->lm_head_tensor.c_str());
    }
    if (id < 0) fail("no LM head (neither output.weight nor token_embd.weight)");
    const ggml_tensor * t = ggml_get_tensor(const_cast<ggml_context *>(meta), w->lm_head_tensor.c_str());
    if (t->ne[0] != w->n_embd)
        fail("%s has rows of %lld values, expected n_embd = %d", w->lm_head_tensor.c_str(), (long long) t->ne[0],
             w->n_embd);
    if (!can_dequantize(t->type))
        fail("%s has type %s, which cannot be dequantized", w->lm_head_tensor.c_str(), ggml_type_name(t->type));
    w->lm_head_type = t->type;
    w->n_vocab = (int32_t) t->ne[1];
    w->lm_head_row_bytes = ggml_row_size(t->type, w->n_embd);
    w->lm_head_data = data + gguf_get_tensor_offset(g, id);
}

void find_token_embd(specee_weights * w, const gguf_context * g, const ggml_context * meta, const uint8_t * data) {
    const int64_t id = gguf_find_tensor(g, "token_embd.weight");
    if (id < 0) fail("no token_embd.weight tensor");
    const ggml_tensor * t = ggml_get_tensor(const_cast<ggml_context *>(meta), "token_embd.weight");
    if (t->ne[0] != w->n_embd || t->ne[1] != w->n_vocab) fail("token_embd.weight is not [n_vocab, n_embd]");
    if (!can_dequantize(t->type))
        fail("token_embd.weight has type %s, which cannot be dequantized", ggml_type_name(t->type));
    w->embd_type = t->type;
    w->embd_row_bytes = ggml_row_size(t->type, w->n_embd);
    w->embd_data = data + gguf_get_tensor_offset(g, id);
}

void load(specee_weights * w, const char * path) {
    check_magic(path);
    ggml_cpu_init(); // the CPU dot products below need ggml's conversion tables

    ggml_context * meta = nullptr;
    gguf_context * g = nullptr;
    {
        log_capture log;
        g = gguf_init_from_file(path, gguf_init_params{/*no_alloc =*/true, /*ctx =*/&meta});
        if (!g) fail("corrupt or truncated GGUF file (%s)", log.last_line().c_str());
    }
    try {
        map_file(w, path);
        check_tensor_bounds(g, w->map_size);
        read_metadata(w, g);
        const uint8_t * data = static_cast<const uint8_t *>(w->map) + gguf_get_data_offset(g);
        read_output_norm(w, g, meta, data);
        find_lm_head(w, g, meta, data);
        find_token_embd(w, g, meta, data);
    } catch (...) {
        gguf_free(g);
        ggml_free(meta);
        throw;
    }
    gguf_free(g);
    ggml_free(meta);
}

} // namespace

specee_weights * specee_weights_init_from_file(const char * path, char * err, size_t err_size) {
    auto * w = new specee_weights();
    try {
        load(w, path);
        return w;
    } catch (const load_error & e) {
        if (err && err_size > 0) snprintf(err, err_size, "%s", e.msg.c_str());
    }
    specee_weights_free(w);
    return nullptr;
}

void specee_weights_free(specee_weights * w) {
    if (!w) return;
    if (w->map != MAP_FAILED) munmap(w->map, w->map_size);
    delete w;
}

specee_weights_info specee_weights_get_info(const specee_weights * w) {
    return specee_weights_info{
        w->arch.c_str(), w->lm_head_tensor.c_str(), ggml_type_name(w->lm_head_type), w->n_layer, w->n_embd, w->n_vocab,
        w->norm_eps,     w->tokenizer_hash,
    };
}

const float * specee_weights_output_norm(const specee_weights * w) {
    return w->output_norm.data();
}

static bool ids_in_vocab(const specee_weights * w, const int32_t * ids, int32_t n) {
    for (int32_t i = 0; i < n; ++i) {
        if (ids[i] < 0 || ids[i] >= w->n_vocab) return false;
    }
    return true;
}

// rows ids[0..n) of a [n_vocab, n_embd] tensor in the mapping, dequantized
static bool rows_to_float(const specee_weights * w, ggml_type type, const uint8_t * data, size_t row_bytes,
                          const int32_t * ids, int32_t n, float * out) {
    if (!ids_in_vocab(w, ids, n)) return false;
    for (int32_t i = 0; i < n; ++i) {
        to_float(type, data + (size_t) ids[i] * row_bytes, out + (size_t) i * w->n_embd, w->n_embd);
    }
    return true;
}

bool specee_weights_lm_head_rows(const specee_weights * w, const int32_t * ids, int32_t n, float * out) {
    return rows_to_float(w, w->lm_head_type, w->lm_head_data, w->lm_head_row_bytes, ids, n, out);
}

bool specee_weights_embd_rows(const specee_weights * w, const int32_t * ids, int32_t n, float * out) {
    return rows_to_float(w, w->embd_type, w->embd_data, w->embd_row_bytes, ids, n, out);
}

bool specee_weights_lm_head_rows_raw(const specee_weights * w, const int32_t * ids, int32_t n, void * out) {
    if (!ids_in_vocab(w, ids, n)) return false;
    for (int32_t i = 0; i < n; ++i) {
        memcpy((uint8_t *) out + (size_t) i * w->lm_head_row_bytes,
               w->lm_head_data + (size_t) ids[i] * w->lm_head_row_bytes, w->lm_head_row_bytes);
    }
    return true;
}

int32_t specee_weights_lm_head_ggml_type(const specee_weights * w) {
    return (int32_t) w->lm_head_type;
}

void specee_weights_final_norm(const specee_weights * w, const float * x, float * y) {
    // accumulate in double: the sum of squares over thousands of values loses bits in float
    double sum_sq = 0.0;
    for (int32_t i = 0; i < w->n_embd; ++i) sum_sq += (double) x[i] * x[i];
    const float scale = 1.0f / sqrtf((float) (sum_sq / w->n_embd) + w->norm_eps);
    for (int32_t i = 0; i < w->n_embd; ++i) y[i] = x[i] * scale * w->output_norm[i];
}

void specee_weights_lm_head_logits(const specee_weights * w, const float * z, float * out, int32_t n_threads) {
    const ggml_type_traits_cpu * cpu = ggml_get_type_traits_cpu(w->lm_head_type);
    // z in the dot-product type of the rows, as llama.cpp's matmul quantizes its activations
    std::vector<uint8_t> zq(ggml_row_size(cpu->vec_dot_type, w->n_embd));
    if (cpu->vec_dot_type == GGML_TYPE_F32) {
        memcpy(zq.data(), z, w->n_embd * sizeof(float));
    } else {
        ggml_get_type_traits_cpu(cpu->vec_dot_type)->from_float(z, zq.data(), w->n_embd);
    }
    auto rows = [&](int32_t begin, int32_t end) {
        for (int32_t r = begin; r < end; ++r) {
            cpu->vec_dot(w->n_embd, out + r, 0, w->lm_head_data + (size_t) r * w->lm_head_row_bytes, 0, zq.data(), 0,
                         1);
        }
    };
    n_threads = std::max(1, n_threads);
    const int32_t chunk = (w->n_vocab + n_threads - 1) / n_threads;
    std::vector<std::thread> workers;
    for (int32_t t = 1; t < n_threads; ++t) {
        workers.emplace_back(rows, std::min(w->n_vocab, t * chunk), std::min(w->n_vocab, (t + 1) * chunk));
    }
    rows(0, std::min(w->n_vocab, chunk));
    for (auto & worker : workers) worker.join();
}

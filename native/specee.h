// specee.h: the C API of specee-pc's native core.
//
// Two objects, each with an init/free pair:
//   specee_weights  what the exit decision needs from a GGUF model file (metadata, final
//                   norm, LM-head rows), read from the file itself: llama.cpp has no public
//                   accessor for weights.
//   specee_hook     the state behind a native ggml eval callback installed on a llama.cpp
//                   context; it copies the hidden state (`l_out-<i>`, last token of the
//                   ubatch) of selected layers during llama_decode.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor;

// ---------------------------------------------------------------- GGUF weights

struct specee_weights;

struct specee_weights_info {
    const char * arch;           // general.architecture, e.g. "llama"
    const char * lm_head_tensor; // "output.weight", or "token_embd.weight" when tied
    const char * lm_head_type;   // ggml type name, e.g. "q4_1"
    int32_t      n_layer;
    int32_t      n_embd;
    int32_t      n_vocab;
    float        norm_eps;       // <arch>.attention.layer_norm_rms_epsilon
};

// Opens and validates a GGUF file (magic, header, tensor data inside the file).
// Returns NULL and a one-line reason in err on failure.
struct specee_weights * specee_weights_init_from_file(const char * path, char * err, size_t err_size);
void                    specee_weights_free(struct specee_weights * w);

struct specee_weights_info specee_weights_get_info(const struct specee_weights * w);

// output_norm.weight, n_embd floats owned by w
const float * specee_weights_output_norm(const struct specee_weights * w);

// Dequantizes LM-head rows ids[0..n) into out[n][n_embd]. False if an id is out of range.
bool specee_weights_lm_head_rows(const struct specee_weights * w, const int32_t * ids, int32_t n, float * out);

// y = RMSNorm(x) * output_norm.weight, as the model's final norm computes it
void specee_weights_final_norm(const struct specee_weights * w, const float * x, float * y);

// ---------------------------------------------------------------- eval-callback hook

struct specee_hook;

struct specee_hook * specee_hook_init(int32_t n_layer, int32_t n_embd);
void                 specee_hook_free(struct specee_hook * h);

// The ggml_backend_sched_eval_callback to put in llama_context_params.cb_eval, with h as
// cb_eval_user_data. llama.cpp binds it when it builds a graph, so behaviour is switched
// through h, never by changing the pointer.
bool specee_hook_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);

// Selects the layers whose hidden state is copied (replaces the previous selection).
void specee_hook_set_capture(struct specee_hook * h, const int32_t * layers, int32_t n);

// Forgets what the previous decode step captured and saw; call before llama_decode.
void specee_hook_begin_step(struct specee_hook * h);

// Copies the last decode step's hidden state of layer il into out[n_embd].
// False if that layer was not captured in the step.
bool specee_hook_get_hidden(const struct specee_hook * h, int32_t il, float * out);

// Whether the graph of the last step had a node named l_out-<il>.
bool specee_hook_saw_layer(const struct specee_hook * h, int32_t il);

#ifdef __cplusplus
}
#endif

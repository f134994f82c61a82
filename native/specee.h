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
    int32_t n_layer;
    int32_t n_embd;
    int32_t n_vocab;
    float norm_eps;          // <arch>.attention.layer_norm_rms_epsilon
    uint64_t tokenizer_hash; // FNV-1a of tokenizer.ggml.tokens (0 if absent): ties files to a vocabulary
};

// Opens and validates a GGUF file (magic, header, tensor data inside the file).
// Returns NULL and a one-line reason in err on failure.
struct specee_weights * specee_weights_init_from_file(const char * path, char * err, size_t err_size);
void specee_weights_free(struct specee_weights * w);

struct specee_weights_info specee_weights_get_info(const struct specee_weights * w);

// output_norm.weight, n_embd floats owned by w
const float * specee_weights_output_norm(const struct specee_weights * w);

// Dequantizes LM-head rows ids[0..n) into out[n][n_embd]. False if an id is out of range.
bool specee_weights_lm_head_rows(const struct specee_weights * w, const int32_t * ids, int32_t n, float * out);

// Dequantizes token-embedding rows ids[0..n) into out[n][n_embd]. False if an id is out of range.
bool specee_weights_embd_rows(const struct specee_weights * w, const int32_t * ids, int32_t n, float * out);

// Copies LM-head rows ids[0..n) as stored (ggml type specee_weights_lm_head_ggml_type, rows of
// ggml_row_size(type, n_embd) bytes) into out: a reduced LM head as exact as the model's own.
bool specee_weights_lm_head_rows_raw(const struct specee_weights * w, const int32_t * ids, int32_t n, void * out);
int32_t specee_weights_lm_head_ggml_type(const struct specee_weights * w);

// y = RMSNorm(x) * output_norm.weight, as the model's final norm computes it
void specee_weights_final_norm(const struct specee_weights * w, const float * x, float * y);

// Full LM head on a normed hidden state: out[n_vocab] = W_out z, with ggml's CPU dot products
// on the quantized rows (z is quantized to the row type's dot-product type, as llama.cpp does).
void specee_weights_lm_head_logits(const struct specee_weights * w, const float * z, float * out, int32_t n_threads);

// ---------------------------------------------------------------- exit controller
//
// The SpecEE decision after a scheduled layer l, for k candidate token ids C:
//   z = final_norm(h_l);  lc = W_out[C] z;  p = softmax(lc);  d = p - p_prev
//   (p_prev from the previously checked layer of this step; d = p at the first);
//   score = sigmoid(fc2 relu(fc1 [lc, p, d] + b1) + b2), one MLP per layer.
// If score > threshold (or threshold_unmatched, if lower), the rule picks the exit token:
//   SPECEE_RULE_VERIFY      full LM head on z; exit only if its argmax is in C (SpecEE).
//   SPECEE_RULE_CANDIDATES  exit with the candidates' logits only (no full LM head).
// and the score must pass that token's own bar: threshold for a candidate flagged as a
// prompt-lookup match (set_candidates; without flags, all are), threshold_unmatched otherwise
// (verify skips its full LM head when the score passes no candidate's bar).
// A forced layer (debug) always exits there, with full LM-head logits.

enum specee_exit_rule {
    SPECEE_RULE_VERIFY = 0,
    SPECEE_RULE_CANDIDATES = 1,
};

struct specee_exit;

struct specee_exit_step {
    int32_t exit_layer;  // -1: the step ran every layer
    int32_t exit_token;  // argmax of the exit logits, -1 without exit
    int32_t n_checks;    // scheduled layers evaluated
    int32_t n_lm_heads;  // full LM heads computed (verify rule, forced exits)
    float last_score;    // predictor output at the last checked layer
    double predictor_us; // features + MLP time
    double lm_head_us;   // full LM head time
};

struct specee_exit * specee_exit_init(const struct specee_weights * w, int32_t n_threads);
void specee_exit_free(struct specee_exit * e);

// Layer il's predictor: fc1_w[n_hidden][n_features], fc1_b[n_hidden], fc2_w[n_hidden], fc2_b.
// n_features must be 3k for the k candidates. False on bad sizes.
bool specee_exit_set_predictor(struct specee_exit * e, int32_t il, int32_t n_hidden, int32_t n_features,
                               const float * fc1_w, const float * fc1_b, const float * fc2_w, float fc2_b);
// threshold_unmatched: the bar for exiting on a candidate not flagged matched (set_candidates);
// equal to threshold, the flags do not matter.
void specee_exit_set_rule(struct specee_exit * e, enum specee_exit_rule rule, float threshold,
                          float threshold_unmatched);
// Layer il's predictor score for a feature row x[3k]; -1 without a predictor there.
float specee_exit_score(const struct specee_exit * e, int32_t il, const float * x);

// Per step: the layers to check and the candidates (their LM-head rows are dequantized here).
// Candidates are checked against the vocabulary; false if an id is out of range.
void specee_exit_set_schedule(struct specee_exit * e, const int32_t * layers, int32_t n);
void specee_exit_set_forced(struct specee_exit * e, const int32_t * layers, int32_t n);
// matched[k] (NULL: all): whether prompt lookup found each candidate in the context.
bool specee_exit_set_candidates(struct specee_exit * e, const int32_t * ids, const uint8_t * matched, int32_t k);

// Whether the step may stop after layer il (scheduled with a predictor and candidates, or forced).
bool specee_exit_wants_layer(const struct specee_exit * e, int32_t il);
void specee_exit_begin_step(struct specee_exit * e);
// Runs the decision on layer il's last-token hidden state; true: stop the graph here.
bool specee_exit_check_layer(struct specee_exit * e, int32_t il, const float * hidden);

struct specee_exit_step specee_exit_get_step(const struct specee_exit * e);
// The exit layer's logits (n_vocab; -INFINITY outside C for the candidates rule), or NULL.
const float * specee_exit_get_logits(const struct specee_exit * e);

// ---------------------------------------------------------------- draft head (EAGLE-1)
//
// Candidates from one decoder layer trained on the target's hidden states. Row j reads the
// feature f_j = final_norm(target hidden state at position j) and the embedding of token j+1,
// and predicts f_{j+1}; its logits over a draft vocabulary (a subset of the target's, with
// the target's own LM-head rows) rank the candidates for token j+2:
//   x = fc [embd(t_{j+1}), f_j] + b;  x += attn(x) (RoPE, causal, own KV cache);
//   x += down(silu(gate(n)) * up(n)), n = ffn_norm(x);  logits = W_out[vocab] x

struct specee_head;

struct specee_head_info {
    int32_t n_embd, n_head, n_head_kv, head_dim, n_ff, n_draft_vocab;
    float rope_freq_base, norm_eps;
    int32_t n_repacked; // matrices (of 6) held in the CPU backend's repacking buffer type
};

// Loads the head tensors (head.*) and metadata (specee.head.*) of a predictor GGUF for target
// w (which must outlive it), with room for n_ctx positions; on the first GPU device when gpu
// and llama.cpp was built with one, else on the CPU with n_threads.
struct specee_head * specee_head_init_from_file(const char * path, const struct specee_weights * w, int32_t n_ctx,
                                                int32_t n_threads, bool gpu, char * err, size_t err_size);
void specee_head_free(struct specee_head * h);

struct specee_head_info specee_head_get_info(const struct specee_head * h);
const int32_t * specee_head_vocab(const struct specee_head * h); // [n_draft_vocab] target ids
const float * specee_head_logits(const struct specee_head * h);  // [n_draft_vocab] of the last proposal

// Forgets every stored feature and cached row (the target's cache was replaced, e.g. by a saved state).
void specee_head_reset(struct specee_head * h);

// Stores the target's residual stream (before its final norm) at positions pos..pos+n-1: after
// its last layer, or after the exit layer when a step exited. Cached rows from pos on are dropped.
bool specee_head_set_features(struct specee_head * h, int32_t pos, int32_t n, const float * hidden);

// For the context tokens[0..n), n >= 2: brings the head's cache to it (rows whose token still
// matches are kept, the rest run again) and writes the top k target ids for the token after
// tokens[n-1] into out. Returns how many were written: 0 when a feature is missing.
int32_t specee_head_propose(struct specee_head * h, const int32_t * tokens, int32_t n, int32_t k, int32_t * out);

// A chain of n_draft greedy drafts after tokens[0..n), n >= 2 (EAGLE-1): the top-1 token of the
// last row, then rows that read the head's own predicted feature (its hidden state, which
// predicts the target's normed one) and the draft before, each proposing the next. Writes the
// target ids to out and their probabilities (softmax over the draft vocabulary) to probs.
// The chain's rows are not kept: the target's real features replace theirs. Returns how many
// were written: 0 when a feature is missing.
int32_t specee_head_draft(struct specee_head * h, const int32_t * tokens, int32_t n, int32_t n_draft, int32_t * out,
                          float * probs);

// After a prompt: runs the rows its tokens determine (rows 0..n-2 of tokens[0..n); row n-1 reads
// the token decoding emits next), so the proposal after it runs one row. Returns false when a
// feature is missing.
bool specee_head_prefill(struct specee_head * h, const int32_t * tokens, int32_t n);

// Rows the head has computed since it was created.
int64_t specee_head_rows_run(const struct specee_head * h);

// Testing: runs rows 0..n-2 afresh and writes their hidden states [n-1][n_embd] and logits
// [n-1][n_draft_vocab].
bool specee_head_forward(struct specee_head * h, const int32_t * tokens, int32_t n, float * out_hidden,
                         float * out_logits);

// Median ms of the head's LM head (draft-vocabulary rows) alone over n_runs, each after reading
// 64 MiB of other memory (as a target step streams its weights): its share of a proposal, for
// the benchmark's cost budget. -1 on failure.
double specee_head_time_lm_head(struct specee_head * h, int32_t n_runs);

// ---------------------------------------------------------------- CPU backend

// Name of the CPU backend's i-th extra buffer type (where llama.cpp stores weights repacked for
// faster kernels: "CPU_REPACK", "AMX", ...), or NULL past the last.
const char * specee_cpu_extra_buffer_type_name(int32_t i);

// ---------------------------------------------------------------- prompt lookup

// Up to k distinct tokens that followed earlier occurrences of the last n-gram of tokens[0..n)
// (within its last `window` tokens): longer n-grams first (max_ngram down to 1), more recent
// occurrences first. Writes them to out and returns how many.
int32_t specee_lookup_matches(const int32_t * tokens, int32_t n, int32_t k, int32_t max_ngram, int32_t window,
                              int32_t * out);

// Prompt lookup's chain: the tokens that followed the most recent earlier occurrence of the
// longest n-gram (max_ngram down to min_ngram) that ends tokens[0..n), within its last `window`
// tokens, up to max_len of them. Writes them to out, the n-gram's length to match_len (0: no
// match) and returns how many.
int32_t specee_lookup_continuation(const int32_t * tokens, int32_t n, int32_t min_ngram, int32_t max_ngram,
                                   int32_t window, int32_t max_len, int32_t * out, int32_t * match_len);

// The head+lookup drafter in one call: the head's top `lead` (specee_head_propose), then the
// lookup matches, then the head's next, without repeats, k in all. Native because it runs
// before every step, on caches the target step has just flushed (in Python it cost 0.03-0.05
// ms more). Returns how many were written: fewer than k only when the head proposed fewer.
// matched (NULL: not wanted; else room for k) gets, per candidate written, whether lookup found
// it (the exit controller's flags, without a second lookup); all 0 when the head proposed fewer
// than k (lookup does not run then).
int32_t specee_head_lookup_propose(struct specee_head * h, const int32_t * tokens, int32_t n, int32_t k, int32_t lead,
                                   int32_t max_ngram, int32_t window, int32_t * out, uint8_t * matched);

// ---------------------------------------------------------------- eval-callback hook

struct specee_hook;

struct specee_hook * specee_hook_init(int32_t n_layer, int32_t n_embd);
void specee_hook_free(struct specee_hook * h);

// The ggml_backend_sched_eval_callback to put in llama_context_params.cb_eval, with h as
// cb_eval_user_data. llama.cpp binds it when it builds a graph, so behaviour is switched
// through h, never by changing the pointer.
bool specee_hook_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);

// Selects the layers whose hidden state is copied (replaces the previous selection).
void specee_hook_set_capture(struct specee_hook * h, const int32_t * layers, int32_t n);

// Keeps every output row of layer il (-1: none) in the next steps: a batch's rows, in order
// across its ubatches, for the tokens whose output was requested (the last layer computes
// only those). What a drafter fed with the target's hidden states reads.
void specee_hook_set_row_capture(struct specee_hook * h, int32_t il);
int32_t specee_hook_n_rows(const struct specee_hook * h);
const float * specee_hook_rows(const struct specee_hook * h); // [n_rows][n_embd], valid until the next step

// Forgets what the previous decode step captured and saw; call before llama_decode.
// pos: position of the batch's last token (the one a cut leaves behind as a KV hole).
void specee_hook_begin_step(struct specee_hook * h, int32_t pos);

// Copies the last decode step's hidden state of layer il into out[n_embd].
// False if that layer was not captured in the step.
bool specee_hook_get_hidden(const struct specee_hook * h, int32_t il, float * out);

// Attaches an exit controller (NULL detaches) and arms it for the next steps or not. While
// armed, the hook cuts the graph after the layer where the controller decides to exit: it
// refuses the observation there, and every node of later graph splits too.
void specee_hook_set_exit(struct specee_hook * h, struct specee_exit * e, bool armed);

// KV holes ("mask" policy). A token that exited after layer e never wrote K/V in layers > e.
// With masking on, each cut records a hole (position, KV cell, e), and in every later step the
// hook hides the hole's cell from layers > e: between layers, it writes -inf into the KQ mask
// input (one tensor feeds all layers; it is rewritten at every graph compute).
void specee_hook_set_masking(struct specee_hook * h, bool on);
// Forgets holes at positions >= n_pos (those positions left the KV cache).
void specee_hook_prune_holes(struct specee_hook * h, int32_t n_pos);
int32_t specee_hook_n_holes(const struct specee_hook * h);

// Whether the graph of the last step had a node named l_out-<il>.
bool specee_hook_saw_layer(const struct specee_hook * h, int32_t il);

#ifdef __cplusplus
}
#endif

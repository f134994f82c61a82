// Prompt lookup: the tokens that followed earlier occurrences of the context's last n-gram.
// Native because the drafters call it before every decoding step, when the step before has
// just evicted Python's and numpy's working set: a dozen numpy calls took ~0.2 ms there.
#include "specee.h"

#include <algorithm>
#include <vector>

// length of the match between the tokens ending at j and those ending at n-1, up to max_ngram
static int32_t match_length(const int32_t * tail, int32_t n, int32_t j, int32_t max_ngram) {
    int32_t len = 0;
    while (len < max_ngram && j - len >= 0 && tail[j - len] == tail[n - 1 - len]) ++len;
    return len;
}

int32_t specee_lookup_matches(const int32_t * tokens, int32_t n, int32_t k, int32_t max_ngram, int32_t window,
                              int32_t * out) {
    if (n < 2 || k < 1 || max_ngram < 1 || window < 2) return 0;
    // search the last `window` tokens only
    const int32_t * tail = tokens + std::max(0, n - window);
    n = std::min(n, window);
    int32_t found = 0;
    // longer matches first, each length from the most recent occurrence back
    for (int32_t len = max_ngram; len >= 1 && found < k; --len) {
        for (int32_t j = n - 2; j >= 0 && found < k; --j) {
            if (tail[j] != tail[n - 1] || match_length(tail, n, j, max_ngram) != len) continue;
            const int32_t follower = tail[j + 1];
            if (std::find(out, out + found, follower) == out + found) out[found++] = follower;
        }
    }
    return found;
}

int32_t specee_lookup_continuation(const int32_t * tokens, int32_t n, int32_t min_ngram, int32_t max_ngram,
                                   int32_t window, int32_t max_len, int32_t * out, int32_t * match_len) {
    *match_len = 0;
    if (n < 2 || min_ngram < 1 || max_ngram < min_ngram || window < 2 || max_len < 1) return 0;
    const int32_t * tail = tokens + std::max(0, n - window);
    n = std::min(n, window);
    // the most recent occurrence of the longest suffix: one pass, keeping the best match
    int32_t best_len = 0, best_j = -1;
    for (int32_t j = n - 2; j >= 0 && best_len < max_ngram; --j) {
        const int32_t len = match_length(tail, n, j, max_ngram);
        if (len > best_len) {
            best_len = len;
            best_j = j;
        }
    }
    if (best_len < min_ngram) return 0;
    *match_len = best_len;
    int32_t m = 0;
    for (int32_t i = best_j + 1; i < n && m < max_len; ++i) out[m++] = tail[i];
    return m;
}

int32_t specee_head_lookup_propose(struct specee_head * h, const int32_t * tokens, int32_t n, int32_t k, int32_t lead,
                                   int32_t max_ngram, int32_t window, int32_t * out, uint8_t * matched) {
    if (k <= 0) return 0;
    std::vector<int32_t> head(k), found(k);
    const int32_t n_head = specee_head_propose(h, tokens, n, k, head.data());
    if (n_head < k) { // nothing to draft from (or a vocabulary smaller than k): the head's alone
        std::copy(head.begin(), head.begin() + n_head, out);
        if (matched) std::fill(matched, matched + n_head, 0);
        return n_head;
    }
    const int32_t n_found = specee_lookup_matches(tokens, n, k, max_ngram, window, found.data());
    int32_t m = 0;
    auto add = [&](int32_t token) {
        if (m < k && std::find(out, out + m, token) == out + m) out[m++] = token;
    };
    const int32_t n_lead = std::clamp(lead, 0, n_head);
    for (int32_t i = 0; i < n_lead; ++i) add(head[i]);
    for (int32_t i = 0; i < n_found; ++i) add(found[i]);
    for (int32_t i = n_lead; i < n_head; ++i) add(head[i]);
    // a head candidate lookup also found counts as found
    for (int32_t i = 0; matched && i < m; ++i) {
        matched[i] = std::find(found.begin(), found.begin() + n_found, out[i]) != found.begin() + n_found;
    }
    return m;
}

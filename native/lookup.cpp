// Prompt lookup: the tokens that followed earlier occurrences of the context's last n-gram.
// Native because the drafters call it before every decoding step, when the step before has
// just evicted Python's and numpy's working set: a dozen numpy calls took ~0.2 ms there.
#include "specee.h"

#include <algorithm>

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

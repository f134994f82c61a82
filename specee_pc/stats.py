"""Statistics that a generation returns alongside its tokens."""
from dataclasses import dataclass, field
from typing import List


@dataclass
class GenerationStats:
    """Timing of one generate() call, measured as the caller sees it (sampling included)."""

    prompt_tokens: int = 0
    token_times: List[float] = field(default_factory=list)  # seconds since start, per token

    @property
    def generated_tokens(self) -> int:
        return len(self.token_times)

    @property
    def prompt_seconds(self) -> float:
        """Time to the first token: prompt processing plus one sample."""
        return self.token_times[0] if self.token_times else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, over the time they took (0 when there are fewer than two)."""
        if len(self.token_times) < 2:
            return 0.0
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])

    def summary(self) -> str:
        return (f"{self.generated_tokens} tokens, {self.decode_tokens_per_second:.1f} tok/s"
                f" (prompt: {self.prompt_tokens} tokens in {self.prompt_seconds:.2f} s)")

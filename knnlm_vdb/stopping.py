"""When generation ends: stop sequences and cancellation, as ``transformers`` stopping criteria."""
from __future__ import annotations

from transformers import StoppingCriteria


class StopSequences(StoppingCriteria):
    """Ends a row once its generated text contains one of ``stops``; ``trim`` cuts the output there."""

    def __init__(self, tokenizer, stops: list[str], prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, [s for s in stops if s], prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.stops:
            for b in range(input_ids.shape[0]):
                text = self.tokenizer.decode(input_ids[b, self.width:].tolist())
                done[b] = any(s in text for s in self.stops)
        return done

    def trim(self, tokens: list[int], steps: list, eos: int | None):
        """-> (tokens, steps, the stop sequence found or None): up to the first end of sequence, and
        up to the token that completed the first stop sequence."""
        if eos is not None and eos in tokens:
            end = tokens.index(eos) + 1
            tokens, steps = tokens[:end], steps[:end]
        for n in range(1, len(tokens) + 1):
            text = self.tokenizer.decode(tokens[:n])
            hit = next((s for s in self.stops if s in text), None)
            if hit is not None:
                return tokens[:n], steps[:n], hit
        return tokens, steps, None


class Cancelled(StoppingCriteria):
    """Ends every row once ``event`` is set (a client went away, a deadline passed)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

"""The naive reference decoders: one image at a time, the whole sequence re-run at every step (no KV cache),
as the original ClipCap decodes. They are the correctness reference of ``tests/test_captioner.py`` and the
speed reference of ``benchmarks/bench_captioner.py``, never a production path, so they live here rather than
in the library.

Shapes: P prefix length, L new tokens, D LM width, V vocabulary.
"""

from __future__ import annotations

import torch

from clipcap.lm import PrefixLM


@torch.no_grad()
def naive_greedy(
    lm: PrefixLM, prefix: torch.Tensor, max_new_tokens: int, stop_ids: list[int]
) -> list[list[int]]:
    """Greedy decoding one image at a time, re-running the whole sequence each step (no KV cache).

    Args:
        lm: the language model.
        prefix: (B, P, D) prefix embeddings.
        max_new_tokens: length cap (L).
        stop_ids: ids that end a caption (included in the output).

    Returns:
        B lists of generated ids, each ending at its first stop id if one was produced.
    """
    outputs = []
    for embeds in prefix.split(1):
        generated: list[int] = []
        for _ in range(max_new_tokens):
            next_id = int(lm(embeds)[0, -1].argmax())
            generated.append(next_id)
            if next_id in stop_ids:
                break
            embeds = torch.cat([embeds, lm.embed(torch.tensor([[next_id]], device=embeds.device))], dim=1)
        outputs.append(generated)
    return outputs


@torch.no_grad()
def naive_beam_search(
    lm: PrefixLM, prefix: torch.Tensor, beam_size: int, max_new_tokens: int, stop_ids: list[int]
) -> list[list[int]]:
    """The original ClipCap beam search: one image at a time, whole sequence re-run each step.

    Beams are ranked by summed log-probability divided by length, as ClipCap's ``generate_beam`` does;
    finished beams stay in the pool. It is a speed reference, so its ranking is ClipCap's, not
    ``generate``'s.

    Args:
        lm: the language model.
        prefix: (B, P, D) prefix embeddings.
        beam_size: beams kept per step.
        max_new_tokens: length cap (L).
        stop_ids: ids that end a caption.

    Returns:
        B lists of ids, the best beam of each image.
    """
    outputs = []
    stop = torch.tensor(stop_ids, device=prefix.device)
    for embeds in prefix.split(1):
        scores = None
        tokens = None
        lengths = torch.ones(beam_size, device=prefix.device)
        finished = torch.zeros(beam_size, dtype=torch.bool, device=prefix.device)
        for _ in range(max_new_tokens):
            logprobs = lm(embeds)[:, -1].float().log_softmax(-1)
            if scores is None:
                scores, next_ids = logprobs[0].topk(beam_size)
                embeds = embeds.expand(beam_size, -1, -1)
                tokens = next_ids[:, None]
            else:
                logprobs[finished] = -float("inf")
                logprobs[finished, 0] = 0
                lengths[~finished] += 1
                candidate = (scores[:, None] + logprobs) / lengths[:, None]
                flat_scores, flat_index = candidate.view(-1).topk(beam_size)
                beam = flat_index // logprobs.shape[1]
                next_ids = flat_index % logprobs.shape[1]
                lengths = lengths[beam]
                tokens = torch.cat([tokens[beam], next_ids[:, None]], dim=1)
                embeds = embeds[beam]
                scores = flat_scores * lengths
                finished = finished[beam]
            embeds = torch.cat([embeds, lm.embed(next_ids[:, None])], dim=1)
            finished = finished | torch.isin(next_ids, stop)
            if finished.all():
                break
        best = int((scores / lengths).argmax())
        ids = tokens[best].tolist()
        for position, token in enumerate(ids):
            if token in stop_ids:
                ids = ids[: position + 1]
                break
        outputs.append(ids)
    return outputs

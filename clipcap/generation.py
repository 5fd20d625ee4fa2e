"""Decoding settings, stop handling, and ClipCap's own beam search.

Shapes: B images, R captions per image, P prefix length, L new tokens, D LM width, V vocabulary.

Captions are decoded by ``transformers`` ``generate(inputs_embeds=...)`` (batched, KV-cached greedy, beam
search and sampling; see ``ClipCaptioner.generate``). The naive decoders that re-run the whole sequence at
every step, the tests' correctness reference and the benchmarks' speed reference, are in
``benchmarks/naive_decoders.py``, outside the library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig

from clipcap.compat import cache_kwargs, returned_cache
from clipcap.kv_cache import decoding_cache
from clipcap.lm import PrefixLM


@dataclass
class DecodingConfig:
    """How captions are decoded.

    Args:
        num_beams: beam width; 1 is greedy (or sampling with ``do_sample``).
        do_sample: sample instead of taking the most likely token.
        temperature: softmax temperature when sampling.
        top_k: keep the k most likely tokens when sampling (0 keeps all).
        top_p: nucleus sampling mass when sampling (1.0 keeps all).
        num_return_sequences: captions per image (R); at most ``num_beams`` for beam search.
        max_new_tokens: caption length cap in tokens (L), the stop token included.
        min_new_tokens: tokens before a stop may be chosen.
        length_penalty: beam search score exponent on length.
        stop_at_period: also stop after the first token containing "." (kept in the caption), as EGG's
            DiscriTune does; added to the captioner's own stops (its ``caption_end``).
        repetition_penalty: >1 discourages repeating tokens (1.0 is off).
        ignore_stops: never stop: every caption has exactly ``max_new_tokens`` tokens, EOS and "." being
            ordinary tokens (how benchmarks time decoding at a fixed length, as vLLM's ``ignore_eos``; no
            logits processor is added for it, unlike ``min_new_tokens``, which masks the stops each step).
        beam_ranking: how beam search ranks its beams: ``transformers`` (``generate``'s beam search:
            finished hypotheses kept apart, scored by summed log-probability / length ** length_penalty) or
            ``clipcap`` (the original ClipCap's ``generate_beam``: finished and unfinished beams compete at
            every step on their mean token log-probability, the best mean wins). None: the captioner's
            (``ClipCaptioner(beam_ranking=...)``; a converted ClipCap checkpoint carries ``clipcap``).
        early_stopping: ``transformers`` beam search only: True (the default) ends an image's search as
            soon as ``num_beams`` captions are finished; False or "never" let it look for better ones, as
            transformers' own default (False) does, with which EGG decoded DiscriTune at test time.
        kv_cache: the KV cache decoding starts from: ``preallocated`` (clipcap's, written in place, the
            prefix computed once per image: :mod:`clipcap.kv_cache`), ``dynamic`` (transformers'
            ``DynamicCache``, grown by concatenation; the prefix still once per image) or ``static``
            (transformers' ``StaticCache`` through ``cache_implementation="static"``, which ``generate``
            compiles on a GPU; every beam or sample runs the prefix itself, and ClipCap's beam ranking and
            rollouts with gradients cannot use it). Rollouts with gradients use ``dynamic`` whatever is set.
            All three decode the same ids up to float rounding (docs/benchmarks.md, "KV cache").
    """

    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_return_sequences: int = 1
    max_new_tokens: int = 40
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    stop_at_period: bool = False
    repetition_penalty: float = 1.0
    ignore_stops: bool = False
    beam_ranking: str | None = None
    early_stopping: bool | str = True
    kv_cache: str = "preallocated"

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"DecodingConfig: kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if self.num_beams < 1 or self.num_return_sequences < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"DecodingConfig: beams, return sequences and max_new_tokens must be ≥ 1: {self}"
            )
        if self.beam_ranking not in (None, *BEAM_RANKINGS):
            raise ValueError(
                f"DecodingConfig: beam_ranking must be one of {BEAM_RANKINGS} or None, got {self.beam_ranking!r}"
            )
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"DecodingConfig: early_stopping must be true, false or never, got {self.early_stopping!r}"
            )
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"DecodingConfig: num_return_sequences={self.num_return_sequences} needs num_beams ≥ it "
                "or do_sample=true"
            )

    def describe(self) -> str:
        """``beam 5, up to 40 tokens, stop at EOS``, plus every other setting that is not the default."""
        way = f"beam {self.num_beams}" if self.num_beams > 1 else "greedy"
        if self.do_sample:
            way = f"sampling (temperature {self.temperature}, top-k {self.top_k}, top-p {self.top_p})"
        stops = "EOS or a '.'" if self.stop_at_period else "EOS"
        text = f"{way}, up to {self.max_new_tokens} tokens, stop at {stops}"
        shown = {
            "num_beams",
            "do_sample",
            "temperature",
            "top_k",
            "top_p",
            "max_new_tokens",
            "stop_at_period",
        }
        others = [
            f"{field.name}={getattr(self, field.name)}"
            for field in dataclasses.fields(self)
            if field.name not in shown and getattr(self, field.name) != field.default
        ]
        return text + (f" ({', '.join(others)})" if others else "")

    def stop_ids(self, lm: PrefixLM, caption_end: str = "eos") -> list[int]:
        """The ids that end a caption under these settings for a captioner whose captions end as
        ``caption_end`` says (none with ``ignore_stops``)."""
        return [] if self.ignore_stops else stop_token_ids(lm, self.stop_at_period, caption_end)

    def generation_config(self, stop_token_ids: list[int], pad_token_id: int) -> GenerationConfig:
        """The full ``GenerationConfig``; nothing is inherited from a model's own defaults."""
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            num_beams=self.num_beams,
            do_sample=self.do_sample,
            temperature=self.temperature if self.do_sample else None,
            top_k=self.top_k if self.do_sample else None,
            top_p=self.top_p if self.do_sample else None,
            num_return_sequences=self.num_return_sequences,
            length_penalty=self.length_penalty,
            repetition_penalty=self.repetition_penalty,
            early_stopping=self.early_stopping if self.num_beams > 1 else False,
            eos_token_id=stop_token_ids or None,
            pad_token_id=pad_token_id,
            use_cache=True,
            cache_implementation="static" if self.kv_cache == "static" else None,
        )


BEAM_RANKINGS = ("transformers", "clipcap")
KV_CACHES = ("preallocated", "dynamic", "static")
CAPTION_ENDS = ("eos", "period_token", "eos_or_period")


def stop_token_ids(lm: PrefixLM, stop_at_period: bool, caption_end: str = "eos") -> list[int]:
    """The ids that end a caption, EOS first when it is one.

    Args:
        lm: the language model (its tokenizer's ids).
        stop_at_period: add every token containing "." (EGG's stop set).
        caption_end: how the captioner's captions end: ``eos`` (trained by clipcap: EOS),
            ``period_token`` (the original ClipCap, which never learnt EOS: the single "." token that
            ``tokenizer.encode(".")[0]`` gives, EOS being an ordinary token, as ``generate2`` and
            ``generate_beam`` stop) or ``eos_or_period`` (EGG's DiscriTune: EOS or any token containing ".").
    """
    if caption_end not in CAPTION_ENDS:
        raise ValueError(f"caption_end must be one of {CAPTION_ENDS}, got {caption_end!r}")
    if caption_end == "period_token":
        stops = [lm.tokenizer.encode(".", add_special_tokens=False)[0]]
    else:
        stops = [lm.eos_token_id]
    if stop_at_period or caption_end == "eos_or_period":
        stops += [token for token in lm.period_token_ids if token not in stops]
    return stops


def cut_at_stop(token_ids: torch.Tensor, eos_token_id: int, stop_ids: list[int]) -> list[list[int]]:
    """Cuts each row after its first stop token.

    Args:
        token_ids: (N, L) generated ids.
        eos_token_id: dropped when it is the stop (it is not caption text).
        stop_ids: every id that ends a caption; those other than EOS (a "." token) are kept.

    Returns:
        N lists of caption token ids.
    """
    stops = torch.isin(token_ids, torch.tensor(stop_ids, device=token_ids.device))
    has_stop = stops.any(dim=1)
    first = torch.where(has_stop, stops.int().argmax(dim=1), token_ids.shape[1] - 1)
    captions = []
    for row, end, stopped in zip(token_ids.tolist(), first.tolist(), has_stop.tolist(), strict=True):
        ids = row[: end + 1]
        if stopped and ids[-1] == eos_token_id:
            ids = ids[:-1]
        captions.append(ids)
    return captions


@torch.no_grad()
def clipcap_beam_search(
    lm: PrefixLM, prefix: torch.Tensor, decoding: DecodingConfig, stop_ids: list[int]
) -> torch.Tensor:
    """Beam search as the original ClipCap's ``generate_beam`` ranks beams, batched over images, KV-cached.

    At every step each image's ``num_beams`` beams are extended by every token and the ``num_beams`` best
    continuations are kept by their mean token log-probability (summed log-probability / tokens so far);
    a beam that has produced a stop stays in the pool, extended by token 0 at log-probability 0 with its
    length frozen, so its mean no longer changes. The search ends when every beam of every image has
    stopped or after ``max_new_tokens`` tokens; each image's caption is its beam with the best mean. An
    image whose beams have all stopped keeps its beams and scores while the others go on, so batching does
    not change its caption. (``generate`` ranks differently: see ``DecodingConfig.beam_ranking``.)

    Args:
        lm: the language model.
        prefix: (B, P, D) what the LM reads before the caption.
        decoding: ``num_beams`` (K), ``max_new_tokens`` (L) and ``temperature`` are read; sampling and
            several captions per image are not ClipCap's and are refused.
        stop_ids: the ids that end a caption.

    Returns:
        (B, L') each image's best beam, token 0 after its stop (read it with :func:`cut_at_stop`).
    """
    if decoding.do_sample or decoding.num_return_sequences != 1:
        raise ValueError("beam_ranking=clipcap is ClipCap's beam search: one caption per image, no sampling")
    if decoding.kv_cache == "static":
        raise ValueError(
            "kv_cache=static is generate's StaticCache, and beam_ranking=clipcap runs its own loop: use "
            "kv_cache=preallocated or dynamic"
        )

    model = lm.model
    batch, beams = prefix.shape[0], decoding.num_beams
    device = prefix.device
    stops = torch.tensor(stop_ids, device=device, dtype=torch.long)
    temperature = decoding.temperature if decoding.temperature > 0 else 1.0

    def step(
        embeds: torch.Tensor, attention: torch.Tensor, cache: DynamicCache
    ) -> tuple[torch.Tensor, DynamicCache]:
        output = model(inputs_embeds=embeds, attention_mask=attention, use_cache=True, **cache_kwargs(cache))
        logits = output.logits[:, -1].float() / temperature
        # softmax then log, as generate_beam computes them (log_softmax differs in the last bits).
        return logits.softmax(-1).log(), returned_cache(output) or cache

    attention = torch.ones(prefix.shape[:2], dtype=torch.long, device=device)
    config = lm.base_model.config
    if decoding.kv_cache == "dynamic":
        cache = DynamicCache(config=config)
    else:
        cache = decoding_cache(config, capacity=prefix.shape[1] + decoding.max_new_tokens)
    first, cache = step(prefix, attention, cache)
    vocab = first.shape[-1]
    scores, next_ids = first.topk(beams, dim=-1)  # (B, K)
    cache.batch_repeat_interleave(beams)
    attention = attention.repeat_interleave(beams, dim=0)
    tokens = next_ids[:, :, None]  # (B, K, t)
    lengths = torch.ones(batch, beams, device=device)
    stopped = torch.isin(next_ids, stops)
    offsets = (torch.arange(batch, device=device) * beams)[:, None]
    for _ in range(decoding.max_new_tokens - 1):
        if bool(stopped.all()):
            break
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
        embeds = lm.embed(next_ids.reshape(-1, 1)).to(prefix.dtype)
        log_probs, cache = step(embeds, attention, cache)
        log_probs = log_probs.view(batch, beams, vocab).masked_fill(stopped[:, :, None], float("-inf"))
        log_probs[..., 0] = log_probs[..., 0].masked_fill(stopped, 0.0)
        lengths = lengths + (~stopped).float()
        means = (scores[:, :, None] + log_probs) / lengths[:, :, None]
        best_means, flat = means.view(batch, -1).topk(beams, dim=-1)
        source, next_ids = flat // vocab, flat % vocab
        lengths = lengths.gather(1, source)
        tokens = torch.cat([tokens.gather(1, source[:, :, None].expand_as(tokens)), next_ids[:, :, None]], 2)
        scores = best_means * lengths
        stopped = stopped.gather(1, source) | torch.isin(next_ids, stops)
        cache.reorder_cache((offsets + source).reshape(-1))
    best = (scores / lengths).argmax(dim=1)
    return tokens[torch.arange(batch, device=device), best]

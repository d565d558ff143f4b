"""Answer generation for LaVIN: batched, mixed image/text prompts, a KV cache, exact positions.

    sequence of prompt b:  [t_m, BOS, "Image: " v1..v6 | "Image: N/A", prompt]   (L_b tokens)
    prefill:  positions 0 .. L_min - 1 of every sample at once (L_min = shortest prompt)
    decode:   one position p = L_min, L_min + 1, ... per step, for the whole batch; a sample
              whose prompt is longer than p is fed its own prompt embedding at p (teacher
              forcing), the others the embedding of the token they generated at p - 1

So every token at sequence index i is processed at RoPE position i, exactly as in training
(the reference's decode is one position off; REFERENCE.md section 9), and no padding is ever
attended to: no mask is needed, the samples of a batch never see each other, and a batched
answer is the answer the prompt gets alone (up to float rounding). Position 0 (t_m) is in
the prefill, so each layer's adapter routes there and the cache keeps the weights for every
later step (they depend on the modality token alone, REFERENCE.md section 3).

`reference_decoding=True` (opt-in, to compare with the paper's numbers) copies the reference's
decode instead: every position fed after the prefill is rotated at RoPE position i - 1 (its
cache and its RoPE table disagree by one once the modality token is left out of the cache),
and `generate` returns the prompt and the answer decoded as one string, as the reference's
generator does (its evaluation parses the first "The answer is X." of that string).

Decoding is greedy when `temperature == 0`, else temperature and nucleus (top-p) sampling
from a `torch.Generator` seeded with `seed`. A sample stops at EOS or another of the
tokenizer's `stop_ids` (not part of its answer), after `max_new_tokens`, or when its sequence
reaches the model's `max_seq_len`; the batch stops when every sample has.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lavin_fast.collate import SequenceLayout
from lavin_fast.models.lavin import LaVIN

FINISH_EOS, FINISH_MAX_NEW, FINISH_MAX_LEN = "eos", "max_new_tokens", "max_seq_len"


@dataclass
class Generation:
    """What `generate_tokens` produced, one entry per prompt.

    tokens: the new token ids, EOS excluded.
    finish_reasons: "eos" (stopped at EOS or another of the tokenizer's stop_ids),
    "max_new_tokens", or "max_seq_len" (the prompt and answer filled the model's context).
    logits: only with `return_logits=True`: per prompt, [steps, vocab] fp32, the logits each
    new token was chosen from (one row more than `tokens` when the answer ended at EOS).
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    logits: list[Tensor] | None = None


def sample_next_token(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> Tensor:
    """Next tokens [B] (int64) from logits [B, vocab].

    temperature == 0: argmax (the first maximum on ties). Otherwise a draw from
    softmax(logits / temperature) restricted to the nucleus: the most probable tokens whose
    mass, counted from the top, first reaches `top_p` (the top token always stays), renormalised.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # stable: equal probabilities keep index order, so a nucleus of one token is the argmax
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs     # exactly 0 for the top token
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # renormalises by itself
    return order.gather(-1, choice).squeeze(-1)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() inside; afterwards every submodule gets back its own training flag (a
    caller may keep, say, a frozen backbone in eval while the adapters train)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _check_inputs(model: LaVIN, layout: SequenceLayout, prompts: Sequence[str],
                  images: Sequence[Tensor | None], max_new_tokens: int, temperature: float,
                  top_p: float) -> None:
    if isinstance(prompts, str):
        raise ValueError("generate: prompts must be a sequence of strings, got a single string")
    if len(prompts) != len(images):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(images)} images "
                         "(give one image or None per prompt)")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"generate: prompt {index} is a {type(prompt).__name__}, not a str")
    size = model.config.vit.image_size
    for index, image in enumerate(images):
        if image is None:
            continue
        if not isinstance(image, Tensor):
            raise ValueError(f"generate: image {index} is a {type(image).__name__}, not a tensor or None")
        if tuple(image.shape) != (3, size, size) or not image.is_floating_point():
            raise ValueError(f"generate: image {index} must be a preprocessed float tensor [3, {size}, {size}], "
                             f"got {image.dtype} {tuple(image.shape)}")
    if layout.image_tokens != model.config.image_tokens:
        raise ValueError(f"generate: the layout has {layout.image_tokens} image slots but the model "
                         f"produces {model.config.image_tokens} image tokens")
    if layout.tokenizer.n_words > model.llama.config.vocab_size:
        raise ValueError(f"generate: the tokenizer has {layout.tokenizer.n_words} pieces but the model's "
                         f"vocabulary only {model.llama.config.vocab_size}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")


def generate_tokens(model: LaVIN, layout: SequenceLayout, prompts: Sequence[str],
                    images: Sequence[Tensor | None], *, max_new_tokens: int = 64, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None, return_logits: bool = False,
                    reference_decoding: bool = False) -> Generation:
    """Generate answers to `prompts` as token ids (see the module docstring for the scheme).

    prompts: B strings (e.g. ScienceQA's "Question: ... Response:"), tokenized by `layout`.
    images: B entries, a preprocessed [3, S, S] float tensor or None (text-only); only the
    image samples go through the ViT, stacked in batch order.
    max_new_tokens: at most this many new tokens per prompt (EOS counts as one if reached).
    temperature, top_p, seed: decoding, as in `sample_next_token`; seed=None draws a fresh one.
    reference_decoding: the reference's RoPE positions after the prefill (module docstring).
    Raises ValueError on malformed inputs or a prompt that leaves no room in `max_seq_len`.
    """
    _check_inputs(model, layout, prompts, images, max_new_tokens, temperature, top_p)
    batch = len(prompts)
    if batch == 0:
        return Generation([], [], [] if return_logits else None)
    has_image = [image is not None for image in images]
    sequences = [layout.prompt_tokens(prompt, flag) for prompt, flag in zip(prompts, has_image)]
    lengths = [len(ids) for ids in sequences]
    max_seq_len = model.llama.config.max_seq_len
    for index, length in enumerate(lengths):
        if length >= max_seq_len:
            raise ValueError(f"generate: prompt {index} takes {length} tokens with its prefix, which leaves no "
                             f"room for an answer in the model's max_seq_len of {max_seq_len}")
    # New tokens each sample may make: prompt + answer stay within max_seq_len, as in training.
    budgets = [min(max_new_tokens, max_seq_len - length) for length in lengths]
    if max_new_tokens == 0:
        return Generation([[] for _ in prompts], [FINISH_MAX_NEW] * batch,
                          [torch.empty(0, model.llama.config.vocab_size) for _ in prompts] if return_logits else None)

    stops = set(layout.tokenizer.stop_ids)  # EOS, and e.g. LLaMA-3 Instruct's <|eot_id|> and <|eom_id|>
    device = model.llama.tok_embeddings.weight.device
    with torch.inference_mode(), _eval_mode(model):
        # Right-padded prompts: the padding (id 0) is never fed, it only keeps the tensor square.
        tokens = torch.zeros(batch, max(lengths), dtype=torch.long)
        for row, ids in enumerate(sequences):
            tokens[row, :len(ids)] = torch.tensor(ids)
        pictures = [image for image in images if image is not None]
        prompt_embeddings = model.embed(                                             # [B, L_max, d]
            tokens.to(device), torch.tensor(has_image, device=device),
            torch.stack(pictures).to(device) if pictures else None, layout.image_start)

        # The last position ever fed: a sample's final new token is chosen, never fed back.
        cache = model.llama.new_cache(max(length + budget - 1 for length, budget in zip(lengths, budgets)))
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)

        shortest = min(lengths)
        hidden = model.llama.hidden_states(embeddings=prompt_embeddings[:, :shortest], start_pos=0,
                                           cache=cache, isolate_first=True)
        logits = model.llama.output(hidden[:, -1]).float()                          # [B, vocab]

        new_tokens: list[list[int]] = [[] for _ in prompts]
        step_logits: list[list[Tensor]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * batch
        last = torch.zeros(batch, dtype=torch.long, device=device)  # each sample's latest new token
        position = shortest - 1                                     # the position `logits` belong to
        while True:
            chosen = sample_next_token(logits, temperature, top_p, generator)
            answering = torch.tensor([position >= length - 1 for length in lengths], device=device)
            last = torch.where(answering, chosen, last)
            for row, token in enumerate(chosen.tolist()):
                if reasons[row] is not None or position < lengths[row] - 1:
                    continue  # finished, or still reading its prompt: this logit row is not an answer
                if return_logits:
                    step_logits[row].append(logits[row].cpu())
                if token in stops:
                    reasons[row] = FINISH_EOS
                    continue
                new_tokens[row].append(token)
                if len(new_tokens[row]) == budgets[row]:
                    reasons[row] = FINISH_MAX_NEW if budgets[row] == max_new_tokens else FINISH_MAX_LEN
            if all(reason is not None for reason in reasons):
                break
            position += 1
            # Teacher-force samples still inside their prompt, feed the others their last token.
            reading = torch.tensor([position < length for length in lengths], device=device)
            fed = torch.where(reading[:, None], prompt_embeddings[:, min(position, max(lengths) - 1)],
                              model.llama.tok_embeddings(last))
            hidden = model.llama.hidden_states(embeddings=fed[:, None], start_pos=position, cache=cache,
                                               isolate_first=True, rope_offset=-1 if reference_decoding else 0)
            logits = model.llama.output(hidden[:, -1]).float()

    return Generation(new_tokens, [str(reason) for reason in reasons],
                      [torch.stack(rows) if rows else torch.empty(0, logits.shape[-1]) for rows in step_logits]
                      if return_logits else None)


def generate(model: LaVIN, layout: SequenceLayout, prompts: Sequence[str], images: Sequence[Tensor | None], *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, reference_decoding: bool = False) -> list[str]:
    """The answers to `prompts` as text (EOS dropped); arguments as in `generate_tokens`.
    ScienceQA's reference decoding is temperature=0.1, top_p=0.75; greedy is the default.
    reference_decoding: also each text is the whole sequence after t_m, prompt and answer
    decoded as one string (the image slots as the unknown piece), as the reference returns it."""
    result = generate_tokens(model, layout, prompts, images, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed, reference_decoding=reference_decoding)
    if reference_decoding:
        return [layout.tokenizer.decode(layout.prompt_tokens(prompt, image is not None)[1:] + ids)
                for prompt, image, ids in zip(prompts, images, result.tokens)]
    return [layout.tokenizer.decode(ids) for ids in result.tokens]

"""Where the samples of a batch sit in its rows: one description for padded and packed batches.

A padded batch holds one sample per row, from column 0, then pads; a packed batch concatenates
several samples in a row with no pad between them (pads only at the row's end, if any). Both
are rows of segments, and the model reads everything that depends on the layout from here:

- positions [R, L]: each slot's RoPE position inside its sample (0 at the sample's first slot);
- first [S]: the flat index (row * L + column) of each sample's first slot, where its modality
  token t_m sits and its adapters' routers read;
- routing_index [R, L]: the sample of each slot, the row of the per-sample routing table every
  adapter reads (None with one sample per row: the table is then per row already);
- attention: causal inside a sample and, with `isolate_first`, t_m seen by nobody but itself
  (REFERENCE.md section 3). As attention segments that is: each t_m alone, then the rest of its
  sample, causal inside each segment and nothing across (`attention_ids`, `cu_seqlens`).

A row's trailing pads count as the end of its last sample: causal attention means no real slot
reads them, their targets are ignored, so they change nothing that is counted.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segments:
    """The layout of a batch of R rows of length L holding S samples (see the module docstring)."""

    lengths: tuple[tuple[int, ...], ...]   # per row, the lengths of its samples in order
    positions: Tensor                      # [R, L] int64
    first: Tensor                          # [S] int64, flat indices into R * L
    sample_of: Tensor                      # [R, L] int64, the sample of each slot
    attention_ids: Tensor                  # [R, L] int64, the attention segment of each slot
    cu_seqlens: Tensor                     # [A + 1] int32, attention segment bounds in R * L
    max_seqlen: int                        # longest attention segment
    isolate_first: bool
    # The padded layout (dense attention per row, routing per row). A field, not derived from
    # `lengths` where it is read: a compiled block then guards on this flag, not on the lengths.
    one_per_row: bool

    @property
    def num_samples(self) -> int:
        return self.first.numel()

    @property
    def spans(self) -> tuple[int, ...]:
        """The slots of each sample in flat order, a row's trailing pads in its last sample's: they
        tile the R * L slots (host-side ints, no device sync)."""
        length = self.positions.shape[1]
        return tuple(span for row in self.lengths for span in (*row[:-1], row[-1] + length - sum(row)))

    @property
    def routing_index(self) -> Tensor | None:
        """[R, L] rows of the routing table, or None when the table is per row already."""
        return None if self.one_per_row else self.sample_of

    @classmethod
    def build(cls, lengths: Sequence[Sequence[int]] | None, rows: int, length: int,
              device: torch.device | str = "cpu", *, start_pos: int = 0, isolate_first: bool = True) -> Segments:
        """Segments of `rows` rows of `length` slots; `lengths` lists each row's samples (None:
        one sample per row filling it, the padded layout). `start_pos` shifts the positions of
        one-sample rows (a chunk decoded after a KV cache)."""
        if lengths is None:
            lengths = [[length]] * rows
        lengths = tuple(tuple(int(n) for n in row) for row in lengths)
        if len(lengths) != rows:
            raise ValueError(f"Segments: {len(lengths)} rows of sample lengths for a batch of {rows} rows")
        for index, row in enumerate(lengths):
            if not row or min(row) < 1 or sum(row) > length:
                raise ValueError(f"Segments: row {index} holds samples of lengths {list(row)}, which must be "
                                 f"at least 1 each and fit in the row's {length} slots")
        if start_pos and any(len(row) > 1 for row in lengths):
            raise ValueError("Segments: packed rows start at position 0 (no KV cache)")
        positions, sample_of, attention_ids, first, bounds = [], [], [], [], [0]
        sample = 0
        for index, row in enumerate(lengths):
            spans = list(row)
            spans[-1] += length - sum(row)            # trailing pads: the end of the last sample
            for span in spans:
                first.append(len(positions))      # the flat index of the sample's first slot
                positions.extend(range(start_pos, start_pos + span))
                sample_of.extend([sample] * span)
                pieces = [1, span - 1] if isolate_first and span > 1 and start_pos == 0 else [span]
                for piece in pieces:
                    attention_ids.extend([len(bounds) - 1] * piece)
                    bounds.append(bounds[-1] + piece)
                sample += 1

        def grid(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device).view(rows, length)

        return cls(lengths=lengths, positions=grid(positions), first=torch.tensor(first, device=device),
                   sample_of=grid(sample_of), attention_ids=grid(attention_ids),
                   cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=device),
                   max_seqlen=max(b - a for a, b in zip(bounds, bounds[1:])),
                   isolate_first=isolate_first,
                   one_per_row=all(len(row) == 1 for row in lengths))

"""Step 1 of every editor: the key ``k*`` at the subject token, averaged over context prefixes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from repedit.data.case import EditRequest
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel
from repedit.models.tokens import Position, locate, pad_id, pad_right


def key_inputs(
    lm: LoadedModel, requests: Sequence[EditRequest], contexts: Sequence[str], position: Position
) -> tuple[list[list[int]], list[int]]:
    """Token ids and subject positions for every (request, context) pair, request-major."""
    seqs, positions = [], []
    for req in requests:
        for ctx in contexts:
            ids, pos = locate(
                lm.tokenizer, ctx.replace("{}", req.prompt), req.subject, position=position
            )
            seqs.append(ids)
            positions.append(pos)
    return seqs, positions


def keys_at(
    lm: LoadedModel,
    layers: Sequence[int],
    seqs: Sequence[Sequence[int]],
    positions: Sequence[int],
    *,
    batch_size: int = 64,
    grad: bool = False,
) -> dict[int, torch.Tensor]:
    """Down-projection inputs at one position per sequence: {layer: [n_seqs, d_mlp]}.

    Runs each batch only up to the deepest requested layer.
    """
    modules = {layer: lm.arch.down_proj(layer) for layer in layers}
    deepest = modules[max(layers)]
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad_right(seqs[i : i + batch_size], pad_id(lm.tokenizer))
            pos = torch.tensor(positions[i : i + batch_size])
            with Hooks() as h:
                for layer, module in modules.items():
                    h.capture(str(layer), module, positions=pos, detach=not grad)
                h.stop_after(deepest)
                h.run(
                    lm.model,
                    input_ids=ids.to(lm.device),
                    attention_mask=mask.to(lm.device),
                    use_cache=False,
                )
                for layer in layers:
                    chunks[layer].append(h[str(layer)])
    return {layer: torch.cat(chunks[layer]) for layer in layers}


def compute_keys(
    lm: LoadedModel,
    layers: Sequence[int],
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    *,
    position: Position = "last",
    mean: bool = True,
) -> dict[int, torch.Tensor]:
    """``k*`` per request and layer, averaged over ``contexts``: {layer: [n_requests, d_mlp]}.

    With ``mean=False`` every context's key is kept: [n_requests · n_contexts, d_mlp],
    request-major. Returned in float32 whatever the model dtype.
    """
    seqs, positions = key_inputs(lm, requests, contexts, position)
    flat = keys_at(lm, layers, seqs, positions)
    if not mean:
        return {layer: k.float() for layer, k in flat.items()}
    n, c = len(requests), len(contexts)
    return {layer: k.float().reshape(n, c, -1).mean(1) for layer, k in flat.items()}

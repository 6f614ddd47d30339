"""token_skip: less important tokens skip the transformer blocks after block K.

Training-free, static shapes, no model edits. The pass works on Dynamo's torch-level graph,
where ``node.meta["nn_module_stack"]`` says which module each op came from:

1. **Block stack.** The repeated children of one ``ModuleList`` (``encoder.layer.0``,
   ``encoder.layer.1``, ...) are the blocks; the list with the most children wins.
2. **Region.** The ops of blocks ``K+1 .. N-1`` form the region. Its inputs from outside are the
   hidden state leaving block K (the only input that depends on the blocks before), tensors
   computed before the stack (attention masks, rotary cos/sin) and weights; its one output
   leaving the region is the last block's hidden state.
3. **Select.** After block K an importance score that needs no attention weights (SDPA kernels
   stay usable) ranks the tokens: cosine similarity of each token's hidden state to an anchor
   token (the first one for encoders and ViTs, the last one for causal LMs), or the hidden
   state's norm, or the opposite of the similarity (distinct tokens first: on the digits ViT the
   patches least like [CLS] carry the strokes). Padding tokens (read from the attention mask) score lowest, so they skip
   first; the first token (CLS / attention sink) and, for causal LMs, the last one are always
   kept. ``k = ceil(keep_ratio * S)`` indices are kept, sorted by position, so a causal mask
   restricted to them is still causal.
4. **Gather.** The hidden state and every sequence-indexed input of the region (the 4-D mask on
   its query and key dims, cos/sin on their position dim) are gathered to the kept tokens; the
   shapes baked into the region's ``view``/``reshape``/``expand`` calls are re-derived for ``k``
   tokens by propagating fake tensors through the region (and checked: every size that changed
   must be a multiple of the sequence length becoming the same multiple of ``k``).
5. **Scatter.** The region's output is scattered back into block K's output: skipped tokens
   keep their block-K state, so every output keeps its shape (mean pooling, per-token heads and
   LM logits keep working).

**Merge** (``strategy="merge"``, ToMe): instead of leaving, tokens merge into similar ones (by
default ToMe's bipartite soft matching on the hidden states); a merged token's state is the
size-weighted mean of its group, ``log(size)`` is added to the attention logits of its key
(proportional attention: folded into the gathered attention mask, or given to SDPA as its
``attn_mask`` when the model has none), and at the end every token takes its group's output.

**Schedule.** Tokens may leave or merge at several blocks (``schedule``: a keep ratio per block):
each drop is one stage, rewritten in turn on the graph the stage before left; a stage gathers
masks and rotary tables from the original inputs by the original positions of the tokens still
running, and its scatter / unmerge nests inside the one before. ``max_error`` picks the schedule
from calibration calls (:func:`choose_schedule`).

**Inside blocks** (``reduce_before="mlp"``, where ToMe merges): a stage's region starts at the
MLP part of block K (:func:`mlp_start`: the first child module after the attention from where one
hidden state goes on), so block K's MLP already runs on fewer tokens and the merge matches the
states block K's attention just produced. On MiniLM this buys about half a block of every drop
at the same quality (eager study: mean cosine 0.984 at an ideal 1.70x instead of 1.52x).

Everything happens inside the one graph handed on to Inductor: the top-k, gathers and scatter
are ATen ops Inductor fuses into its kernels (indirect loads / stores), not a Python loop.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from zc.config import TokenSkipConfig
from zc.fx_passes.pass_manager import PassReport, is_weight_input

# Runs on Dynamo's graph (see zc.dynamo_backend.backend): it needs the module structure.
GRAPH_LEVEL = "dynamo"

_INDEXED_PATH = re.compile(r"\[(\d+)\]")
_INDEX_IN_PATH = re.compile(r"\.(\d+)(?=\.|$)")
_RESHAPE_METHODS = ("view", "reshape")
_RESHAPE_FUNCTIONS = (torch.reshape,)
_SDPA = F.scaled_dot_product_attention


class SkipGraph(Exception):
    """The graph does not have the structure token_skip needs; the reason goes to the report."""


# --- ops the rewritten graph calls (traced into ATen by AOTAutograd, fused by Inductor) ------


def select_tokens(
    hidden: torch.Tensor,
    key_valid: torch.Tensor | None,
    keep: int,
    score: str,
    anchor: int,
    keep_last: bool,
) -> torch.Tensor:
    """Indices ``[B, keep]`` (ascending) of the tokens that go on through the later blocks."""
    if score == "norm":
        importance = hidden.float().norm(dim=-1)
    else:
        normed = F.normalize(hidden.float(), dim=-1)
        importance = (normed * normed[:, anchor : anchor + 1 if anchor >= 0 else None]).sum(-1)
        if score == "dissimilarity":
            importance = -importance
    # Scores are finite and bounded below by -|x| for norm, -1 for cosine: padding goes below.
    floor = -importance.abs().amax(dim=-1, keepdim=True) - 2.0
    if key_valid is not None:
        importance = torch.where(key_valid, importance, floor)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    special = positions == 0
    if keep_last:
        special = special | (positions == hidden.shape[1] - 1)
    ceiling = importance.abs().amax(dim=-1, keepdim=True) + 2.0
    importance = torch.where(special, ceiling, importance)
    kept = torch.topk(importance, keep, dim=1, sorted=False).indices
    return torch.sort(kept, dim=1).values


def outside_span(hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Indices ``[B, S - (end - start)]`` of the tokens outside ``[start, end)`` (VTW: the image
    tokens of a multimodal LLM are withdrawn after block K)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    kept = torch.cat([positions[:start], positions[end:]])
    return kept.unsqueeze(0).expand(hidden.shape[0], -1)


def outside_token_id(ids: torch.Tensor, token_id: int, withdrawn: int) -> torch.Tensor:
    """Indices ``[B, S - withdrawn]`` (ascending) of the tokens whose id is not ``token_id`` (VTW:
    the image tokens of a multimodal LLM). Every row must hold ``withdrawn`` of them, as the
    example did: the count is part of the compiled shapes, so another count fails loudly."""
    count = ids.shape[1]
    positions = torch.arange(count, device=ids.device)
    is_withdrawn = ids == token_id
    torch._assert_async((is_withdrawn.sum(dim=1) == withdrawn).all(),
                        "zc token_skip: the number of tokens with withdraw_token_id differs from the one compiled for")
    order = torch.where(is_withdrawn, positions + count, positions)
    return torch.sort(order, dim=1).values[:, : count - withdrawn]


def key_valid_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]``: which key positions the last query row of a 4-D attention mask may attend."""
    row = mask[:, 0, -1, :]
    if row.dtype == torch.bool:
        return row
    return row > torch.finfo(row.dtype).min / 2


def gather_tokens(value: torch.Tensor, index: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``value`` restricted to the kept tokens ``index [B, k]`` along each of ``dims``.

    A size-1 batch dim (tensors shared by the batch, like rotary cos/sin) is broadcast first.
    """
    batch, keep = index.shape
    if value.shape[0] != batch:
        value = value.expand(batch, *value.shape[1:])
    for dim in dims:
        shape = [1] * value.dim()
        shape[0], shape[dim] = batch, keep
        target = list(value.shape)
        target[dim] = keep
        value = torch.gather(value, dim, index.view(shape).expand(target))
    return value


def scatter_tokens(base: torch.Tensor, index: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``base [B, S, D]`` with the rows ``index`` replaced by ``kept [B, k, D]``."""
    return torch.scatter(base, 1, index.unsqueeze(-1).expand(kept.shape), kept)


def assign_to_kept(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[B, S]``: for every token, the kept token (0..k-1) its hidden state is most similar to."""
    normed = F.normalize(hidden.float(), dim=-1)
    kept = torch.gather(normed, 1, index.unsqueeze(-1).expand(*index.shape, normed.shape[-1]))
    assign = torch.bmm(normed, kept.transpose(1, 2)).argmax(dim=-1)
    # A kept token stands for itself even where another kept token is as similar.
    return torch.scatter(assign, 1, index, torch.arange(index.shape[1], device=index.device).expand(index.shape))


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` with ``even`` at positions 0, 2, ... and ``odd`` at 1, 3, ..."""
    paired = torch.stack([even[:, : odd.shape[1]], odd], dim=-1).flatten(1)
    return torch.cat([paired, even[:, odd.shape[1]:]], dim=1)


def bipartite_plan(
    hidden: torch.Tensor, sizes: torch.Tensor, keep: int, keep_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching from ``n`` down to ``keep`` tokens.

    Returns the kept positions ``[B, keep]`` (ascending) and, for every token, the kept token
    (0..keep-1) it merges into. Per round the tokens at even positions (set A, with the first
    token, which is never merged away and so never absorbs others) are matched with their most
    similar token at an odd position (set B); the A tokens with the closest match merge into it.
    One round removes at most about half the tokens, so a larger reduction takes several rounds,
    each matching the size-weighted merged states of the one before. Padding (size 0) goes first.
    """
    batch, count, _ = hidden.shape
    device = hidden.device
    metric = hidden.float()
    sizes = sizes.float()
    kept_positions = torch.arange(count, device=device).expand(batch, count)
    assign_total = kept_positions
    while count > keep:
        a_count = (count + 1) // 2
        protected = 1 + int(keep_last and (count - 1) % 2 == 0)
        remove = min(count - keep, max(1, a_count - protected))
        normed = F.normalize(metric, dim=-1)
        similarity = normed[:, 0::2] @ normed[:, 1::2].transpose(1, 2)
        b_valid = sizes[:, 1::2] > 0
        similarity = similarity.masked_fill(~b_valid.unsqueeze(1), -2.0)
        best, dest = similarity.max(dim=-1)
        a_slots = torch.arange(a_count, device=device)
        never = (a_slots == 0) | ((a_slots == a_count - 1) & (protected == 2))
        score_a = torch.where(never, -4.0, torch.where(sizes[:, 0::2] > 0, best, 3.0))
        score_b = torch.where(b_valid, -3.0, 3.0)
        score = _interleave(score_a, score_b)
        positions = torch.arange(count, device=device).expand(batch, count)
        target = _interleave(2 * dest + 1, positions[:, 1::2])
        kept = torch.sort(torch.topk(-score, count - remove, dim=1, sorted=False).indices, dim=1).values
        is_kept = torch.zeros_like(score, dtype=torch.bool).scatter(1, kept, True)
        slot = is_kept.long().cumsum(1) - 1
        assign = torch.gather(slot, 1, torch.where(is_kept, positions, target))
        metric = merge_tokens(metric, sizes, kept, assign)
        sizes = merged_sizes(sizes, assign, count - remove)
        kept_positions = torch.gather(kept_positions, 1, kept)
        assign_total = torch.gather(assign, 1, assign_total)
        count -= remove
    return kept_positions, assign_total


def merge_tokens(hidden: torch.Tensor, sizes: torch.Tensor, index: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """``[B, k, D]``: each kept token's state averaged with the tokens assigned to it, weighted
    by how many original tokens each stands for (padding weighs 0). A kept token that stands
    for no real token (padding) keeps its own state."""
    weight = sizes.to(hidden.dtype)
    batch, _, dim = hidden.shape
    keep = index.shape[1]
    summed = hidden.new_zeros(batch, keep, dim).scatter_add(
        1, assign.unsqueeze(-1).expand(hidden.shape), hidden * weight.unsqueeze(-1))
    total = weight.new_zeros(batch, keep).scatter_add(1, assign, weight)
    own = torch.gather(hidden, 1, index.unsqueeze(-1).expand(batch, keep, dim))
    return torch.where((total > 0).unsqueeze(-1), summed / total.clamp_min(1e-6).unsqueeze(-1), own)


def merged_sizes(sizes: torch.Tensor, assign: torch.Tensor, keep: int) -> torch.Tensor:
    """``[B, k]``: how many original (non-padding) tokens each kept token stands for."""
    return sizes.new_zeros(sizes.shape[0], keep).scatter_add(1, assign, sizes)


def initial_sizes(hidden: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """``[B, S]``: every real token stands for itself; padding for nothing."""
    if key_valid is None:
        return hidden.new_ones(hidden.shape[:2], dtype=torch.float32)
    return key_valid.float()


def size_bias(mask: torch.Tensor | None, sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention (ToMe): ``log(size)`` of each key added to the attention logits,
    so a merged token gets the attention weight of all the tokens it stands for. ``mask``: the
    model's (gathered) attention mask, boolean or additive, or ``None`` (the bias alone,
    ``[B, 1, 1, k]``). Padding keys (size 0) add nothing: the mask already hides them."""
    log_size = torch.where(sizes > 0, sizes.clamp_min(1e-6).log(), 0.0).to(dtype)[:, None, None, :]
    if mask is None:
        return log_size
    if mask.dtype == torch.bool:
        return torch.where(mask, log_size, torch.finfo(dtype).min)
    return mask + log_size.to(mask.dtype)


def unmerge_tokens(assign: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``[B, S, D]``: every token takes the output of the kept token it was merged into."""
    return torch.gather(kept, 1, assign.unsqueeze(-1).expand(*assign.shape, kept.shape[-1]))


# --- finding the block stack and the region ------------------------------------------------


def block_stack(gm: torch.fx.GraphModule) -> tuple[str, dict[torch.fx.Node, int]]:
    """The module path of the repeated blocks and the block index of every op inside one.

    Blocks are the children ``prefix.0``, ``prefix.1``, ... of one module list, all of one class
    and each running several ops (a ``Sequential`` of single layers is no block stack); the list
    with the most such children wins.
    """
    children: dict[str, dict[int, set[str]]] = {}
    paths: dict[torch.fx.Node, list[str]] = {}
    ops: dict[str, int] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack or node.op not in ("call_function", "call_method", "call_module"):
            continue
        node_paths = [_INDEXED_PATH.sub(r".\1", path) for path, _ in stack.values()]
        paths[node] = node_paths
        for path, (_, module_type) in zip(node_paths, stack.values()):
            for match in _INDEX_IN_PATH.finditer(path):
                if match.end() == len(path):  # the entry of the child module itself
                    types = children.setdefault(path[: match.start()], {}).setdefault(int(match.group(1)), set())
                    types.add(getattr(module_type, "__qualname__", str(module_type)))
                    ops[path] = ops.get(path, 0) + 1
    stacks = {
        prefix: blocks for prefix, blocks in children.items()
        if len(blocks) >= 2 and len(set().union(*blocks.values())) == 1
        and all(ops[f"{prefix}.{i}"] >= 2 for i in blocks)
    }
    if not stacks:
        raise SkipGraph("no stack of repeated blocks (a module list with 2+ children of one class) in the graph")
    prefix = max(stacks, key=lambda p: (len(stacks[p]), -len(p)))
    block_of = {}
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)(?=\.|$)")
    for node, node_paths in paths.items():
        for path in node_paths:
            match = pattern.match(path)
            if match:
                block_of[node] = int(match.group(1))
                break
    return prefix, block_of


def _tensor(node: Any) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("example_value")
    return value if isinstance(value, torch.Tensor) else None


def _input_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(node.all_input_nodes)


def skip_region(
    gm: torch.fx.GraphModule, block_of: dict[torch.fx.Node, int], start_layer: int,
    first_op: torch.fx.Node | None = None,
) -> list[torch.fx.Node]:
    """The ops of the blocks after ``start_layer`` (in graph order), plus glue ops between them;
    with ``first_op`` (the first op of block ``start_layer``'s MLP), block ``start_layer``'s ops
    from there on too."""
    nodes = list(gm.graph.nodes)
    earlier_blocks = start_layer if first_op is None else start_layer - 1
    later = [i for i, n in enumerate(nodes) if block_of.get(n, -1) > earlier_blocks]
    first, last = (later[0] if first_op is None else nodes.index(first_op)), later[-1]
    region: list[torch.fx.Node] = []
    members: set[torch.fx.Node] = set()
    for node in nodes[first : last + 1]:
        block = block_of.get(node)
        if block is not None and block <= earlier_blocks:
            raise SkipGraph(f"op '{node.name}' of block {block} runs between the ops of later blocks")
        if block is not None or (node.op in ("call_function", "call_method")
                                 and any(i in members for i in _input_nodes(node))):
            region.append(node)
            members.add(node)
    return region


def _is_attention(node: torch.fx.Node) -> bool:
    return node.target in (_SDPA, F.softmax, torch.softmax) or (node.op == "call_method" and node.target == "softmax")


def mlp_start(gm: torch.fx.GraphModule, block_of: dict[torch.fx.Node, int], prefix: str, block: int) -> torch.fx.Node:
    """The first op of ``block``'s MLP part: the first op after the block's attention that starts
    a run of another child module of the block (``intermediate``, ``layernorm_after``,
    ``post_attention_layernorm``) such that the ops from there on read one value of the block's
    earlier ops (the hidden state after the attention and its residual add). A dropout between
    attention and residual add is no such point: the add after it reads two values."""
    own = f"{prefix}.{block}."

    def child(node: torch.fx.Node) -> str | None:
        for path, _ in node.meta.get("nn_module_stack", {}).values():
            path = _INDEXED_PATH.sub(r".\1", path)
            if path.startswith(own):
                return path[len(own):].split(".")[0]
        return None

    ops = [n for n in gm.graph.nodes if block_of.get(n) == block]
    children = [child(n) for n in ops]
    attention = {c for n, c in zip(ops, children) if _is_attention(n)}
    if len(attention) != 1 or None in attention:
        raise SkipGraph(f"reduce_before 'mlp': block {block} ('{prefix}.{block}') does not run its attention in one "
                        "child module")
    (attention_child,) = attention
    last_attention = max(i for i, c in enumerate(children) if c == attention_child)
    for i in range(last_attention + 1, len(ops)):
        if children[i] in (None, attention_child) or children[i] == children[i - 1]:
            continue
        before, after = set(ops[:i]), set(ops[i:])
        read = {v for n in ops[i:] for v in n.all_input_nodes if v not in after}
        if len([v for v in read if v in before or any(u in before for u in v.users)]) == 1:
            return ops[i]
    raise SkipGraph(f"reduce_before 'mlp': block {block} ('{prefix}.{block}') has no point after its attention "
                    "where one hidden state goes on to the rest of the block")


# --- rewriting -------------------------------------------------------------------------------


def _fake_run(node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
    def value(arg: Any) -> Any:
        return arg.meta["example_value"] if isinstance(arg, torch.fx.Node) else arg

    args = torch.fx.node.map_aggregate(args, value)
    kwargs = torch.fx.node.map_aggregate(kwargs, value)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _reshaped(old_in: Sequence[int], new_in: Sequence[int], old_out: Sequence[int], seq: int) -> list[int]:
    """The output shape of a view/reshape whose input shape went from ``old_in`` to ``new_in``.

    Input and output dims are matched in groups of equal element count (as a view does); a group
    whose count changed puts the change on its single output dim, or, when it splits, on the
    output dim that had the sequence length (the last such one: batch comes before sequence).
    """
    out = list(old_out)
    i = j = 0
    while i < len(old_in) or j < len(old_out):
        gi, gj = [i], [j]
        pi = old_in[i] if i < len(old_in) else 1
        pj = old_out[j] if j < len(old_out) else 1
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= old_in[i]
            else:
                j += 1
                gj.append(j)
                pj *= old_out[j]
        gi = [d for d in gi if d < len(old_in)]
        gj = [d for d in gj if d < len(old_out)]
        new_count = math.prod(new_in[d] for d in gi)
        if new_count != pi:
            if len(gj) == 1:
                out[gj[0]] = new_count
            else:
                candidates = [d for d in gj if old_out[d] == seq]
                if not candidates:
                    raise SkipGraph(f"cannot tell which dim of a view to {tuple(old_out)} holds the tokens")
                out[candidates[-1]] = old_out[candidates[-1]] * new_count // pi
        i += 1
        j += 1
    return out


def _rewrite_sizes(node: torch.fx.Node, seq: int) -> None:
    """Re-derive the sizes baked into a view/reshape/expand of a tensor that now has ``k`` tokens."""
    is_reshape = (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)
    is_expand = node.op == "call_method" and node.target == "expand"
    if not (is_reshape or is_expand):
        return
    source = node.args[0]
    new_in = _tensor(source)
    old_in = node.meta["zc_old_input_shape"]
    if new_in is None or tuple(new_in.shape) == tuple(old_in):
        return
    old_out = tuple(node.meta["example_value"].shape)
    if is_reshape:
        new_out = _reshaped(old_in, tuple(new_in.shape), old_out, seq)
    else:
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        offset = len(sizes) - new_in.dim()
        new_out = [
            size if size == -1 or i < offset or old_in[i - offset] == new_in.shape[i - offset]
            else new_in.shape[i - offset]
            for i, size in enumerate(sizes)
        ]
    node.args = (source, tuple(new_out))


def _check_shape(node: torch.fx.Node, old: torch.Size, new: torch.Size, seq: int, keep: int, batch: int) -> None:
    """Every size that changed must be the token count (or a multiple) now counting kept tokens,
    or a leading batch dim of a tensor the batch shared (rotary cos/sin), now gathered per row."""
    if len(old) != len(new):
        raise SkipGraph(f"op '{node.name}' changed rank with fewer tokens")
    for dim, (o, n) in enumerate(zip(old, new)):
        if o != n and not (o % seq == 0 and n == o // seq * keep) and not (dim == 0 and o == 1 and n == batch):
            raise SkipGraph(f"op '{node.name}' has shape {tuple(new)} with fewer tokens (was {tuple(old)}): "
                            "a size there is not the token count")


def stage_plan(config: TokenSkipConfig, blocks: int, prefix: str) -> list[tuple[int, float]]:
    """``(block K, fraction of the tokens that run the blocks after K)`` at each block where the
    token count drops: one point for ``start_layer`` / ``keep_ratio``, several for a ``schedule``.
    With ``reduce_before="mlp"``: ``(block K, fraction of the tokens from K's MLP on)``."""
    withdrawing = config.withdraw_start is not None or config.withdraw_token_id is not None
    if config.schedule is not None and not withdrawing:
        if len(config.schedule) != blocks:
            raise ValueError(
                f"zc: option 'token_skip.schedule' needs one keep ratio per block: this model has {blocks} "
                f"blocks ('{prefix}'); got {len(config.schedule)} ratios")
        fractions = config.schedule
    else:
        if config.start_layer > blocks - 2:
            raise ValueError(
                f"zc: option 'token_skip.start_layer' must be in 0..{blocks - 2} for this model's "
                f"{blocks} blocks ('{prefix}'), so that at least one block runs on fewer tokens; "
                f"got {config.start_layer}"
            )
        inside = int(config.reduce_before == "mlp")  # the drop is inside block K + 1, not before it
        if withdrawing:  # the span or the token id, not a ratio, says which tokens go on
            return [(config.start_layer + inside, 0.0)]
        fractions = (1.0,) * (config.start_layer + 1) + (config.keep_ratio,) * (blocks - config.start_layer - 1)
    if config.reduce_before == "mlp":  # fractions of the MLPs: block 0's may drop already
        return [(i, f) for i, f in enumerate(fractions) if f < (fractions[i - 1] if i else 1.0)]
    return [(i - 1, f) for i, f in enumerate(fractions) if i > 0 and f < fractions[i - 1]]


@dataclasses.dataclass
class _Tokens:
    """What the stages rewritten so far left in the graph for the next one."""

    seq: int | None = None  # the token count before the first stage
    positions: torch.fx.Node | None = None  # [B, k]: original positions of the tokens still running
    valid: torch.fx.Node | None = None  # [B, k]: which of them are real (not padding)
    sizes: torch.fx.Node | None = None  # merge, [B, k]: how many original tokens each stands for
    # every token-indexed input a stage built: (the original input or None, its token dims, kind),
    # so a later stage gathers from the original instead of gathering a gather
    origin: dict[torch.fx.Node, tuple[torch.fx.Node | None, list[int] | None, str]] = dataclasses.field(
        default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def _add(graph: torch.fx.Graph, fn: Callable[..., Any], *args: Any) -> torch.fx.Node:
    """A call of ``fn`` in ``graph`` with its example value (run on the fake example values)."""
    node = graph.call_function(fn, args)
    node.meta["example_value"] = fn(*torch.fx.node.map_aggregate(
        args, lambda a: a.meta["example_value"] if isinstance(a, torch.fx.Node) else a))
    return node


def rewrite(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: TokenSkipConfig,
    report: PassReport,
) -> torch.fx.GraphModule:
    """``gm`` rewritten in place so that the later blocks see fewer tokens (one stage per drop)."""
    prefix, block_of = block_stack(gm)
    blocks = sorted(set(block_of.values()))
    report.metrics["blocks"] = len(blocks)
    report.metrics["block_stack"] = prefix
    plan = stage_plan(config, len(blocks), prefix)
    if not plan:
        raise _Unchanged("every block keeps all the tokens (keep ratio 1): the graph runs unchanged")
    weights = _weight_nodes(gm, example_inputs)
    tokens = _Tokens()
    stages = []
    for start, fraction in plan:
        stage = _rewrite_stage(gm, example_inputs, block_of, prefix, start, fraction, config, tokens, weights)
        if stage is not None:
            stages.append(stage)
    gm.graph.lint()
    gm.recompile()
    inside = config.reduce_before == "mlp"
    counts = [tokens.seq] * len(blocks)  # each block's attention (and, between blocks, its MLP)
    mlp_counts = [tokens.seq] * len(blocks)
    for start, keep in stages:
        counts[start + 1 :] = [keep] * (len(blocks) - start - 1)
        mlp_counts[start + (0 if inside else 1):] = [keep] * (len(blocks) - start - (0 if inside else 1))
    report.metrics.update(tokens=tokens.seq, kept_tokens=stages[-1][1], start_layer=stages[0][0],
                          tokens_per_block=counts, reduce_before=config.reduce_before,
                          block_token_fraction=(sum(counts) + sum(mlp_counts)) / (2 * tokens.seq * len(blocks)))
    if inside:
        report.metrics["mlp_tokens_per_block"] = mlp_counts
    what = ("withdrawn span" if config.withdraw_start is not None else
            f"withdrawn tokens with id {config.withdraw_token_id}" if config.withdraw_token_id is not None else
            f"bipartite matching{', proportional attention' if config.proportional_attention else ''}"
            if config.strategy == "merge" and config.matching == "bipartite" else f"score {config.score}")
    where = (f"{prefix}.{stages[0][0]} (from its MLP)..{blocks[-1]}" if inside
             else f"{prefix}.{stages[0][0] + 1}..{blocks[-1]}")
    if inside:
        what += f"; MLP tokens per block {mlp_counts}, merged or left between attention and MLP"
    report.rewrote(
        where,
        f"tokens per block {counts} of {tokens.seq} ({config.strategy}, {what}); the others keep their "
        f"state from the block where they left" if config.strategy == "skip" else
        f"tokens per block {counts} of {tokens.seq} ({config.strategy}, {what}); each merged token takes "
        "its group's output at the end",
    )
    for note in tokens.notes:
        report.skipped("proportional attention", note)
    return gm


def _rewrite_stage(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    block_of: dict[torch.fx.Node, int],
    prefix: str,
    start: int,
    fraction: float,
    config: TokenSkipConfig,
    tokens: _Tokens,
    weights: set[torch.fx.Node],
) -> tuple[int, int] | None:
    """Blocks after ``start`` rewritten to run on ``ceil(fraction * S)`` tokens; ``(start, k)``,
    or ``None`` when that is no fewer than the tokens already running there."""
    inside = config.reduce_before == "mlp"
    region = skip_region(gm, block_of, start, mlp_start(gm, block_of, prefix, start) if inside else None)
    members = set(region)
    first = tokens.seq is None

    # The hidden state from block K (inside: from K's attention): the one input of the region
    # computed by the earlier blocks (besides the token-indexed inputs an earlier stage gathered).
    earlier = {n for n, b in block_of.items() if b <= start and n not in members}
    depends_on_blocks: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node in members:
            break
        if node in earlier or any(i in depends_on_blocks for i in _input_nodes(node)):
            depends_on_blocks.add(node)
    externals = list(dict.fromkeys(i for n in region for i in _input_nodes(n) if i not in members))
    carried = [n for n in externals if n in depends_on_blocks and n not in tokens.origin]
    if len(carried) != 1:
        raise SkipGraph(f"the later blocks read {len(carried)} values computed by the earlier ones "
                        f"({', '.join(n.name for n in carried)}); token_skip needs exactly one hidden state")
    hidden_node = carried[0]
    hidden = _tensor(hidden_node)
    if hidden is None or hidden.dim() != 3:
        raise SkipGraph(f"the value '{hidden_node.name}' leaving block {start} is not a [batch, tokens, dim] tensor")
    batch, count, _ = hidden.shape
    if any(isinstance(s, torch.SymInt) for s in hidden.shape):
        raise SkipGraph("the token count is symbolic (dynamic shapes); token_skip needs a static one")
    if first:
        tokens.seq = count
    if config.withdraw_start is not None:
        span = (config.withdraw_start, min(config.withdraw_end, count))
        keep = count - max(0, span[1] - span[0])
        if keep >= count:
            raise _Unchanged(f"the withdrawn span starts at {span[0]}, past the {count} tokens: the graph runs unchanged")
    elif config.withdraw_token_id is not None:
        ids_node, ids = _token_ids(gm, example_inputs, batch, count)
        counts = (ids == config.withdraw_token_id).sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise SkipGraph(f"the rows of the batch hold {counts.tolist()} tokens with withdraw_token_id "
                            f"{config.withdraw_token_id}; token_skip needs one count (static shapes)")
        keep = count - int(counts[0])
        if keep >= count:
            raise _Unchanged(f"no token has withdraw_token_id {config.withdraw_token_id}: the graph runs unchanged")
        if keep < 1:
            raise SkipGraph(f"every token has withdraw_token_id {config.withdraw_token_id}")
    else:
        keep = max(1, math.ceil(fraction * tokens.seq))
        if keep >= count:
            if first:
                raise _Unchanged(f"keep_ratio {fraction} keeps all {count} tokens: the graph runs unchanged")
            return None

    outputs = [n for n in region if any(u not in members for u in n.users)]
    if len(outputs) != 1 or _tensor(outputs[0]) is None or tuple(_tensor(outputs[0]).shape) != tuple(hidden.shape):
        raise SkipGraph(f"the later blocks hand {len(outputs)} values on ({', '.join(n.name for n in outputs)}); "
                        "token_skip needs exactly one hidden state of the input's shape")
    final = outputs[0]

    # Which inputs carry the token dim, and where.
    token_inputs: dict[torch.fx.Node, tuple[torch.fx.Node | None, list[int] | None, str]] = {}
    for node in externals:
        value = _tensor(node)
        if node in tokens.origin:
            token_inputs[node] = tokens.origin[node]
        elif node is hidden_node or value is None or node in weights or count not in value.shape:
            continue
        elif value.dim() == 4 and value.shape[-1] == count:
            token_inputs[node] = (node, [d for d in (2, 3) if value.shape[d] == count], "mask")
            if not any(_is_mask_of_attention(user, node) for user in node.users if user in members):
                raise SkipGraph(f"the later blocks read '{node.name}' of shape {tuple(value.shape)}, "
                                "which is not an attention mask")
        elif value.dim() in (2, 3) and value.shape[1] == count and value.shape[0] in (1, batch):
            token_inputs[node] = (node, [1], "tokens")
        else:
            raise SkipGraph(f"the later blocks read '{node.name}' of shape {tuple(value.shape)}, "
                            "whose token dim token_skip cannot tell")
    masks = [n for n, (_, _, kind) in token_inputs.items() if kind == "mask"]

    fake_mode = hidden.fake_mode  # the example values' own mode (the backend may run under another)
    anchor = _anchor(gm, region, config)
    merging = config.strategy == "merge"
    proportional = merging and config.proportional_attention
    graph = gm.graph
    assign = None
    with graph.inserting_before(region[0]), fake_mode:
        if first:
            valid = _add(graph, key_valid_from_mask, token_inputs[masks[0]][0]) if masks else None
            sizes = _add(graph, initial_sizes, hidden_node, valid) if merging else None
        else:
            valid, sizes = tokens.valid, tokens.sizes
        if config.withdraw_start is not None:
            index = _add(graph, outside_span, hidden_node, *span)
        elif config.withdraw_token_id is not None:
            index = _add(graph, outside_token_id, ids_node, config.withdraw_token_id, count - keep)
        elif merging and config.matching == "bipartite":
            plan = _add(graph, bipartite_plan, hidden_node, sizes, keep, anchor == -1)
            index = _add(graph, operator.getitem, plan, 0)
            assign = _add(graph, operator.getitem, plan, 1)
        else:
            index = _add(graph, select_tokens, hidden_node, valid, keep, config.score, anchor, anchor == -1)
        if merging:
            if assign is None:
                assign = _add(graph, assign_to_kept, hidden_node, index)
            reduced = _add(graph, merge_tokens, hidden_node, sizes, index, assign)
            sizes = _add(graph, merged_sizes, sizes, assign, keep)
        else:
            reduced = _add(graph, gather_tokens, hidden_node, index, [1])
        positions = index if first else _add(graph, gather_tokens, tokens.positions, index, [1])
        valid = _add(graph, gather_tokens, valid, index, [1]) if valid is not None else None
        replacements = {hidden_node: reduced}
        for node, (original, dims, kind) in token_inputs.items():
            if kind == "bias":
                new = _add(graph, size_bias, None, sizes, _tensor(node).dtype)
            else:
                new = _add(graph, gather_tokens, original, positions, dims)
                if kind == "mask" and proportional:
                    dtype = _tensor(new).dtype if _tensor(new).is_floating_point() else hidden.dtype
                    new = _add(graph, size_bias, new, sizes, dtype)
            replacements[node] = new
            tokens.origin[new] = (original, dims, kind)
        if proportional and not masks and not any(kind == "bias" for _, _, kind in token_inputs.values()):
            _add_bias_mask(graph, region, sizes, tokens)
    for node in region:
        node.meta["zc_old_input_shape"] = (
            tuple(_tensor(node.args[0]).shape) if node.args and _tensor(node.args[0]) is not None else None)
        node.args = torch.fx.node.map_arg(node.args, lambda n: replacements.get(n, n))
        node.kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: replacements.get(n, n))
    with fake_mode:
        for node in region:
            old = node.meta["example_value"]
            _rewrite_sizes(node, count)
            try:
                new = _fake_run(node, node.args, node.kwargs)
            except Exception as error:
                raise SkipGraph(f"op '{node.name}' does not run on fewer tokens: {type(error).__name__}: {error}") from error
            for o, n in zip(_tensors_of(old), _tensors_of(new)):
                _check_shape(node, o.shape, n.shape, count, keep, batch)
            node.meta["example_value"] = new
            del node.meta["zc_old_input_shape"]
    users = [u for u in final.users if u not in members]
    with graph.inserting_after(final), fake_mode:
        if merging:
            restored = _add(graph, unmerge_tokens, assign, final)
        else:
            restored = _add(graph, scatter_tokens, hidden_node, index, final)
    for user in users:
        user.replace_input_with(final, restored)
    tokens.positions, tokens.valid, tokens.sizes = positions, valid, sizes
    return start, keep


def _add_bias_mask(graph: torch.fx.Graph, region: list[torch.fx.Node], sizes: torch.fx.Node, tokens: _Tokens) -> None:
    """Proportional attention for a model without an attention mask: the ``log(size)`` bias
    becomes the ``attn_mask`` of every SDPA call of the later blocks."""
    attention = [n for n in region if n.target is _SDPA]
    if not any(_is_attention(n) for n in region):  # only the last block's MLP runs on merged tokens
        return
    plain = [n for n in attention if not n.kwargs.get("is_causal") and n.kwargs.get("attn_mask") is None
             and (len(n.args) < 4 or n.args[3] is None) and (len(n.args) < 6 or not n.args[5])]
    if not attention or len(plain) != len(attention):
        tokens.notes.append("the later blocks' attention is not all mask-free, non-causal SDPA and the model "
                            "passes no attention mask to add log(size) to; merged tokens attend as one token each")
        return
    dtype = _tensor(attention[0].args[0]).dtype
    bias = _add(graph, size_bias, None, sizes, dtype)
    tokens.origin[bias] = (None, None, "bias")
    for node in attention:
        if len(node.args) >= 4:
            node.args = (*node.args[:3], bias, *node.args[4:])
        else:
            node.kwargs = {**node.kwargs, "attn_mask": bias}


class _Unchanged(Exception):
    """The options leave every token in place: the graph runs as captured."""


def _value(node: torch.fx.Node | None) -> Any:
    return None if node is None else node.meta["example_value"]


def _tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _is_mask_of_attention(user: torch.fx.Node, mask: torch.fx.Node) -> bool:
    """``mask`` reaches an attention op as its mask (directly or through view-like glue)."""
    seen = {user}
    frontier = [user]
    while frontier:
        node = frontier.pop()
        if node.target is _SDPA:
            return node.kwargs.get("attn_mask") is not None or len(node.args) > 3
        if node.op == "call_method" or node.target in (operator.getitem, torch.Tensor.to):
            for nxt in node.users:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        elif node.op == "call_function":
            # eager attention adds the mask to the scores before a softmax
            return node.target in (operator.add, torch.add)
    return False


def _token_ids(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], batch: int, count: int
) -> tuple[torch.fx.Node, torch.Tensor]:
    """The graph input holding the token ids (the one integer ``[batch, tokens]`` input) and its
    example value."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = [(n, x) for n, x in zip(placeholders, example_inputs)
             if isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dtype != torch.bool
             and tuple(x.shape) == (batch, count)] if len(placeholders) == len(example_inputs) else []
    if len(found) != 1:
        raise SkipGraph(f"withdraw_token_id needs the token ids: found {len(found)} integer inputs of shape "
                        f"({batch}, {count}) instead of one")
    return found[0]


def _weight_nodes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> set[torch.fx.Node]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = {n for n in gm.graph.nodes if n.op == "get_attr"}
    if len(placeholders) == len(example_inputs):
        weights |= {n for n, x in zip(placeholders, example_inputs) if is_weight_input(x)}
    return weights


def _anchor(gm: torch.fx.GraphModule, region: list[torch.fx.Node], config: TokenSkipConfig) -> int:
    """The token the others are compared with: the first (CLS) or, for causal LMs, the last.

    ``auto`` takes a model as causal when an attention op of the region is causal or a module
    it runs in is a decoder / causal-LM class (``LlamaDecoderLayer``, ``GPT2LMHeadModel``).
    """
    if config.anchor != "auto":
        return 0 if config.anchor == "first" else -1
    if any(n.target is _SDPA and n.kwargs.get("is_causal") for n in region):
        return -1
    causal_words = ("Decoder", "CausalLM", "LMHead")
    for node in region:
        for _, module_type in node.meta.get("nn_module_stack", {}).values():
            name = getattr(module_type, "__name__", str(module_type))
            if any(word in name for word in causal_words):
                return -1
    return 0


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy sharing the example values (fake tensors of Dynamo's fake mode), which the rewrite
    replaces rather than mutates; a deep copy would give them a fake mode of their own."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def prepare(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: TokenSkipConfig,
    compile_rest: Callable[..., Callable[..., Any]],
    report: PassReport,
    on_rewritten: Callable[[torch.fx.GraphModule], None],
) -> Callable[..., Any] | None:
    """The compiled graph with token skipping, or ``None`` (graph compiles unchanged) with the
    reason; with ``max_error``, an executor that calibrates the schedule on its first calls."""
    rewritten = _copy(gm)
    try:
        if config.max_error is not None:
            block_stack(gm)  # a graph without blocks steps aside now, not after calibrating
            return _calibrating(gm, example_inputs, config, compile_rest, report, on_rewritten)
        rewrite(rewritten, example_inputs, config, report)
    except _Unchanged as reason:
        report.status = "unchanged"
        report.skipped("graph", str(reason))
        return None
    except SkipGraph as reason:
        report.status = "skipped"
        report.skipped("graph", str(reason))
        return None
    on_rewritten(rewritten)
    return compile_rest(rewritten)


# --- max_error: the schedule picked from calibration calls -----------------------------------

CANDIDATE_FINAL_RATIOS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def candidate_families(blocks: int, inside: bool = False) -> list[list[tuple[float, ...]]]:
    """Schedules ``max_error`` chooses from, in families ordered from the fewest tokens kept
    (the error grows along a family as its last ratio shrinks, so a family is bisected): for each
    block ``s`` that is the last to run on every token, either one drop to the last ratio after
    it, or a linear decrease from 1 to the last ratio over the remaining blocks. ``inside``
    (``reduce_before="mlp"``, ratios of the MLPs): also from block 0's MLP on (``s = -1``)."""
    families = []
    for last_full in range(-1 if inside else 0, blocks - 1):
        steps = blocks - 1 - last_full
        shapes = [lambda f: (f,) * steps]
        if steps > 1:
            shapes.append(lambda f: tuple(1 - (1 - f) * (j + 1) / steps for j in range(steps)))
        for shape in shapes:
            families.append([(1.0,) * (last_full + 1) + shape(f) for f in CANDIDATE_FINAL_RATIOS])
    return families


def output_error(outputs: Any, reference: Any, measure: str = "outputs") -> float:
    """1 - the cosine similarity of each sample's output (a row of the batch dim, flattened) to
    the full model's, worst over the samples and floating-point outputs. ``measure="token_mean"``
    compares ``[batch, tokens, dim]`` outputs averaged over their tokens (pooled embeddings)."""
    worst = 0.0
    flat, _ = torch.utils._pytree.tree_flatten(outputs)
    expected, _ = torch.utils._pytree.tree_flatten(reference)
    for out, ref in zip(flat, expected):
        if not isinstance(ref, torch.Tensor) or not ref.is_floating_point() or ref.numel() == 0:
            continue
        if measure == "token_mean" and ref.dim() == 3:
            out, ref = out.mean(dim=1), ref.mean(dim=1)
        rows = ref.shape[0] if ref.dim() > 1 else 1
        cos = F.cosine_similarity(out.reshape(rows, -1).double(), ref.reshape(rows, -1).double(), dim=1)
        error = 1.0 - float(cos.min())
        worst = max(worst, error if math.isfinite(error) else math.inf)
    return worst


def choose_schedule(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: TokenSkipConfig,
    samples: Sequence[tuple[Sequence[Any], Any]],
) -> tuple[tuple[float, ...] | None, float, int]:
    """The candidate schedule with the fewest block-token steps whose ``output_error`` on the
    calibration ``samples`` (inputs, full outputs) is within ``max_error``: ``(schedule or None,
    its error, candidates run)``. Candidates run eagerly (the FX graph, no Inductor compile)."""
    blocks = len(set(block_stack(gm)[1].values()))
    errors: dict[tuple[float, ...], float] = {}
    no_gain: set[tuple[float, ...]] = set()  # ratios so close to 1 that every block keeps all tokens

    def error_of(schedule: tuple[float, ...]) -> float:
        if schedule not in errors:
            graph = _copy(gm)
            try:
                rewrite(graph, example_inputs, dataclasses.replace(config, schedule=schedule, max_error=None),
                        PassReport("token_skip"))
            except _Unchanged:
                errors[schedule] = 0.0
                no_gain.add(schedule)
            else:
                errors[schedule] = max(output_error(graph(*inputs), outputs, config.error_measure)
                                       for inputs, outputs in samples)
        return errors[schedule]

    best: tuple[float, ...] | None = None
    for family in candidate_families(blocks, config.reduce_before == "mlp"):
        # the cheapest schedule of the family within the budget, among those cheaper than the best so far
        cheaper = [s for s in family if best is None or sum(s) < sum(best)]
        low, high = 0, len(cheaper)
        while low < high:
            middle = (low + high) // 2
            if error_of(cheaper[middle]) <= config.max_error:
                high = middle
            else:
                low = middle + 1
        if low < len(cheaper) and cheaper[low] not in no_gain:
            best = cheaper[low]
    tried = [e for s, e in errors.items() if s not in no_gain]
    return best, (errors[best] if best is not None else min(tried, default=0.0)), len(errors)


def _calibrating(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: TokenSkipConfig,
    compile_rest: Callable[..., Callable[..., Any]],
    report: PassReport,
    on_rewritten: Callable[[torch.fx.GraphModule], None],
) -> Callable[..., Any]:
    """The first ``calibration_calls`` calls run the full graph eagerly and keep their inputs and
    outputs; then the schedule is chosen on them and compiled once for every later call."""
    from zc.runtime import Phase, PhasedExecutor

    samples: list[tuple[list[Any], Any]] = []
    chosen: dict[str, Any] = {}
    report.metrics["calibration"] = f"the first {config.calibration_calls} calls run the full graph to pick the schedule"

    def record(*args: Any) -> Any:
        outputs = gm(*args)
        kept = [a.clone() if isinstance(a, torch.Tensor) and not is_weight_input(a) else a for a in args]
        samples.append((kept, torch.utils._pytree.tree_map(
            lambda t: t.clone() if isinstance(t, torch.Tensor) else t, outputs)))
        return outputs

    def choose() -> None:
        start = time.perf_counter()
        with torch.no_grad():
            schedule, error, runs = choose_schedule(gm, example_inputs, config, samples)
        chosen["schedule"] = schedule
        report.metrics["calibration"] = {
            "max_error": config.max_error, "schedule": schedule, "error": error, "candidates_run": runs,
            "calls": len(samples), "seconds": time.perf_counter() - start,
            "error_measure": f"1 - cosine similarity of each sample's outputs to the full model's, worst case "
                             f"({config.error_measure})"}
        samples.clear()

    def build() -> Callable[..., Any]:
        if chosen["schedule"] is None:
            report.status = "unchanged"
            report.skipped("graph", f"no candidate schedule keeps the output error within max_error "
                                    f"{config.max_error} on the calibration calls "
                                    f"(least: {report.metrics['calibration']['error']:.3g}); the graph runs unchanged")
            on_rewritten(gm)
            return compile_rest(gm)
        graph = _copy(gm)
        rewrite(graph, example_inputs, dataclasses.replace(config, schedule=chosen["schedule"], max_error=None), report)
        on_rewritten(graph)
        return compile_rest(graph)

    return PhasedExecutor([Phase("calibrate", lambda: record, calls=config.calibration_calls, on_end=choose),
                           Phase("run", build)])
